r"""Converts a big_vision PaliGemma / PaliGemma 2 `.npz` (Kaggle, the Hub's `-jax` repos) into a
converted checkpoint.

  python -m checkpoints_convert.npz_to_orbax --npz=paligemma2-3b-pt-224.b16.npz \
      --tokenizer=paligemma_tokenizer.model --output_dir=pg2-3b-224

The model (variant, resolution, every dimension) comes from the arrays' shapes; --variant (e.g.
pg2-3b-448) replaces it. Weights keep the file's dtype unless --dtype is given. The tokenizer is
checked before any weight is read; --quantize=int8|int4 stores quantized weights, as
hf_to_orbax does. The output directory must not exist; it appears only once
complete, and a rerun removes what a killed run left.
"""

import os

from absl import flags
from absl import logging

from checkpoints_convert import hf_to_orbax
from paligemma_jax import cli
from paligemma_jax import errors
from paligemma_jax.checkpoints import checkpoint
from paligemma_jax.checkpoints import hf_config
from paligemma_jax.checkpoints import npz
from paligemma_jax.model import paligemma
from paligemma_jax.preprocess.tokenizer import Tokenizer


def define_flags():
  """The command-line flags; defined only when this module runs as a program."""
  flags.DEFINE_string("npz", None, "big_vision PaliGemma checkpoint (.npz).", required=True)
  flags.DEFINE_string("output_dir", None, "The converted checkpoint to create (a new "
                      "directory).", required=True)
  flags.DEFINE_string("tokenizer", None, "SentencePiece tokenizer.model to include; default: the "
                      "tokenizer.model beside --npz.")
  flags.DEFINE_string("variant", None, "Model, VARIANT[-RESOLUTION] of configs/paligemma.py "
                      "(e.g. pg2-3b-448); default: read from the arrays' shapes.")
  flags.DEFINE_enum("dtype", None, hf_config.DTYPES, "Parameter dtype; default: the file's.")
  hf_to_orbax.define_quantize_flag()


def _check_tokenizer(path: str) -> Tokenizer:
  """A checkpoint without a usable tokenizer cannot generate: refuse it before the long part."""
  try:
    return Tokenizer(path)
  except (ValueError, OSError) as e:
    raise errors.InputError(f"{e}; give a tokenizer.model with --tokenizer=PATH.") from None


def convert(npz_path: str, output_dir: str, tokenizer: str | None = None,
            variant: str | None = None, dtype: str | None = None, progress: bool = True,
            quantize: str | None = None):
  """Reads `npz_path`, writes `output_dir`; returns the model config. `tokenizer` defaults to the
  tokenizer.model beside the file; quantize="int8" or "int4" stores such weights."""
  checkpoint.check_new(output_dir)
  if not os.path.isfile(npz_path):  # Before the tokenizer beside it is looked for.
    raise errors.InputError(f"--npz={npz_path}: no such file.")
  tokenizer = tokenizer or npz.tokenizer_beside(npz_path)
  vocab_size = _check_tokenizer(tokenizer).vocab_size
  params, config = npz.load_npz(npz_path, dtype=dtype, variant=variant, progress=progress,
                                vocab_size=vocab_size)
  if quantize:
    params, config = paligemma.quantize_params(params, config, quantize)
  checkpoint.save(output_dir, params, config, tokenizer)
  logging.info("Wrote %s: variant %s, %s%s parameters, image %dpx.", output_dir, config.variant,
               f"{quantize} + " if quantize else "", config.param_dtype, config.vision.image_size)
  return config


def main(argv):
  del argv  # cli.run refuses stray arguments.
  f = flags.FLAGS
  convert(f.npz, f.output_dir, f.tokenizer, f.variant, f.dtype, quantize=f.quantize)


if __name__ == "__main__":
  cli.run(main, define_flags)
