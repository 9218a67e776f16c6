"""Our checkpoint format: a directory with the parameters (Orbax), the model config and the tokenizer.

  DIR/params/          Orbax StandardCheckpointer tree: the `params` dict of the model
  DIR/config.json      the model ConfigDict (configs/paligemma.py fields) as JSON
  DIR/tokenizer.model  SentencePiece model (optional)

`save` writes into a temporary sibling directory and renames it into place, so DIR either holds a
complete checkpoint or does not exist. On a multi-host job every process calls it (each writes the
slices of the sharded parameters it holds, into a shared directory); only process 0 creates,
fills in and renames the directory.
"""

import json
import logging as std_logging
import os
import shutil
import uuid

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

PARAMS, CONFIG, TOKENIZER = "params", "config.json", "tokenizer.model"


class _OrbaxInfoFilter(std_logging.Filter):
  """Drops Orbax's INFO lines (some twenty per save or restore) unless --v=1 or more."""

  def filter(self, record):
    return (record.levelno > std_logging.INFO or logging.get_verbosity() > logging.INFO
            or f"{os.sep}orbax{os.sep}" not in record.pathname)


def quiet_orbax_logs():
  """For the command-line entry points: keeps Orbax's warnings and errors, not its progress."""
  logger = logging.get_absl_logger()
  if not any(isinstance(f, _OrbaxInfoFilter) for f in logger.filters):
    logger.addFilter(_OrbaxInfoFilter())


def _sync(name: str):
  """A barrier across the processes of a multi-host job (nothing to wait for in one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def save(directory: str, params, config: ml_collections.ConfigDict, tokenizer_path: str | None = None):
  """Writes a new checkpoint directory; refuses to touch an existing one."""
  directory = os.path.abspath(directory)  # Orbax wants absolute paths.
  if os.path.exists(directory):
    raise FileExistsError(f"Output directory {directory} already exists; refusing to overwrite it.")
  if tokenizer_path is not None and not os.path.isfile(tokenizer_path):
    raise FileNotFoundError(f"Tokenizer file {tokenizer_path} does not exist.")
  parent, name = os.path.split(directory)
  writer, shared = jax.process_index() == 0, jax.process_count() > 1
  # Same filesystem: atomic rename. Processes of one job must agree on the name without talking.
  tmp = os.path.join(parent, f".{name}.tmp-{'shared' if shared else uuid.uuid4().hex[:8]}")
  if writer:
    os.makedirs(parent, exist_ok=True)
    if shared:
      shutil.rmtree(tmp, ignore_errors=True)  # Left by a killed job.
    os.mkdir(tmp)
  _sync(f"checkpoint.save {directory}: created")
  try:
    with ocp.StandardCheckpointer() as ckpt:  # Every process: Orbax writes each shard once.
      ckpt.save(os.path.join(tmp, PARAMS), params)
      ckpt.wait_until_finished()
    if writer:
      with open(os.path.join(tmp, CONFIG), "w") as f:
        f.write(config.to_json(indent=2, sort_keys=True))
      if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, os.path.join(tmp, TOKENIZER))
    _sync(f"checkpoint.save {directory}: written")
    if writer:
      os.rename(tmp, directory)
  except BaseException:
    if writer:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  _sync(f"checkpoint.save {directory}: renamed")  # Nobody returns before the directory exists.


def _check(directory, name):
  path = os.path.join(os.path.abspath(directory), name)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No checkpoint directory {directory}.")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} is not a complete checkpoint: {name} is missing.")
  return path


def _tuples(x):
  """JSON lists back to the tuples the config uses (e.g. text.layer_types)."""
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def load_config(directory: str) -> ml_collections.ConfigDict:
  with open(_check(directory, CONFIG)) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def tokenizer_path(directory: str) -> str:
  return _check(directory, TOKENIZER)


def load(directory: str, dtype=None, shardings=None):
  """(params, config). `dtype` casts every leaf (config.param_dtype follows); `shardings` is one
  jax.sharding.Sharding for all leaves or a matching tree of them (default: the first device)."""
  config = load_config(directory)
  path = _check(directory, PARAMS)
  dtype = None if dtype is None else jnp.dtype(dtype)
  with ocp.StandardCheckpointer() as ckpt:
    try:
      stored = ckpt.metadata(path).item_metadata
    except Exception as e:
      raise ValueError(f"Incomplete or corrupt checkpoint {path}: {e}") from e
    if stored is None:
      raise ValueError(f"Incomplete or corrupt checkpoint {path}: no parameter metadata.")
    stored = stored.tree
    if shardings is None:
      shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
      shardings = jax.tree.map(lambda _: shardings, stored)
    target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, dtype or m.dtype, sharding=s),
                          stored, shardings)
    try:
      params = ckpt.restore(path, target)
    except Exception as e:
      raise ValueError(f"Incomplete or corrupt checkpoint {path}: {e}") from e
  if dtype is not None:
    config.param_dtype = dtype.name
  return params, config
