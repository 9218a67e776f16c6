r"""Answers prompts about images with a PaliGemma checkpoint.

One example:
  python -m paligemma_jax.generate --checkpoint=/ckpt/pg2-3b-224 --image=cat.jpg --prompt="caption en"
Many, in batches:
  python -m paligemma_jax.generate --checkpoint=/ckpt/pg2-3b-224 --input_jsonl=in.jsonl \
      --output_jsonl=out.jsonl --batch_size=8
where each input line is {"image": path, "prompt": str} (other fields are copied through).
Several images in one prompt, in the order the prompt reads them:
  --image=left.jpg --image=right.jpg --prompt="answer en is the left one bigger?"
  {"images": [path, path, ...], "prompt": str}
Each output line holds image (or images, as given), prompt, text, tokens (generated ids, <eos> excluded), logprobs
(log-softmax of the raw logits at each chosen token), stop_reason ("eos" | "length"),
image_size ([width, height]; of the first image, with image_sizes for all of them where there
are several), or error (a bad line, a missing image, a prompt too long: that
example's error; the rest carries on). Results are appended to OUT.partial as they finish and
renamed to OUT when every input has its line (the settings kept in OUT.run.json); rerunning a
killed command continues after the last finished line, rerunning a finished one prints its
results again, and a rerun with other settings is refused (see paligemma_jax/tasks/result_lines.py).

Beam search, with transformers' semantics (num_beams, length_penalty, early_stopping=True):
  --sampler=beam --beam_size=3 [--length_penalty=0]
each line then holds the best hypothesis and its score (sum of its log-probs, <eos> included,
/ its length ** length_penalty; see paligemma_jax/decoding/beam_search.py).

Detection and segmentation answers, read into pixel coordinates of the original image:
  --task=detect --prompt="detect cat ; dog" [--draw_dir=out/]
  --task=segment --prompt="segment cat" --vae_npz=vae-oid.npz [--draw_dir=out/]
add boxes ([[x1, y1, x2, y2]] pixels of the first image, where there are several), labels, skipped (malformed objects dropped) and, for
segment, masks (COCO uncompressed run-length encoding, see `segmentation_format.rle_encode`) to each line;
--draw_dir writes each image with its boxes (and masks) drawn, named in the line's `drawing`.
"""

import dataclasses
import os

from absl import flags
from absl import logging

from paligemma_jax import cli
from paligemma_jax import errors
from paligemma_jax import files
from paligemma_jax import multihost
from paligemma_jax import tasks
from paligemma_jax.checkpoints import loading
from paligemma_jax.decoding import beam_search
from paligemma_jax.decoding import inference
from paligemma_jax.decoding import sampling
from paligemma_jax.decoding import settings
from paligemma_jax.preprocess import image_fields
from paligemma_jax.tasks import result_lines
from paligemma_jax.tasks import segmentation_format


def define_flags():
  cli.define_model_flags()
  flags.DEFINE_multi_string("image", None, "Image path, for a single example (with --prompt); "
                            "repeat it for several images in one prompt, in prompt order.")
  flags.DEFINE_string("prompt", None, 'Prompt, e.g. "caption en", "answer en what is this?", '
                      '"ocr", "detect cat ; dog", "segment cat".')
  flags.DEFINE_string("input_jsonl", None, 'Many examples: lines {"image": path, "prompt": str}.')
  flags.DEFINE_string("output_jsonl", None, "Write one result line per input, in input order; "
                      "a rerun of a killed command continues it.")
  flags.DEFINE_integer("max_new_tokens", 64, "Most tokens to generate per example.", lower_bound=1)
  flags.DEFINE_enum("sampler", "greedy", settings.METHODS,
                    "How to pick each token; beam: beam search (beam_search.py), the best "
                    "hypothesis and its `score` in each line.")
  flags.DEFINE_float("temperature", settings.DEFAULTS["temperature"],
                     "Softmax temperature (all but greedy and beam).")
  flags.DEFINE_integer("top_k", settings.DEFAULTS["top_k"], "Tokens kept by --sampler=top_k.")
  flags.DEFINE_float("top_p", settings.DEFAULTS["top_p"],
                     "Probability mass kept by --sampler=top_p.")
  cli.define_beam_flags()
  flags.DEFINE_integer("seed", 0, "PRNG seed: the same seed reproduces sampled outputs (an int64: "
                       "all 64 bits count).", lower_bound=sampling.SEED_RANGE[0],
                       upper_bound=sampling.SEED_RANGE[1])
  flags.DEFINE_enum("task", None, list(tasks.OBJECT_TASKS), "Also read the answers as boxes "
                    "(detect) or boxes and masks (segment) into each output line.")
  flags.DEFINE_string("vae_npz", None, "Mask decoder weights (big_vision's vae-oid.npz), for "
                      "--task=segment.")
  flags.DEFINE_string("draw_dir", None, "With --task: write each image with its boxes (and "
                      "masks) drawn here, as NNNNN_<image name>.png.")


def validate_flags(f) -> settings.AnySampler:
  """Everything that can be checked before the model loads; returns the sampler."""
  if bool(f.input_jsonl) == bool(f.image or f.prompt):
    raise errors.InputError("give either --image and --prompt, or --input_jsonl.")
  if bool(f.image) != bool(f.prompt):
    raise errors.InputError("--image and --prompt go together.")
  if f.output_jsonl and not f.input_jsonl:
    raise errors.InputError("--output_jsonl goes with --input_jsonl.")
  files.check_readable("input_jsonl", f.input_jsonl)
  files.check_writable("output_jsonl", f.output_jsonl)
  if f.input_jsonl and f.output_jsonl and (
      os.path.realpath(f.input_jsonl) == os.path.realpath(f.output_jsonl)):
    raise errors.InputError("--output_jsonl is the --input_jsonl file; refusing to overwrite it.")
  if f.task == "segment" and not f.vae_npz:
    raise errors.InputError("--task=segment needs --vae_npz (big_vision's vae-oid.npz).")
  files.check_readable("vae_npz", f.vae_npz)
  if f.draw_dir and not f.task:
    raise errors.InputError("--draw_dir draws boxes and masks: give --task=detect or --task=segment.")
  if f.draw_dir and os.path.exists(f.draw_dir) and not os.path.isdir(f.draw_dir):
    raise errors.InputError(f"--draw_dir={f.draw_dir} is not a directory.")
  sampler = settings.decoder(f.sampler, temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
                             beam_size=getattr(f, "beam_size", None),
                             length_penalty=getattr(f, "length_penalty", None))
  loading.checkpoint_kind(f.checkpoint)
  return sampler


def sampler_settings(sampler: settings.AnySampler, seed: int) -> dict:
  """What decides the sampled tokens: a greedy run ignores temperature, k, p and the seed."""
  if isinstance(sampler, beam_search.BeamSearch):
    return {"sampler": sampler.method, **dataclasses.asdict(sampler)}
  used = {"greedy": (), "temperature": ("temperature",), "top_k": ("temperature", "top_k"),
          "top_p": ("temperature", "top_p")}[sampler.method]
  seeded = {"seed": seed} if sampler.method != "greedy" else {}
  return {"sampler": sampler.method, **{k: getattr(sampler, k) for k in used}, **seeded}


def main(argv):
  f = flags.FLAGS
  sampler = validate_flags(f)
  mesh = cli.mesh_from_flags()  # Before anything touches a device.
  task = None
  if f.task:
    task = tasks.get(f.task, segmentation_format.load_vae_npz(f.vae_npz) if f.vae_npz else None)
  if f.input_jsonl:
    items = result_lines.read_examples(f.input_jsonl)
    if not items:
      raise errors.InputError(f"--input_jsonl={f.input_jsonl} has no examples (no non-empty line).")
  else:
    one = len(f.image) == 1
    items = [inference.Example(f.image[0] if one else None, f.prompt,
                               images=None if one else list(f.image))]
  run_settings = {**cli.model_settings(), "max_new_tokens": f.max_new_tokens, "task": f.task,
                  **sampler_settings(sampler, f.seed)}
  if f.draw_dir and multihost.is_writer():
    os.makedirs(f.draw_dir, exist_ok=True)
    files.remove_stale_temps_in(f.draw_dir)  # Drawings a killed run was writing.

  def load_predictor():  # Not for a finished --output_jsonl.
    return inference.Predictor(*cli.load_model_from_flags(mesh), batch_size=f.batch_size,
                               cache_dtype=cli.kv_cache_dtype_from_flags())

  results = result_lines.answer(load_predictor, items, output=f.output_jsonl, settings=run_settings,
                           outputs=result_lines.Outputs(task, f.draw_dir), progress=len(items) > 1,
                           max_new_tokens=f.max_new_tokens, sampler=sampler, seed=f.seed)
  failures = 0
  for _, result in results:
    if "error" in result:
      failures += 1
      logging.error("%s", result["error"])
    elif multihost.is_writer():
      images = ",".join(image_fields.paths(result))
      print(f"{images}\t{result['prompt']!r}\t{result['text']}", flush=True)
  if failures:
    logging.warning("%d of %d inputs failed (see the messages above).", failures, len(items))
  return 1 if failures == len(items) else 0


if __name__ == "__main__":
  cli.run(main, define_flags)
