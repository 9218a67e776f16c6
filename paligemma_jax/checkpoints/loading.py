"""One loader for every kind of checkpoint: `load_model(path, dtype=..., mesh=...)`.

  converted (checkpoints_convert.hf_to_orbax, or a fine-tune export): DIR/params + config.json
  Hugging Face PaliGemma directory: config.json + safetensors (+ tokenizer.model)
  Hugging Face Hub id, ORG/NAME[@REVISION]: that directory, fetched into the Hub cache (hub.py);
  an existing local path always wins
  big_vision checkpoint (Kaggle, the Hub's -jax repos): FILE.npz, the tokenizer.model beside it
  or `tokenizer=` (npz.py)

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

from paligemma_jax import errors
from paligemma_jax import multihost
from paligemma_jax import sharding
from paligemma_jax.checkpoints import checkpoint
from paligemma_jax.checkpoints import hf
from paligemma_jax.checkpoints import hub
from paligemma_jax.checkpoints import npz
from paligemma_jax.model import paligemma
from paligemma_jax.model import quantize as quantize_lib
from paligemma_jax.preprocess.tokenizer import Tokenizer


class Model(NamedTuple):
  params: dict
  config: ml_collections.ConfigDict
  tokenizer: Tokenizer


def default_dtype() -> str:
  """float32 on CPU (XLA's CPU bfloat16 matrix-vector products are ~30x slower), else bfloat16."""
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def checkpoint_kind(path: str) -> str:
  """"converted", "hf" or "npz"; an InputError naming `path` for anything else."""
  path = hub.resolve(path)
  if path.endswith(".npz") and os.path.isfile(path):
    return "npz"
  if os.path.isdir(os.path.join(path, checkpoint.PARAMS)):
    return "converted"
  if os.path.isfile(os.path.join(path, "config.json")):
    return "hf"
  if not os.path.exists(path):
    raise errors.InputError(f"{path}: no such checkpoint.")
  raise errors.InputError(f"{path} is neither a converted checkpoint (params/, config.json) nor a "
                          "Hugging Face PaliGemma directory (config.json, *.safetensors).")


def _quantizes_once_read(quantize, config) -> bool:
  """Whether load_model quantizes the float weights it read (from the stacked layers)."""
  return quantize is not None and not quantize_lib.enabled(config)


def _to_devices(host, config, mesh, scan_layers, quantize):
  """Host (numpy) parameters onto the devices: sharded over `mesh`, else onto the default device,
  which on CPU keeps their aligned buffers (host_memory.py), in the decoding layout if asked."""
  if mesh is not None:
    return sharding.shard_params(host, mesh)
  if _quantizes_once_read(quantize, config):
    return host  # quantize_tree moves it a leaf at a time: the float model never on the device.
  if not scan_layers:
    host = paligemma.decoding_layout(host)
  return jax.device_put(host)


STORED = "stored"  # param_dtype: keep the checkpoint's own dtypes (fine-tuning casts from them).


def load_model(path: str, *, dtype: str | None = None, param_dtype: str | None = None, mesh=None,
               remat: bool = False, config: ml_collections.ConfigDict | None = None,
               tokenizer: str | None = None, quantize: str | None = None,
               scan_layers: bool = True) -> Model:
  """(params, config, tokenizer) of the checkpoint at `path`.

  dtype: compute dtype (default `default_dtype()`).
  param_dtype: the dtype the weights are cast to (default: `dtype`), or STORED.
  config: replaces the stored model config (e.g. to turn the sliding window off); its parameter
    shapes must match the checkpoint's.
  tokenizer: a tokenizer.model to use instead of the checkpoint's (an .npz's: the one beside it).
  quantize: "int8" or "int4" computes with those weights (quantize.py), quantizing a float
    checkpoint after it is read (memory then peaks at the float weights plus the quantized ones);
    None: as stored (a checkpoint converted with --quantize=int8|int4 is quantized).
  """
  quantize_lib.checked(quantize)
  dtype = dtype or default_dtype()
  param_dtype = param_dtype or dtype
  cast = None if param_dtype == STORED else param_dtype
  path = hub.resolve(path)
  kind = checkpoint_kind(path)
  if kind == "converted":
    stored = checkpoint.load_config(path)
    if quantize not in (None, quantize_lib.qtype(stored)) and quantize_lib.enabled(stored):
      raise errors.InputError(
          f"{path} holds {quantize_lib.qtype(stored)} weights; {quantize} needs the float "
          "checkpoint it was converted from.")
    shardings = None if mesh is None else sharding.param_shardings(
        paligemma.param_shapes(stored), mesh)
    stacked = scan_layers or _quantizes_once_read(quantize, stored)
    params, stored = checkpoint.load(path, dtype=cast, shardings=shardings, scan_layers=stacked)
    tokenizer_file = checkpoint.tokenizer_path(path)
  elif kind == "npz":
    tokenizer_file = tokenizer or npz.tokenizer_beside(path)
    if not os.path.isfile(tokenizer_file):  # Before the long part.
      raise errors.InputError(
          f"{path}: no tokenizer {tokenizer_file}: put the checkpoint's tokenizer.model beside "
          "the .npz, or convert it with `python -m checkpoints_convert.npz_to_orbax "
          "--tokenizer=PATH` (in Python: load_model(..., tokenizer=PATH)).")
    params, stored = npz.load_npz(path, dtype=cast, progress=multihost.is_writer(),
                                  vocab_size=Tokenizer(tokenizer_file).vocab_size)
    params = _to_devices(params, stored, mesh, scan_layers, quantize)
  else:
    params, stored, tokenizer_file = hf.load_hf(path, dtype=cast, progress=multihost.is_writer())
    if tokenizer_file is None and tokenizer is None:
      raise errors.InputError(f"{path} has no tokenizer.model.")
    params = _to_devices(params, stored, mesh, scan_layers, quantize)
  if config is not None:
    if quantize_lib.enabled(stored):  # The override describes the structure; weights as stored.
      config = config.copy_and_resolve_references()
      config.quantize = quantize_lib.qtype(stored)
    expected = paligemma.param_shapes(config)
    if "layers" not in params["llm"]:
      expected = jax.eval_shape(paligemma.decoding_layout, expected)
    if jax.tree.map(lambda x: x.shape, params) != jax.tree.map(lambda x: x.shape, expected):
      raise errors.InputError("The --config model does not match the checkpoint's parameter shapes.")
    stored = config
  if _quantizes_once_read(quantize, stored):
    params, stored = paligemma.quantize_params(params, stored, quantize)
    params = jax.device_put(params) if mesh is None else sharding.shard_params(params, mesh)
  if not scan_layers and "layers" in params["llm"]:
    params = paligemma.decoding_layout(params)
  result = stored.copy_and_resolve_references()
  result.dtype, result.remat, result.scan_layers = dtype, remat, scan_layers
  if cast is not None:
    result.param_dtype = cast
  return Model(params, result, Tokenizer(tokenizer or tokenizer_file))


def checkpoint_identity(path: str) -> dict:
  """What tells two checkpoints apart without reading their weights: the resolved path and a
  digest of every file's name, size and modification time (a re-converted or re-exported
  checkpoint at the same path differs). Recorded with results so that runs are never mixed."""
  root = os.path.realpath(hub.resolve(path))  # A Hub id: its snapshot, named by its commit.
  digest = hashlib.sha256()
  one_file = [(os.path.dirname(root), [], [os.path.basename(root)])]  # An .npz.
  for directory, subdirs, names in one_file if os.path.isfile(root) else os.walk(root):
    subdirs.sort()
    for name in sorted(names):
      full = os.path.join(directory, name)
      stat = os.stat(full)
      digest.update(f"{os.path.relpath(full, root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
  return {"checkpoint": root, "files": digest.hexdigest()[:16]}
