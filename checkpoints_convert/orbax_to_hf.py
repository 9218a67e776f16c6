r"""Exports a converted checkpoint as a Hugging Face PaliGemma directory (transformers, vLLM).

  python -m checkpoints_convert.orbax_to_hf --checkpoint=/ckpt/pg2-3b-224-captions \
      --output_dir=/hf/pg2-3b-224-captions [--dtype=bfloat16] [--max_shard_size=5GB]

The result loads as it is with `PaliGemmaForConditionalGeneration.from_pretrained(OUT)` and
`PaliGemmaProcessor.from_pretrained(OUT)` (see paligemma_jax/checkpoints/hf_export.py). --checkpoint is
anything `generate` takes: a converted checkpoint (a fine-tune's export included), a Hugging Face
directory or a Hub id. Weights keep the checkpoint's dtype unless --dtype is given. The output
directory must not exist; it appears only once complete.
"""

from absl import flags

from paligemma_jax import cli
from paligemma_jax.checkpoints import hf_config
from paligemma_jax.checkpoints import hf_export


def define_flags():
  """The command-line flags; defined only when this module runs as a program."""
  flags.DEFINE_string("checkpoint", None, "A converted checkpoint (or a Hugging Face directory or "
                      "Hub id).", required=True)
  flags.DEFINE_string("output_dir", None, "New Hugging Face directory to create.", required=True)
  flags.DEFINE_enum("dtype", None, hf_config.DTYPES, "Stored dtype; default: the checkpoint's.")
  flags.DEFINE_string("max_shard_size", hf_export.DEFAULT_MAX_SHARD_SIZE, "Largest safetensors "
                      "file, e.g. 5GB or 500MB; past it the weights are sharded with an index.")


def main(argv):
  del argv  # cli.run refuses stray arguments.
  f = flags.FLAGS
  hf_export.export_checkpoint(f.checkpoint, f.output_dir, dtype=f.dtype,
                              max_shard_size=f.max_shard_size)


if __name__ == "__main__":
  cli.run(main, define_flags)
