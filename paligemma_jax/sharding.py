"""Sharding PaliGemma over a device mesh with named axes `data`, `fsdp` and `tensor`.

  data    the batch is split, parameters are replicated (pure data parallelism);
  fsdp    the batch is split AND every big parameter is split over its model width (D or W),
          gathered layer by layer when used (fully sharded data parallelism, ZeRO-3);
  tensor  attention heads and the MLP width (and the vocabulary) are split, so each device
          computes a slice of every layer (Megatron-style tensor parallelism).

Parameters get a PartitionSpec from `RULES` (a regex on the '/'-joined path, e.g.
`llm/layers/attn/q/kernel`, -> one entry per dimension). The scanned layer axis L is never split.
Each leaf is checked on its own: a dimension that its mesh axes do not divide stays whole, so
every mesh works for every model (e.g. PaliGemma 1's single kv head on `tensor:2`). The same rules
apply to anything laid out like the parameters (optimizer moments: paths ending in a parameter
path). The KV cache and batches are split over `data` x `fsdp` along the batch, and the cache's
kv heads over `tensor`.

Shardings are plain `NamedSharding`s: pass them to `checkpoint.load(..., shardings=...)` so each
device restores only its own slices (no host ever holds a whole 28B model), to
`jax.device_put`, or to `jax.jit(..., in_shardings=..., out_shardings=...)`; XLA's partitioner
inserts the collectives.

Multi-host jobs: see multihost.py (joining the job, each host's share, who writes).
"""

import math
import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from paligemma_jax.model import kv_cache as kv_cache_lib

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # The batch dimension is split over both.
_REST_ORDER = ("fsdp", "data", "tensor")  # Which unnamed axis takes the remaining devices.

F, T = "fsdp", "tensor"
# (regex for the end of the path, one entry per dimension). Entries: None (whole), a mesh axis, or a
# tuple of axes. Widths (D, W) go to fsdp; heads, MLP width and vocabulary to tensor.
RULES = (
    # SigLIP. Kernels [L, W, N, H] / [L, N, H, W] / [L, W, F] / [L, F, W]; biases and norms are small.
    (r"img/embedding/kernel$", (None, None, None, F)),  # [P, P, 3, W]
    (r"img/pos_embedding$", (None, F)),  # [N_img, W]
    (r"img/layers/attn/(q|k|v)/kernel$", (None, F, T, None)),
    (r"img/layers/attn/(q|k|v)/bias$", (None, T, None)),
    (r"img/layers/attn/o/kernel$", (None, T, None, F)),
    (r"img/layers/mlp/fc1/kernel$", (None, F, T)),
    (r"img/layers/mlp/fc1/bias$", (None, T)),
    (r"img/layers/mlp/fc2/kernel$", (None, T, F)),
    (r"img/layers/(attn/o|mlp/fc2)/bias$", (None, None)),
    (r"img/layers/norm(1|2)/(scale|bias)$", (None, None)),
    (r"img/(embedding/bias|norm/scale|norm/bias)$", (None,)),
    # Projector [W, D]: split like the other input-side kernels (q, gate, fc1).
    (r"projector/kernel$", (F, T)),
    (r"projector/bias$", (None,)),
    # Gemma. Embedding [V, D]; q [L, D, N, H]; k, v [L, D, K, H]; o [L, N, H, D]; MLP [L, D, F], [L, F, D].
    (r"llm/embedder/input_embedding$", (T, F)),
    (r"llm/layers/attn/(q|k|v)/kernel$", (None, F, T, None)),
    (r"llm/layers/attn/o/kernel$", (None, T, None, F)),
    (r"llm/layers/mlp/(gate|up)/kernel$", (None, F, T)),
    (r"llm/layers/mlp/down/kernel$", (None, T, F)),
    (r"llm/layers/\w+_norm/scale$", (None, None)),
    (r"llm/final_norm/scale$", (None,)),
)
CACHE_K_V = (None, BATCH, None, T, None)  # [L, B, S, K, H]


def parse_mesh(spec: str | None, num_devices: int) -> dict[str, int]:
  """'data:2,fsdp:2,tensor:2' -> {'data': 2, 'fsdp': 2, 'tensor': 2}, using exactly num_devices.

  One axis may be -1: it takes the devices left over. Without one, the first unnamed axis of
  fsdp, data, tensor takes them; other unnamed axes are 1.
  """
  sizes = {}
  for item in filter(None, (s.strip() for s in (spec or "").split(","))):
    name, _, size = item.partition(":")
    name = name.strip()
    if name not in AXES:
      raise ValueError(f"Unknown mesh axis {name!r} in {spec!r}; the axes are {', '.join(AXES)}.")
    if name in sizes:
      raise ValueError(f"Mesh axis {name!r} appears twice in {spec!r}.")
    try:
      sizes[name] = int(size) if size.strip() else -1
    except ValueError:
      raise ValueError(f"Mesh axis size {size!r} in {spec!r} is not an integer.") from None
    if sizes[name] == 0 or sizes[name] < -1:
      raise ValueError(f"Mesh axis {name} has size {sizes[name]} in {spec!r}; use a positive size or -1.")
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) > 1:
    raise ValueError(f"At most one mesh axis may be -1 (the rest of the devices); {spec!r} has {rest}.")
  if not rest:
    rest = [a for a in _REST_ORDER if a not in sizes][:1]
  known = math.prod(s for a, s in sizes.items() if a not in rest)
  if num_devices % known or (not rest and known != num_devices):
    raise ValueError(f"Mesh {spec!r} needs {known} devices{' (or a multiple)' if rest else ''}, "
                     f"but there are {num_devices}.")
  return {a: (num_devices // known if a in rest else sizes.get(a, 1)) for a in AXES}


def mesh_from_string(spec: str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes (data, fsdp, tensor) over all devices (every process's), e.g. 'fsdp:4,tensor:2'.

  `jax.make_mesh` orders the devices for the interconnect topology (TPU rings); `tensor`, the
  chattiest axis, is the innermost one, so it spans neighbouring devices.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = parse_mesh(spec, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def mesh_of(tree) -> Mesh | None:
  """The mesh a tree's arrays are sharded over, if they are NamedSharding-sharded."""
  for leaf in jax.tree.leaves(tree):
    if isinstance(getattr(leaf, "sharding", None), NamedSharding):
      return leaf.sharding.mesh
  return None


def _fit(shape, template, mesh: Mesh) -> P:
  """The PartitionSpec of `template` for `shape`: size-1 axes dropped, and per dimension the
  longest prefix of its axes whose devices divide it (else the dimension stays whole)."""
  spec = []
  for dim, entry in zip(shape, template):
    axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if mesh.shape[a] > 1)
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes = axes[:-1]
    spec.append(axes[0] if len(axes) == 1 else axes or None)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def rule_for(path: str):
  """The template of the first RULES regex matching whole components at the end of the
  '/'-joined path (`opt_state/0/mu/llm/...` matches like `llm/...`), or None. A quantized
  matrix's scale `X_scale` (quantize.py: X's rank, 1 on the input axes but int4's blocks) takes
  X's rule; `_fit` splits a block axis like X's input axis where the devices divide it."""
  path = path.removesuffix("_scale")
  return next((template for pattern, template in RULES if re.search(f"(^|/){pattern}", path)), None)


def param_specs(tree, mesh: Mesh, strict: bool = True):
  """A PartitionSpec per leaf (arrays, ShapeDtypeStructs, Orbax metadata: anything with .shape).

  strict: every non-scalar leaf must match a rule of its rank (for the model's parameters);
  otherwise unmatched leaves are replicated (e.g. for optimizer states with extra leaves).
  """
  def spec(path, leaf):
    shape, name = tuple(leaf.shape), path_str(path)
    template = rule_for(name)
    if template is not None and len(template) == len(shape):
      return _fit(shape, template, mesh)
    if strict and shape:
      why = "no rule matches" if template is None else f"its rule has {len(template)} dimensions"
      raise ValueError(f"Cannot shard parameter {name} {shape}: {why} (see sharding.RULES).")
    return P()
  return jax.tree_util.tree_map_with_path(spec, tree)


def param_shardings(tree, mesh: Mesh, strict: bool = True):
  """NamedShardings for a parameter-shaped tree; e.g. Orbax restore targets:
  `checkpoint.load(dir, shardings=param_shardings(paligemma.param_shapes(config), mesh))`."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(tree, mesh, strict))


def shard_params(params, mesh: Mesh, strict: bool = True):
  """Places (host or device) parameters onto the mesh; each device receives only its slices."""
  return jax.device_put(params, param_shardings(params, mesh, strict))


def state_shardings(state, mesh: Mesh):
  """Shardings for a train state (objective.init_state: params, opt_state, step, rng): parameters
  and optimizer moments follow RULES; scalars, PRNG keys and LoRA adapters are replicated."""
  return param_shardings(state, mesh, strict=False)


def cache_shardings(cache: kv_cache_lib.KVCache, mesh: Mesh) -> kv_cache_lib.KVCache:
  """k, v [L, B, S, K, H] and an int8 cache's scales [L, B, S, K]: batch over data x fsdp, kv heads
  over tensor; end [B] like the batch."""
  split = lambda x: NamedSharding(mesh, _fit(x.shape, CACHE_K_V[:x.ndim], mesh))
  return cache.replace(**{name: split(x) for name, x in cache.slot_arrays().items()},
                       end=NamedSharding(mesh, _fit(cache.end.shape, (BATCH,), mesh)))


def batch_sharding(shape, mesh: Mesh) -> NamedSharding:
  """Split along the first (batch) dimension over data x fsdp, as far as it divides."""
  return NamedSharding(mesh, _fit(shape, (BATCH,), mesh) if len(shape) else P())


def shard_batch(batch, mesh: Mesh, process_local: bool = False):
  """Places a batch (tree of host arrays) on the mesh, split along the batch dimension.

  process_local=False: every process holds the same global batch (e.g. the same seeded loader
  on every host) and copies only the rows its own devices need. True: each process passes only
  its own rows (see `multihost.host_slice`); the global batch is their concatenation in process order.
  """
  def put(x):
    x = np.asarray(x)
    if not process_local:
      return jax.make_array_from_callback(x.shape, batch_sharding(x.shape, mesh), lambda i: x[i])
    global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
    return jax.make_array_from_process_local_data(batch_sharding(global_shape, mesh), x, global_shape)
  return jax.tree.map(put, batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def constrain(tree, shardings_fn, mesh: Mesh | None):
  """`with_sharding_constraint(tree, shardings_fn(tree, mesh))` inside jit; a no-op without a mesh."""
  return tree if mesh is None else jax.lax.with_sharding_constraint(tree, shardings_fn(tree, mesh))


def describe(tree, mesh: Mesh, strict: bool = True) -> str:
  """One line per leaf: path, shape, spec and the bytes each device holds (for logs and docs)."""
  lines = []
  specs = jax.tree_util.tree_flatten_with_path(param_specs(tree, mesh, strict))[0]
  for (path, leaf), (_, spec) in zip(jax.tree_util.tree_flatten_with_path(tree)[0], specs):
    local = NamedSharding(mesh, spec).shard_shape(tuple(leaf.shape))
    nbytes = math.prod(local) * np.dtype(leaf.dtype).itemsize
    lines.append(f"{path_str(path):45s} {str(tuple(leaf.shape)):28s} {str(spec):40s} {nbytes / 2**20:10.1f} MiB")
  return "\n".join(lines)


def bytes_per_device(tree, mesh: Mesh, strict: bool = True) -> int:
  """The largest per-device footprint of a sharded tree (all devices hold equal shards here)."""
  specs = jax.tree.leaves(param_specs(tree, mesh, strict), is_leaf=lambda x: isinstance(x, P))
  return sum(math.prod(NamedSharding(mesh, s).shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree.leaves(tree), specs))
