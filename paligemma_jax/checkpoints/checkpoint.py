"""The converted checkpoint: a directory with the parameters (stored with Orbax), model config
and tokenizer.

  DIR/params/          Orbax StandardCheckpointer tree: the model's `params` (stacked layers)
  DIR/config.json      the model's structure: variant, vision, text, image_token_id and param_dtype
                       (the dtype the weights are stored in); runtime choices (compute dtype, remat,
                       weight layout) are not stored: they are arguments of whoever loads it
  DIR/tokenizer.model  SentencePiece model (optional)

`save` writes into a temporary sibling directory, `.DIR.tmp-HOST.PID.XXXXXXXX`, and renames it
into place, so DIR either holds a complete checkpoint or does not exist. A save removes the
temporary directories that earlier saves of DIR on this host left when killed (their process is
gone); those of live processes and of other hosts are kept. On a multi-host job every process
calls it (each writes the slices of the sharded parameters it holds, into a shared directory);
only process 0 creates, fills in and renames the directory, `.DIR.tmp-shared`.
"""

import json
import logging as std_logging
import os
import shutil

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from paligemma_jax import errors
from paligemma_jax import files
from paligemma_jax import multihost
from paligemma_jax.checkpoints import mapped
from paligemma_jax.model import paligemma

PARAMS, CONFIG, TOKENIZER = "params", "config.json", "tokenizer.model"
# Runtime choices: not stored; a loaded config gets these values, which its users override.
RUNTIME_DEFAULTS = dict(dtype="float32", remat=False, scan_layers=True)
_STRUCTURE = ("variant", "vision", "text", "image_token_id", "param_dtype")  # Stored, all required.


class _OrbaxInfoFilter(std_logging.Filter):
  """Drops Orbax's INFO lines (some twenty per save or restore) unless --v=1 or more, and the
  warning every save without OCDBT gets (Orbax looks for OCDBT files to merge all the same)."""

  def filter(self, record):
    if f"{os.sep}orbax{os.sep}" not in record.pathname or logging.get_verbosity() > logging.INFO:
      return True
    if record.levelno == std_logging.WARNING:
      return "Skipping merge of OCDBT checkpoints" not in record.getMessage()
    return record.levelno > std_logging.INFO


def quiet_orbax_logs():
  """For the command-line entry points: keeps Orbax's warnings and errors, not its progress."""
  logger = logging.get_absl_logger()
  if not any(isinstance(f, _OrbaxInfoFilter) for f in logger.filters):
    logger.addFilter(_OrbaxInfoFilter())


def model_config(structure: dict) -> ml_collections.ConfigDict:
  """A new model config: `structure` (stored runtime fields ignored) plus RUNTIME_DEFAULTS."""
  return ml_collections.ConfigDict({**structure, **RUNTIME_DEFAULTS})


def check_new(directory: str):
  """Refuses an existing output directory, or one that cannot be created because a file stands
  where one of its parents would be (before any work that would be lost; os.makedirs would
  only say "[Errno 17] File exists")."""
  if os.path.exists(directory):
    raise FileExistsError(f"Output directory {directory} already exists; refusing to overwrite it.")
  parent = os.path.dirname(os.path.abspath(directory))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise errors.InputError(f"Output directory {directory} cannot be created: {parent} is a file, "
                            "not a directory.")


def _stored_structure(params, config) -> str:
  """config.json: the structure only, param_dtype being the dtype of the weights written."""
  structure = {k: v for k, v in config.to_dict().items() if k not in RUNTIME_DEFAULTS}
  dtypes = {jnp.dtype(x.dtype).name for x in jax.tree.leaves(params)}
  if len(dtypes) == 1:
    structure["param_dtype"] = dtypes.pop()
  missing = [k for k in _STRUCTURE if k not in structure]
  if missing:
    raise ValueError(f"The model config lacks {', '.join(missing)}.")
  return ml_collections.ConfigDict(structure).to_json(indent=2, sort_keys=True)


def _writer() -> ocp.Checkpointer:
  """Orbax, writing each array's raw bytes into a file of its own (zarr3, no compression, no
  OCDBT), the form checkpoints/mapped.py maps without copying: zstd saved little on float weights and
  made restores 3x slower; OCDBT packs every array into one file TensorStore must copy out of.
  Checkpoints written the earlier ways load all the same, through Orbax."""
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False, use_zarr3=True,
                                                      use_ocdbt=False))


def save(directory: str, params, config: ml_collections.ConfigDict,
         tokenizer_path: str | None = None):
  """Writes a new converted checkpoint at `directory`; refuses to touch an existing one."""
  directory = os.path.abspath(directory)  # Orbax wants absolute paths.
  writer, shared = jax.process_index() == 0, jax.process_count() > 1
  check_new(directory)
  if not config.get("scan_layers", True):
    raise ValueError("checkpoint.save takes the stacked layer layout (scan_layers=True).")
  if tokenizer_path is not None and not os.path.isfile(tokenizer_path):
    raise FileNotFoundError(f"Tokenizer file {tokenizer_path} does not exist.")
  config_json = _stored_structure(params, config)
  with files.directory_aside(directory, writer=writer, shared=shared) as tmp:
    multihost.sync(f"checkpoint.save {directory}: created")
    with _writer() as ckpt:  # Every process: Orbax writes each shard once.
      ckpt.save(os.path.join(tmp, PARAMS), args=ocp.args.PyTreeSave(params))
    if writer:
      with files.open_for_writing(os.path.join(tmp, CONFIG)) as f:
        f.write(config_json)
      if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, os.path.join(tmp, TOKENIZER))
    multihost.sync(f"checkpoint.save {directory}: written")
  multihost.sync(f"checkpoint.save {directory}: renamed")  # Nobody returns before the directory exists.


def _part(directory: str, name: str) -> str:
  """The path of part `name` of the checkpoint `directory`, which must exist."""
  if not os.path.isdir(directory):
    raise errors.InputError(f"{directory}: no such converted checkpoint.")
  path = os.path.join(os.path.abspath(directory), name)
  if not os.path.exists(path):
    raise errors.InputError(f"{directory} is not a complete converted checkpoint: {name} is "
                            "missing.")
  return path


def _tuples(x):
  """JSON lists back to the tuples the config uses (e.g. text.layer_types)."""
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def load_config(directory: str) -> ml_collections.ConfigDict:
  """The stored model structure, with RUNTIME_DEFAULTS for the runtime fields (older checkpoints
  stored them too: they are ignored)."""
  path = _part(directory, CONFIG)
  with open(path, "rb") as f:
    try:
      stored = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError.
      raise errors.InputError(f"{path}: not valid JSON ({e}); {directory} is corrupt.") from None
  if not (isinstance(stored, dict) and all(k in stored for k in _STRUCTURE)
          and isinstance(stored["vision"], dict) and isinstance(stored["text"], dict)):
    raise errors.InputError(f"{path}: not a PaliGemma model config (an object with "
                            f"{', '.join(_STRUCTURE)}); {directory} is corrupt.")
  return model_config(_tuples(stored))


def tokenizer_path(directory: str) -> str:
  return _part(directory, TOKENIZER)


def _corrupt(path: str, why) -> errors.InputError:
  why = str(why).split(" See full TensorStore details")[0]  # Drop TensorStore's page-long spec.
  return errors.InputError(f"Incomplete or corrupt checkpoint {path}: {why[:300]}")


def _shapes(tree) -> dict:
  return {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_shapes(directory: str, stored, config):
  """The stored parameters must be those of the model config.json describes."""
  got, want = _shapes(stored), _shapes(paligemma.param_shapes(config))
  if got != want:
    diff = sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))
    raise errors.InputError(
        f"{directory}: {CONFIG} does not describe the parameters in {PARAMS}/ ({len(diff)} differ, "
        f"e.g. {diff[0]}: stored {got.get(diff[0])}, config {want.get(diff[0])}).")


def _needs_cast(x, dtype) -> bool:
  return dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype


def _place(host, dtype, shardings):
  """Host arrays onto their devices, leaf by leaf, float leaves cast to `dtype` if given: on CPU
  by XLA after the zero-copy hand-over, else on the host first (a device never holds both).
  `shardings`: one for every leaf, or a matching tree."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, host)

  def put(x, s):
    if not _needs_cast(x, dtype):
      return jax.device_put(x, s)  # On CPU an aligned view of a mapped file is kept, not copied.
    if all(d.platform == "cpu" for d in s.device_set):
      return jax.device_put(x, s).astype(dtype)
    return jax.device_put(x.astype(dtype), s)
  return jax.tree.map(put, host, shardings)


def _restore_with_orbax(directory, path, config, dtype, shardings):
  """What mapped.py does not map: TensorStore reads and casts, into the shardings."""
  with ocp.StandardCheckpointer() as ckpt:
    try:
      stored = ckpt.metadata(path).item_metadata
    except Exception as e:  # Orbax raises many kinds; the file is at fault, not the caller.
      raise _corrupt(path, e) from e
    if stored is None:
      raise _corrupt(path, "no parameter metadata.")
    stored = stored.tree
    _check_shapes(directory, stored, config)
    if isinstance(shardings, jax.sharding.Sharding):
      shardings = jax.tree.map(lambda _: shardings, stored)
    cast = lambda m: dtype if _needs_cast(m, dtype) else m.dtype
    target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, cast(m), sharding=s),
                          stored, shardings)  # int8 weights (quantize.py) stay int8.
    try:
      return ckpt.restore(path, target)
    except Exception as e:
      raise _corrupt(path, e) from e


def load(directory: str, dtype=None, shardings=None, scan_layers: bool = True):
  """(params, config). `dtype` casts every float leaf (config.param_dtype follows); `shardings`
  is one jax.sharding.Sharding for all leaves or a matching tree of them (default: the first
  device); scan_layers=False returns the CPU decoding layout (paligemma.decoding_layout).

  A checkpoint that mapped.py can map is not copied on CPU (in the decoding layout its layers
  apart neither; its transposed MLP kernels are, once) and goes straight from the page cache to
  an accelerator; any other is restored through Orbax."""
  config = load_config(directory)
  path = _part(directory, PARAMS)
  dtype = None if dtype is None else jnp.dtype(dtype)
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  one_sharding = isinstance(shardings, jax.sharding.Sharding)
  try:
    host = mapped.read(path)
  except mapped.DamagedArray as e:
    raise _corrupt(path, e) from None
  if host is not None and not one_sharding and any(
      _needs_cast(x, dtype) for x in jax.tree.leaves(host)):
    host = None  # Over a mesh, Orbax casts each device's slice alone, never a whole leaf.
  if host is not None:
    _check_shapes(directory, host, config)
    if not scan_layers and one_sharding:  # Views of views, copied only where transposed.
      host = paligemma.decoding_layout(host)
    params = _place(host, dtype, shardings)
  else:
    params = _restore_with_orbax(directory, path, config, dtype, shardings)
  if not scan_layers and "layers" in params["llm"]:
    params = paligemma.decoding_layout(params)
  if dtype is not None:
    config.param_dtype = dtype.name
  config.scan_layers = scan_layers
  return params, config
