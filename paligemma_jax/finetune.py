r"""Fine-tunes a PaliGemma checkpoint on JSONL data; resumable, exports a `generate`-ready checkpoint.

  python -m paligemma_jax.finetune --config=configs/finetune.py:lora \
      --checkpoint=/ckpt/pg2-3b-224 --train_jsonl=train.jsonl --eval_jsonl=val.jsonl \
      --workdir=/runs/captions --export_dir=/ckpt/pg2-3b-224-captions

Each data line is {"image": path, "prefix": str, "suffix": str}; the model learns to answer
`prefix` with `suffix` (see paligemma_jax/training/data.py). `--workdir` holds checkpoints of the
training state, stored with Orbax (trainable parameters, optimizer state, step, PRNG key, data
position), the training config and metrics.jsonl (one line per step, plus evaluation lines).
Running the same command again resumes from the last checkpoint and continues exactly where the
run would have been. When the last step is done, the model (LoRA merged) is written to
`--export_dir`: a converted checkpoint, or with `--export_format=hf` a Hugging Face directory
(transformers, vLLM).
A bad flag or config value, a missing file or an existing `--export_dir` is reported on one
line (exit status 1) before anything loads.

`--mesh` shards the model, the training state and the batches over the devices (see
docs/scaling.md); the numbers are those of one device. On a multi-host job (`--distributed`)
every host runs the same command with the same data; only the first writes metrics and logs.

This module is the command line only; the training itself is `paligemma_jax.training.trainer.train`.
"""

import os

from absl import flags
from absl import logging
from ml_collections import config_flags

from paligemma_jax import cli
from paligemma_jax.training import trainer

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "finetune.py")


def define_flags():
  """The command-line flags; defined only when this module runs as a program."""
  config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG, "Training config, e.g. configs/finetune.py:lora (default: attn).",
      lock_config=True)
  flags.DEFINE_string("checkpoint", None, "Base model: a converted checkpoint, a Hugging Face "
                      "PaliGemma directory or a Hub id ORG/NAME[@REVISION].", required=True)
  flags.DEFINE_string("train_jsonl", None, 'Lines {"image", "prefix", "suffix"}.', required=True)
  flags.DEFINE_string("eval_jsonl", None, "Held-out lines, same format: loss and exact match.")
  flags.DEFINE_string("workdir", None, "Training state and metrics; rerun to resume.", required=True)
  flags.DEFINE_string("export_dir", None, "Where the fine-tuned checkpoint goes at the end.")
  flags.DEFINE_enum("export_format", "orbax", list(trainer.EXPORT_FORMATS), "orbax: a "
                    "converted checkpoint (generate, evaluate); hf: a Hugging Face PaliGemma directory that "
                    "transformers and vLLM load (LoRA merged).")
  flags.DEFINE_integer("max_steps_this_run", None, "Stop (with a checkpoint) after this many "
                       "steps; rerun to go on.")
  cli.define_mesh_flags()


def main(argv):
  del argv  # cli.run refuses stray arguments.
  f = flags.FLAGS
  arguments = dict(base=f.checkpoint, train_jsonl=f.train_jsonl, workdir=f.workdir,
                   eval_jsonl=f.eval_jsonl, export_dir=f.export_dir,
                   max_steps_this_run=f.max_steps_this_run, export_format=f.export_format)
  trainer.validate(f.config, **arguments)  # Before the mesh or the model take any time.
  mesh = cli.mesh_from_flags()  # Before anything touches a device.
  result = trainer.train(f.config, **arguments, mesh=mesh)
  if result["step"] < f.config.total_steps:
    logging.info("Stopped at step %d of %d; run the same command again to continue.",
                 result["step"], f.config.total_steps)
  elif f.export_dir:
    logging.info("Exported the fine-tuned model to %s.", f.export_dir)


if __name__ == "__main__":
  cli.run(main, define_flags)
