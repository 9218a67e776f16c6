r"""Evaluates a checkpoint on a JSONL dataset: predictions, per-example scores, task metrics.

  python -m paligemma_jax.evaluate --checkpoint=/ckpt/pg2-3b-224 --dataset=vqav2_val.jsonl \
      --task=vqa --predictions=vqa_preds.jsonl --metrics=vqa_metrics.json --batch_size=8

Each dataset line is {"image": path, "prompt": str, ...references}; see docs/evaluation.md for
every task's fields and output formats, and paligemma_jax/evaluation/runner.py for how predictions are
appended and resumed: running the same command again after an interruption continues where it
stopped; predictions of another model or setting are refused. Bad lines are reported with their
line number, skipped and counted.
"""

import json
import os

from absl import flags

from paligemma_jax import cli
from paligemma_jax import errors
from paligemma_jax import files
from paligemma_jax import tasks
from paligemma_jax.checkpoints import loading
from paligemma_jax.decoding import beam_search
from paligemma_jax.decoding import settings
from paligemma_jax.evaluation import runner
from paligemma_jax.tasks import segmentation_format

MAX_NEW_TOKENS = {name: task.max_new_tokens for name, task in tasks.REGISTRY.items()
                  if not task.scores_suffixes}


def define_flags():
  cli.define_model_flags()
  flags.DEFINE_string("dataset", None, "JSONL dataset; see docs/evaluation.md.", required=True)
  flags.DEFINE_enum("task", None, tasks.NAMES, "Metric to compute (and reference fields to read).",
                    required=True)
  flags.DEFINE_string("predictions", None, "Predictions JSONL: appended to as batches finish; "
                      "rerun the same command to resume.", required=True)
  flags.DEFINE_string("metrics", None, "Write the metrics JSON here too (they are always printed).")
  flags.DEFINE_integer("max_new_tokens", None, "Most tokens to generate per example; default per "
                       f"task: {MAX_NEW_TOKENS}.", lower_bound=1)
  flags.DEFINE_string("vae_npz", None, "Mask decoder weights (big_vision's vae-oid.npz), for "
                      "--task=segment.")
  flags.DEFINE_enum("sampler", "greedy", ["greedy", beam_search.BeamSearch.method],
                    "greedy, or beam search (beam_search.py; its best hypothesis is the answer).")
  cli.define_beam_flags()
  flags.DEFINE_string("image_dir", None, "Resolve relative image and mask paths here (default: "
                      "the dataset file's directory).")


def validate_flags(f) -> beam_search.BeamSearch | None:
  """Everything that can be checked before the model loads; returns the beam search, if any."""
  files.check_readable("dataset", f.dataset)
  files.check_writable("predictions", f.predictions)
  files.check_writable("metrics", f.metrics)
  if f.task == "segment" and not f.vae_npz:
    raise errors.InputError("--task=segment needs --vae_npz (big_vision's vae-oid.npz).")
  files.check_readable("vae_npz", f.vae_npz)
  if f.image_dir is not None and not os.path.isdir(f.image_dir):
    raise errors.InputError(f"--image_dir={f.image_dir}: no such directory.")
  for flag in ("predictions", "metrics"):
    path = getattr(f, flag)
    if path and os.path.realpath(path) == os.path.realpath(f.dataset):
      raise errors.InputError(f"--{flag} is the --dataset file; refusing to overwrite it.")
  beams = settings.decoder(getattr(f, "sampler", "greedy"), beam_size=getattr(f, "beam_size", None),
                           length_penalty=getattr(f, "length_penalty", None))
  beams = beams if isinstance(beams, beam_search.BeamSearch) else None  # Greedy.
  if beams and tasks.REGISTRY[f.task].scores_suffixes:
    raise errors.InputError(f"--task={f.task} scores given answers; --sampler=beam is for "
                            "generating them.")
  loading.checkpoint_kind(f.checkpoint)
  return beams


def main(argv):
  f = flags.FLAGS
  beams = validate_flags(f)
  mesh = cli.mesh_from_flags()  # Before anything touches a device.
  vae_params = segmentation_format.load_vae_npz(f.vae_npz) if f.task == "segment" else None
  evaluator = runner.Evaluator(lambda: cli.load_model_from_flags(mesh), batch_size=f.batch_size,
                               vae_params=vae_params, model_identity=cli.model_settings(),
                               beams=beams, cache_dtype=cli.kv_cache_dtype_from_flags())
  result = evaluator.run(f.dataset, f.task, f.predictions, f.metrics,
                         max_new_tokens=f.max_new_tokens, image_dir=f.image_dir)
  print(json.dumps(result, indent=2, ensure_ascii=False))
  return 1 if not result["evaluated"] else 0


if __name__ == "__main__":
  cli.run(main, define_flags)
