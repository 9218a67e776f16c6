"""One loader for every kind of checkpoint: `load_model(path, dtype=..., mesh=...)`.

  converted (checkpoints_convert.hf_to_orbax, or a fine-tune export): DIR/params + config.json
  Hugging Face PaliGemma directory: config.json + safetensors (+ tokenizer.model)

Runtime choices (compute/parameter dtype, remat) are arguments; the returned config is a new
one with them filled in, so neither the checkpoint's stored config nor a caller's is changed.
With a mesh the parameters are sharded over it: a converted checkpoint is restored straight into
its shards, a Hugging Face one is read on the host and then placed.
"""

import hashlib
import os
from typing import NamedTuple

import jax
import ml_collections

from paligemma_jax import checkpoint
from paligemma_jax import errors
from paligemma_jax import hf
from paligemma_jax import paligemma
from paligemma_jax import multihost
from paligemma_jax import sharding
from paligemma_jax.tokenizer import Tokenizer


class Model(NamedTuple):
  params: dict
  config: ml_collections.ConfigDict
  tokenizer: Tokenizer


def default_dtype() -> str:
  """float32 on CPU (XLA's CPU bfloat16 matrix-vector products are ~30x slower), else bfloat16."""
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def checkpoint_kind(path: str) -> str:
  """"converted" or "hf"; an InputError naming `path` for anything else."""
  if os.path.isdir(os.path.join(path, checkpoint.PARAMS)):
    return "converted"
  if os.path.isfile(os.path.join(path, "config.json")):
    return "hf"
  if not os.path.exists(path):
    raise errors.InputError(f"{path}: no such checkpoint directory.")
  raise errors.InputError(f"{path} is neither a converted checkpoint (params/, config.json) nor a "
                          "Hugging Face PaliGemma directory (config.json, *.safetensors).")


STORED = "stored"  # param_dtype: keep the checkpoint's own dtypes (fine-tuning casts from them).


def load_model(path: str, *, dtype: str | None = None, param_dtype: str | None = None, mesh=None,
               remat: bool = False, config: ml_collections.ConfigDict | None = None) -> Model:
  """(params, config, tokenizer) of the checkpoint at `path`.

  dtype: compute dtype (default `default_dtype()`).
  param_dtype: the dtype the weights are cast to (default: `dtype`), or STORED.
  config: replaces the stored model config (e.g. to turn the sliding window off); its parameter
    shapes must match the checkpoint's.
  """
  dtype = dtype or default_dtype()
  param_dtype = param_dtype or dtype
  cast = None if param_dtype == STORED else param_dtype
  kind = checkpoint_kind(path)
  if kind == "converted":
    stored = checkpoint.load_config(path)
    shardings = None if mesh is None else sharding.param_shardings(
        paligemma.param_shapes(stored), mesh)
    params, stored = checkpoint.load(path, dtype=cast, shardings=shardings)
    tokenizer_file = checkpoint.tokenizer_path(path)
  else:
    params, stored, tokenizer_file = hf.load_hf(path, dtype=cast, progress=multihost.is_writer())
    if tokenizer_file is None:
      raise errors.InputError(f"{path} has no tokenizer.model.")
    if mesh is not None:
      params = sharding.shard_params(params, mesh)
  if config is not None:
    expected = jax.tree.map(lambda x: x.shape, paligemma.param_shapes(config))
    if jax.tree.map(lambda x: x.shape, params) != expected:
      raise errors.InputError("The --config model does not match the checkpoint's parameter shapes.")
    stored = config
  result = stored.copy_and_resolve_references()
  result.dtype, result.remat = dtype, remat
  if cast is not None:
    result.param_dtype = cast
  return Model(params, result, Tokenizer(tokenizer_file))


def checkpoint_identity(path: str) -> dict:
  """What tells two checkpoints apart without reading their weights: the resolved path and a
  digest of every file's name, size and modification time (a re-converted or re-exported
  checkpoint at the same path differs). Recorded with results so that runs are never mixed."""
  root = os.path.realpath(path)
  digest = hashlib.sha256()
  for directory, subdirs, names in os.walk(root):
    subdirs.sort()
    for name in sorted(names):
      full = os.path.join(directory, name)
      stat = os.stat(full)
      digest.update(f"{os.path.relpath(full, root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
  return {"checkpoint": root, "files": digest.hexdigest()[:16]}
