"""LoRA as a functional transform of the parameter tree; the model code never sees adapters.

Each target kernel W gets A [in, r] and B [r, out] and the model runs with

  W_eff = W + (alpha / r) * A @ B

Kernels with more than two axes are viewed as matrices: a scanned layer stack keeps its leading
layer axis (one adapter pair per layer), attention q/k/v kernels [D, heads, head_dim] are
[D, heads * head_dim] and the attention output kernel [heads, head_dim, D] is
[heads * head_dim, D]. B starts at zero, so training starts exactly at the base model.

Adapters mirror the base tree: `adapters["llm"]["layers"]["attn"]["q"]["kernel"] = {"a": .., "b": ..}`.
`merge` is used both inside the loss (gradients reach A and B through it) and to export.
"""

import math
import re

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

# The attention and MLP kernels of every language-model layer.
DEFAULT_TARGETS = r"llm/layers/(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel"


def matrix_axes(path: str, ndim: int) -> tuple[int, int, int]:
  """(leading, fan-in, fan-out) axis counts of the kernel at `path` ('/'-joined) viewed as a matrix."""
  parts = path.split("/")
  lead = 1 if "layers" in parts else 0  # nn.scan stacks a layer's parameters on axis 0.
  fan_out = 2 if re.search(r"attn/(q|k|v)/kernel$", path) else 1  # (heads, head_dim) outputs.
  fan_in = ndim - lead - fan_out
  if fan_in < 1:
    raise ValueError(f"Cannot view {path} ({ndim} axes) as a matrix for LoRA.")
  return lead, fan_in, fan_out


def _matrix_shape(path, shape):
  lead, fan_in, _ = matrix_axes(path, len(shape))
  return tuple(shape[:lead]), math.prod(shape[lead:lead + fan_in]), math.prod(shape[lead + fan_in:])


def target_paths(base, targets: str = DEFAULT_TARGETS) -> list[str]:
  """'/'-joined paths of the base leaves that `targets` (a regex) fully matches."""
  paths = [p for p in traverse_util.flatten_dict(base, sep="/") if re.fullmatch(targets, p)]
  if not paths:
    raise ValueError(f"LoRA targets {targets!r} match no parameter.")
  return sorted(paths)


def init(base, rng, *, rank: int, targets: str = DEFAULT_TARGETS):
  """Float32 adapters for the `targets` kernels of `base`: A ~ N(0, 1/in), B = 0.

  A is drawn on the host from the bits of the JAX key `rng` (no device program to compile).
  """
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
  flat = traverse_util.flatten_dict(base, sep="/")
  draw = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())
  adapters = {}
  for path in target_paths(base, targets):
    lead, fan_in, fan_out = _matrix_shape(path, flat[path].shape)
    a = draw.standard_normal((*lead, fan_in, rank), np.float32) * np.float32(fan_in**-0.5)
    adapters[path] = {"a": jnp.asarray(a), "b": jnp.zeros((*lead, rank, fan_out), jnp.float32)}
  return traverse_util.unflatten_dict(adapters, sep="/")


def delta(path: str, shape, a, b, alpha: float):
  """(alpha / r) * A @ B reshaped to the kernel's `shape`, in float32."""
  update = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
  return (alpha / a.shape[-1]) * update.reshape(shape)


def merge(base, adapters, *, alpha: float, dtype=None):
  """The base tree with every adapted kernel replaced by W + (alpha / r) A @ B.

  Adapted kernels come out in float32 (a bfloat16 sum would round small updates away) unless
  `dtype` is given, e.g. the base dtype when exporting. Other leaves are returned as they are.
  """
  flat = dict(traverse_util.flatten_dict(base, sep="/"))
  for path, ab in traverse_util.flatten_dict(adapters, sep="/", is_leaf=_is_pair).items():
    if path not in flat:
      raise KeyError(f"LoRA adapter for {path}, which the base parameters lack.")
    w = flat[path]
    merged = w.astype(jnp.float32) + delta(path, w.shape, ab["a"], ab["b"], alpha)
    flat[path] = merged.astype(dtype or jnp.promote_types(w.dtype, jnp.float32))
  return traverse_util.unflatten_dict(flat, sep="/")


def _is_pair(_, node):
  return isinstance(node, dict) and set(node) == {"a", "b"}


def num_params(adapters) -> int:
  return sum(x.size for x in jax.tree.leaves(adapters))
