"""LoRA as a functional transform of the parameter tree; the model code never sees adapters.

Each target kernel W gets A [in, r] and B [r, out], and the model computes with

  W_eff = W + (alpha / r) * A @ B

Kernels with more than two axes are viewed as matrices: a scanned layer stack keeps its leading
layer axis (one adapter pair per layer), attention q/k/v kernels [D, heads, head_dim] are
[D, heads * head_dim] and the attention output kernel [heads, head_dim, D] is
[heads * head_dim, D]. B starts at zero, so training starts exactly at the base model.

Adapters mirror the base tree: `adapters["llm"]["layers"]["attn"]["q"]["kernel"] = {"a": .., "b": ..}`.
Inside the loss, `apply` runs the model with x W + (alpha / r) (x A) B in each adapted layer, so
no W_eff (a float32 copy of every adapted kernel, and its gradient) is ever built; `merge` builds
W_eff for the export.

QLoRA: W may be quantized (int8 / int4 with its `kernel_scale`, model/quantize.py): x W is then
the quantized product, the adapters stay float and act on activations as above, and gradients
flow through the quantized product to x. `merge` dequantizes W before adding the update, so the
merged model is float (quantize it again with paligemma.quantize_params for a quantized export).

Why adapters are ours and not qwix's LoraProvider (the quantized base is qwix's): the same train
step with qwix's adapters was slower at pg1-3b widths (finetune_speed's qwix row,
docs/finetuning.md), and its adapters live inside the model's parameter tree, where the
checkpointed state, the export and the sharding rules would each have to tell them apart.
"""

import functools
import math
import re

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from paligemma_jax import errors
from paligemma_jax.model import quantize

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
    raise errors.InputError(f"lora.targets {targets!r} match no parameter.")
  return sorted(paths)


def init(base, rng, *, rank: int, targets: str = DEFAULT_TARGETS):
  """Float32 adapters for the `targets` kernels of `base`: A ~ N(0, 1/in), B = 0.

  A is drawn on the host from the bits of the JAX key `rng` (no device program to compile).
  """
  if rank < 1:
    raise errors.InputError(f"lora.rank must be >= 1, got {rank}.")
  flat = traverse_util.flatten_dict(base, sep="/")
  with jax.ensure_compile_time_eval():  # Concrete under jax.eval_shape too (shape-only runs).
    seed = np.asarray(jax.random.key_data(rng)).ravel().tolist()
  draw = np.random.default_rng(seed)
  paths = target_paths(base, targets)
  if quantize.is_quantized_tree(base):
    if not_kernels := [p for p in paths if p.rsplit("/", 1)[-1] != "kernel"]:
      raise errors.InputError(f"lora.targets: over a quantized base only layer kernels can be "
                              f"adapted, not {', '.join(not_kernels)}.")
  adapters = {}
  for path in paths:
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
  `dtype` is given, e.g. the base dtype when exporting. A quantized base is dequantized whole
  (adapted or not; its scales dropped), in `dtype` or its scales' dtype: the result is the float
  model. Other leaves are returned as they are.
  """
  flat = dict(traverse_util.flatten_dict(base, sep="/"))
  for path in [p for p in flat if p + quantize.SCALE_SUFFIX in flat]:
    scale = flat.pop(path + quantize.SCALE_SUFFIX)
    flat[path] = quantize.dequantize(flat[path], scale, dtype or scale.dtype)
  for path, ab in _pairs(flat, adapters).items():
    w = flat[path]
    merged = w.astype(jnp.float32) + delta(path, w.shape, ab["a"], ab["b"], alpha)
    flat[path] = merged.astype(dtype or jnp.promote_types(w.dtype, jnp.float32))
  return traverse_util.unflatten_dict(flat, sep="/")


# The name an adapter pair takes beside the kernel it adapts, in the tree `apply` runs on.
_ADAPTER = "lora"
_ADAPTABLE = (nn.Dense, nn.DenseGeneral, nn.Conv, quantize.Dense)


def apply(model: nn.Module, base, adapters, *args, alpha: float, **kwargs):
  """`model.apply` with the `adapters` on `base`, applied to activations: x W + (alpha / r) (x A) B.

  The result equals the model on `merge(base, adapters)`, but memory stays that of the frozen
  base: no merged kernel, and gradients only of A, B and activations. Each adapter pair rides in
  the parameter tree beside its kernel (so nn.scan slices it per layer like the kernel), where an
  interceptor of the Dense, DenseGeneral and Conv layers finds it. Adapters on leaves other than
  a `kernel` (an embedding table, say) are merged.
  """
  flat_base = traverse_util.flatten_dict(base, sep="/")
  pairs = _pairs(flat_base, adapters)
  on_kernels = {p: ab for p, ab in pairs.items() if p.rsplit("/", 1)[-1] == "kernel"}
  others = traverse_util.unflatten_dict(
      {p: ab for p, ab in pairs.items() if p not in on_kernels}, sep="/")
  if jax.tree.leaves(others):  # Never over a quantized base (`init`): merge would dequantize it.
    flat_base = traverse_util.flatten_dict(merge(base, others, alpha=alpha), sep="/")
  flat = dict(flat_base)
  for path, ab in on_kernels.items():
    flat[path.rsplit("/", 1)[0] + "/" + _ADAPTER] = ab
  with nn.intercept_methods(functools.partial(_adapt, alpha=alpha)):
    return model.apply({"params": traverse_util.unflatten_dict(flat, sep="/")}, *args, **kwargs)


def _adapt(next_fun, args, kwargs, context, *, alpha):
  """Adds (alpha / r) (x A) B to the output of a layer whose parameters hold an adapter pair."""
  layer = context.module
  if not layer.has_variable("params", _ADAPTER):
    return next_fun(*args, **kwargs)
  if not isinstance(layer, _ADAPTABLE):
    raise errors.InputError(
        f"lora.targets: {'/'.join(layer.scope.path)}/kernel belongs to a {type(layer).__name__}; "
        "only Dense, DenseGeneral and Conv kernels can be adapted.")
  if context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  ab = layer.get_variable("params", _ADAPTER)
  rank = ab["a"].shape[-1]
  kernel_shape = layer.get_variable("params", "kernel").shape
  fan_out = 1 if isinstance(layer.features, int) else len(layer.features)  # The output axes.
  # The layer itself, with r outputs and kernel A, computes x A (any strides, axes and dtype);
  # a quantized layer's float twin does (A is float).
  if isinstance(layer, quantize.Dense):
    down = nn.DenseGeneral(rank, axis=layer.axis, use_bias=False, dtype=layer.dtype,
                           param_dtype=layer.param_dtype, parent=None)
  else:
    down = layer.clone(parent=None, features=rank, use_bias=False)
  x_a = down.apply({"params": {"kernel": ab["a"].reshape(*kernel_shape[:-fan_out], rank)}},
                   *args, **kwargs)
  b = ab["b"].reshape(rank, *kernel_shape[-fan_out:]).astype(x_a.dtype)
  y = next_fun(*args, **kwargs)
  return (y + _times_b(x_a * (alpha / rank), b)).astype(y.dtype)


@jax.custom_vjp
def _times_b(x_a, b):
  """x_a [..., r] times b [r, *out] -> [..., *out]: the adapter's second product. Its gradients
  are written out so that dB is x_a^T dY over the rows as they lie: from `tensordot`'s own
  transpose rule XLA:CPU wrote dY a second time, transposed, in a loop fusion slower than the
  layer's own kernel products (the LoRA train step at pg1-3b widths, 2+2 layers, batch 2 x 288
  tokens: 12.5 s with it, 11.1 s with this, the same loss)."""
  return jnp.tensordot(x_a, b, axes=1)


def _times_b_fwd(x_a, b):
  return _times_b(x_a, b), (x_a, b)


def _times_b_bwd(saved, dy):
  x_a, b = saved
  rank = b.shape[0]
  b_matrix = b.reshape(rank, -1)
  dy = dy.reshape(-1, b_matrix.shape[1])  # [rows, out]
  d_x_a = jnp.einsum("nf,rf->nr", dy, b_matrix).reshape(x_a.shape)
  d_b = jnp.einsum("nr,nf->rf", x_a.reshape(-1, rank), dy).reshape(b.shape)
  return d_x_a.astype(x_a.dtype), d_b.astype(b.dtype)


_times_b.defvjp(_times_b_fwd, _times_b_bwd)


def _pairs(flat_base, adapters) -> dict:
  """'/'-joined kernel path -> {"a", "b"}, each path checked against the flat base tree."""
  pairs = traverse_util.flatten_dict(adapters, sep="/", is_leaf=_is_pair)
  for path in pairs:
    if path not in flat_base:
      raise KeyError(f"LoRA adapter for {path}, which the base parameters lack.")
  return pairs


def _is_pair(_, node):
  return isinstance(node, dict) and set(node) == {"a", "b"}


def num_params(adapters) -> int:
  return sum(x.size for x in jax.tree.leaves(adapters))
