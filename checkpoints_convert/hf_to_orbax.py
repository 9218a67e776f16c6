r"""Converts a Hugging Face PaliGemma / PaliGemma 2 directory into a converted checkpoint.

  python -m checkpoints_convert.hf_to_orbax --hf_dir=paligemma2-3b-pt-448 --output_dir=pg2-3b-448
  python -m checkpoints_convert.hf_to_orbax --hf_dir=google/paligemma2-3b-pt-448 \
      --output_dir=pg2-3b-448

--hf_dir is a directory or a Hugging Face Hub id, ORG/NAME[@REVISION] (fetched into the Hub
cache; see paligemma_jax/checkpoints/hub.py).

Weights keep the checkpoint's dtype (PaliGemma 1: float32, PaliGemma 2: bfloat16) unless --dtype
is given; --quantize=int8|int4 stores int8 or int4 matrices (paligemma_jax/model/quantize.py), which load
as such without a flag. The tokenizer is the directory's tokenizer.model unless --tokenizer=PATH is
given; it is checked before any weight is read. The output directory must not exist; it appears only once
complete, and a rerun removes what a killed run left.
"""

import os

from absl import flags
from absl import logging

from paligemma_jax import cli
from paligemma_jax import errors
from paligemma_jax.checkpoints import checkpoint
from paligemma_jax.checkpoints import hf
from paligemma_jax.checkpoints import hf_config
from paligemma_jax.checkpoints import hub
from paligemma_jax.model import paligemma
from paligemma_jax.preprocess.tokenizer import Tokenizer


def define_flags():
  """The command-line flags; defined only when this module runs as a program."""
  flags.DEFINE_string("hf_dir", None, "Hugging Face model directory (config.json, *.safetensors), "
                      "or a Hub id ORG/NAME[@REVISION], e.g. google/paligemma2-3b-pt-224.",
                      required=True)
  flags.DEFINE_string("output_dir", None, "The converted checkpoint to create (a new "
                      "directory).", required=True)
  flags.DEFINE_enum("dtype", None, hf_config.DTYPES, "Parameter dtype; default: the checkpoint's.")
  flags.DEFINE_string("tokenizer", None, "SentencePiece tokenizer.model to include; default: the "
                      "one in --hf_dir.")
  define_quantize_flag()


def define_quantize_flag():
  """--quantize, for both converters."""
  flags.DEFINE_enum("quantize", None, ["int8", "int4"], "Store int8 or int4 weights "
                    "(paligemma_jax/model/quantize.py: a quarter or an eighth of float32's bytes); "
                    "the checkpoint then loads as such.")


def _check_tokenizer(path: str):
  """A checkpoint without a usable tokenizer cannot generate: refuse it before the long part."""
  try:
    Tokenizer(path)
  except (ValueError, OSError) as e:
    raise errors.InputError(f"{e}; give a tokenizer.model with --tokenizer=PATH.") from None


def convert(hf_dir: str, output_dir: str, dtype: str | None = None, tokenizer: str | None = None,
            progress: bool = True, quantize: str | None = None):
  """Reads `hf_dir`, writes `output_dir`; returns the model config. `tokenizer` defaults to
  hf_dir/tokenizer.model. Every input is checked before the weights are read. quantize="int8"
  or "int4" stores such matrices with their scales (in the parameter dtype); config.json says so."""
  checkpoint.check_new(output_dir)
  hf_dir = hub.resolve(hf_dir)
  config = hf_config.read_config(hf_dir, dtype)
  tokenizer = tokenizer or os.path.join(hf_dir, checkpoint.TOKENIZER)
  _check_tokenizer(tokenizer)
  params = hf.load_params(hf_dir, config, progress=progress)
  if quantize:
    params, config = paligemma.quantize_params(params, config, quantize)
  checkpoint.save(output_dir, params, config, tokenizer)
  logging.info("Wrote %s: variant %s, %s%s parameters, image %dpx.", output_dir, config.variant,
               f"{quantize} + " if quantize else "", config.param_dtype, config.vision.image_size)
  return config


def main(argv):
  del argv  # cli.run refuses stray arguments.
  f = flags.FLAGS
  convert(f.hf_dir, f.output_dir, f.dtype, f.tokenizer, quantize=f.quantize)


if __name__ == "__main__":
  cli.run(main, define_flags)
