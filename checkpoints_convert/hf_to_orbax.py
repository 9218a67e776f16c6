r"""Converts a Hugging Face PaliGemma / PaliGemma 2 directory into our Orbax checkpoint.

  python -m checkpoints_convert.hf_to_orbax --hf_dir=paligemma2-3b-pt-448 --output_dir=pg2-3b-448

Weights keep the checkpoint's dtype (PaliGemma 1: float32, PaliGemma 2: bfloat16) unless --dtype
is given. The output directory must not exist; it appears only once complete.
"""

from absl import app
from absl import flags
from absl import logging

from paligemma_jax import checkpoint
from paligemma_jax import hf

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model directory (config.json, *.safetensors).",
                              required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "New checkpoint directory to create.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", None, hf.DTYPES, "Parameter dtype; default: the checkpoint's.")


def convert(hf_dir: str, output_dir: str, dtype: str | None = None, progress: bool = True):
  """Reads `hf_dir`, writes `output_dir`; returns the model config."""
  params, config, tokenizer = hf.load_hf(hf_dir, dtype=dtype, progress=progress)
  logging.info("Config: variant %s, %s parameters, image %dpx.", config.variant, config.param_dtype,
               config.vision.image_size)
  if tokenizer is None:
    logging.warning("%s has no tokenizer.model; the checkpoint will have no tokenizer.", hf_dir)
  checkpoint.save(output_dir, params, config, tokenizer)
  logging.info("Wrote %s.", output_dir)
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  checkpoint.quiet_orbax_logs()
  convert(_HF_DIR.value, _OUTPUT_DIR.value, _DTYPE.value)


if __name__ == "__main__":
  app.run(main)
