"""int8 weights: symmetric per-output-channel quantization, and the products computed with them.

A quantized matrix keeps its path and shape in the parameter tree, now int8, with a float scale
beside it named `<name>_scale`, the matrix's shape with 1 on the contracted (input) axes:

  kernel [in..., out...] int8 + kernel_scale [1..., out...]     (Dense, DenseGeneral)
  input_embedding [V, D] int8 + input_embedding_scale [V, 1]    (the tied table: per row, i.e.
                                                                 per output of the LM head)

so that w ~= q * scale with q = round(w / scale), scale = max|w| / 127 over the input axes. Every
other leaf (norms, biases, the patch embedding, the position table, the projector) stays float.
A model computes with int8 weights when its config says `quantize="int8"` (`enabled`);
`quantize_tree` turns a float tree into that model's tree (see `paligemma.quantize_params`).

How a product runs (measured: docs/benchmarks.md, "int8 weights"):
  GPU / TPU  weight-only: `x @ q.astype(dtype) * scale`; XLA fuses the convert into the dot, so
             the weights are read from memory as int8.
  CPU        XLA does not fuse the convert into a dot: it writes a float copy of the weight first.
             With few rows (decoding: at most DYNAMIC_MAX_ROWS), the activations are quantized
             too, per row (absmax / 127), and the product is int8 x int8 -> int32; with many
             rows (prefill, scoring) the product is compute-bound and the weight-only form costs
             the same as float32 while keeping the activations exact. One row (batch-1 decoding)
             is padded to two: XLA:CPU lowers an int8 matrix-vector product by writing an int32
             copy of the whole weight, while two rows take its int8 GEMM, which reads q as is.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

INT8 = "int8"
SCALE_SUFFIX = "_scale"
DYNAMIC_MAX_ROWS = 64  # CPU: rows (batch x tokens) up to which activations are quantized too.


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the model `config` describes computes with int8 weights (config.quantize)."""
  return config.get("quantize", None) == INT8


def quantize(w, axes: tuple[int, ...]):
  """(int8 q, float scale) with w ~= q * scale, scale = max|w| / 127 over `axes` (kept, size 1)."""
  w32 = w.astype(jnp.float32)
  scale = jnp.max(jnp.abs(w32), axis=axes, keepdims=True) / 127.0
  scale = jnp.where(scale == 0, 1.0, scale)  # An all-zero channel stays zero.
  q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
  return q, scale.astype(w.dtype)


_quantize = jax.jit(quantize, static_argnums=1)


def dequantize(q, scale, dtype=jnp.float32):
  return q.astype(dtype) * scale.astype(dtype)


def quantize_tree(params, int8_shapes):
  """A float parameter tree in int8: each leaf `X` that has a sibling `X_scale` in `int8_shapes`
  (the int8 model's tree, e.g. from paligemma.param_shapes) is quantized over the axes where
  `X_scale` has size 1; other leaves are returned as they are. Leaf by leaf, so memory holds at
  most one float leaf more than the result."""
  if not isinstance(int8_shapes, dict):
    return params
  out = {}
  for name, value in params.items():
    scale = int8_shapes.get(name + SCALE_SUFFIX)
    if scale is not None and not isinstance(scale, dict):
      axes = tuple(i for i, n in enumerate(scale.shape) if n == 1)
      out[name], out[name + SCALE_SUFFIX] = _quantize(value, axes)
    elif isinstance(value, dict):
      out[name] = quantize_tree(value, int8_shapes.get(name, {}))
    else:
      out[name] = value
  return out


def is_quantized_tree(params) -> bool:
  """Whether any leaf of `params` is an int8 scale (the tree of a quantized model)."""
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  return any(str(getattr(p[-1], "key", "")).endswith(SCALE_SUFFIX) for p, _ in paths)


def _dot(x, w, contract, **kwargs):
  """x [..., C...] . w, contracting x's last len(contract) axes with w's `contract` axes."""
  x_axes = tuple(range(x.ndim - len(contract), x.ndim))
  return jax.lax.dot_general(x, w, ((x_axes, tuple(contract)), ((), ())), **kwargs)


def matmul(x, q, scale, contract: tuple[int, ...], dtype):
  """x [..., C...] times the int8 matrix q (scale: q's shape, 1 on the `contract` axes) ->
  [..., q's other axes], in `dtype`. The path depends on the backend (module docstring)."""
  n = len(contract)
  out_scale = jnp.squeeze(scale, contract).astype(jnp.float32)  # [out...]
  rows = math.prod(x.shape[:x.ndim - n])
  if jax.default_backend() == "cpu" and rows <= DYNAMIC_MAX_ROWS:
    x32 = x.astype(jnp.float32)
    x_scale = jnp.max(jnp.abs(x32), axis=tuple(range(x.ndim - n, x.ndim)), keepdims=True) / 127.0
    x_scale = jnp.where(x_scale == 0, 1.0, x_scale)
    xq = jnp.round(x32 / x_scale).astype(jnp.int8)
    if rows == 1:
      # One row is a matrix-vector product, which XLA:CPU runs by converting all of q to int32
      # first (10x slower than float32); two rows take its int8 GEMM (YNNPACK), which reads q
      # as int8. The zero row is dropped; row 0 is computed exactly as before.
      pair = jnp.pad(xq.reshape((1,) + x.shape[x.ndim - n:]), ((0, 1),) + ((0, 0),) * n)
      acc = _dot(pair, q, contract, preferred_element_type=jnp.int32)[:1]
      acc = acc.reshape(x.shape[:x.ndim - n] + acc.shape[1:])
    else:
      acc = _dot(xq, q, contract, preferred_element_type=jnp.int32)
    x_scale = x_scale.reshape(x.shape[:x.ndim - n] + (1,) * out_scale.ndim)
    return (acc.astype(jnp.float32) * x_scale * out_scale).astype(dtype)
  y = _dot(x.astype(dtype), q.astype(dtype), contract)
  return (y * out_scale.astype(dtype)).astype(dtype)


class Dense(nn.Module):
  """The int8 twin of nn.Dense / nn.DenseGeneral (contiguous trailing input axes): the same
  `kernel` and `bias` leaves, the kernel in int8, plus `kernel_scale`."""
  features: int | tuple[int, ...]
  axis: int | tuple[int, ...] = -1
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    n_in = len(axes)
    if tuple(a % x.ndim for a in axes) != tuple(range(x.ndim - n_in, x.ndim)):
      raise ValueError(f"quantize.Dense contracts trailing axes of x, not axis={self.axis}.")
    in_shape = x.shape[x.ndim - n_in:]
    kernel = self.param("kernel", nn.initializers.zeros, in_shape + features, jnp.int8)
    scale = self.param("kernel" + SCALE_SUFFIX, nn.initializers.ones, (1,) * n_in + features,
                       self.param_dtype)
    y = matmul(x, kernel, scale, tuple(range(n_in)), self.dtype)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y
