"""Quantized weights, int8 and int4, on qwix: how a matrix is quantized, stored and multiplied.

A quantized matrix keeps its path in the parameter tree, its values now int8 or int4, with a float
scale beside it named `<name>_scale` (qwix's QArray `qvalue` and `scale` as two plain leaves, so
that the converter, Orbax, the sharding rules and the loader read it like any other tree):

  kernel [in..., out...] int8 | int4 + kernel_scale [1 | in..., 1 | blocks, out...]  (Dense,
                                                        DenseGeneral; int8 | int4)
  input_embedding [V, D] int8 | int4 + input_embedding_scale [V, 1 | blocks]  (the tied table, per
                                                        row, i.e. per output of the LM head)

int8: one scale per output channel, w ~= q * scale with scale = max|w| / 127.5 over the inputs
(qwix's symmetric bound). int4: one scale per output channel and per block of the last input axis
(sub-channel quantization; a 4-bit channel-wide scale loses too much to outliers; attention's
output kernel [heads, head_dim, D] has its blocks per head), the block the
largest divisor of that axis in [BLOCK_MIN, BLOCK_MAX] (128 for every Gemma width), the whole
axis when none divides (SigLIP's MLP, 4304 = 16 x 269). Every other leaf (norms, biases, the patch
embedding, the position table, the projector) stays float. A model computes with quantized
weights when its config says `quantize="int8"|"int4"` (`qtype`); `quantize_tree` turns a float
tree into that model's tree (see `paligemma.quantize_params`).

Products are qwix's `dot_general` (docs/benchmarks.md, "Quantized weights", for the measurements):
  GPU / TPU  weight-only, float activations: XLA fuses the dequantization into the dot, so the
             weights are read from memory in 8 or 4 bits.
  CPU        XLA:CPU does not fuse it: it writes a float copy of the weight first. For int8 with
             few rows (decoding: at most DYNAMIC_MAX_ROWS) the activations are quantized too, per
             row, and qwix runs an int8 x int8 -> int32 product, which reads the weight as int8
             (log-probs within 0.025 of float32 at real widths; its gradient is the weight-only
             product's, so LoRA trains over it). One row is padded to two:
             XLA:CPU lowers an int8 matrix-vector product by writing an int32 copy of the whole
             weight, while two rows take its int8 GEMM. Many rows (prefill, scoring) and int4
             stay weight-only: compute-bound, or no int4 GEMM on the CPU.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import qwix

from paligemma_jax import errors

INT8 = "int8"
INT4 = "int4"
QTYPES = {INT8: jnp.int8, INT4: jnp.int4}
SCALE_SUFFIX = "_scale"
DYNAMIC_MAX_ROWS = 64  # CPU, int8: rows (batch x tokens) up to which activations are quantized too.
BLOCK_MIN, BLOCK_MAX = 32, 128  # int4 block sizes along the last input axis.


def checked(name: str | None) -> str | None:
  """`name` if it is "int8", "int4" or None; else InputError naming the choices."""
  if name not in (None, *QTYPES):
    raise errors.InputError(f"quantize={name!r}: choose one of {', '.join(QTYPES)} or None.")
  return name


def qtype(config: ml_collections.ConfigDict) -> str | None:
  """"int8", "int4" or None: the weights the model `config` describes computes with."""
  return checked(config.get("quantize", None))


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the model `config` describes computes with quantized weights."""
  return qtype(config) is not None


def block_size(n: int) -> int:
  """int4's block along an input axis of size n: its largest divisor in [BLOCK_MIN, BLOCK_MAX],
  or n (one block: a scale per output channel) when there is none."""
  for size in range(min(n, BLOCK_MAX), BLOCK_MIN - 1, -1):
    if n % size == 0:
      return size
  return n


def scale_shape(shape: tuple[int, ...], contract: tuple[int, ...], name: str) -> tuple[int, ...]:
  """The scale of a `name` ("int8"/"int4") matrix of `shape` contracted over `contract` axes:
  the matrix's size on the output axes; on the input axes 1 for int8, and for int4 the blocks
  of the last input axis and a scale per index of the others (attention's output kernel
  [heads, head_dim, D]: a block never spans two heads)."""
  out = [1 if a in contract else n for a, n in enumerate(shape)]
  if name == INT4:
    *lead, last = sorted(contract)
    for a in lead:
      out[a] = shape[a]
    out[last] = shape[last] // block_size(shape[last])
  return tuple(out)


def quantize(w, scale_shape_: tuple[int, ...], name: str):
  """(q, scale) with w ~= q * scale, q in `name`'s type, scale of `scale_shape_` (in w's dtype):
  axes where the scale has w's size get a scale each, others are blocks of w's size / the
  scale's (size 1: one block)."""
  channelwise = tuple(a for a, (n, s) in enumerate(zip(w.shape, scale_shape_)) if s == n)
  tiled = {a: n // s for a, (n, s) in enumerate(zip(w.shape, scale_shape_)) if 1 < s < n}
  # In float32: a bfloat16 quotient w / scale rounds to 0.5 steps above 64 before the int8 rounding.
  q = qwix.quantize(w.astype(jnp.float32), QTYPES[name], channelwise_axes=channelwise,
                    tiled_axes=tiled)
  scale = jnp.where(q.scale == 0, 1.0, q.scale)  # An all-zero channel: q is 0 whatever the scale.
  return q.qvalue, scale.astype(w.dtype)


_quantize = jax.jit(quantize, static_argnums=(1, 2))


def dequantize(q, scale, dtype=jnp.float32):
  return qwix.dequantize(qwix.QArray(q, scale.astype(dtype)))


def quantize_tree(params, quantized_shapes):
  """A float parameter tree quantized: each leaf `X` that has a sibling `X_scale` in
  `quantized_shapes` (the quantized model's tree, e.g. from paligemma.param_shapes) becomes X's
  type there, with the scale's shape; other leaves are returned as they are. Leaf by leaf, so
  memory holds at most one float leaf more than the result."""
  if not isinstance(quantized_shapes, dict):
    return params
  out = {}
  for name, value in params.items():
    scale = quantized_shapes.get(name + SCALE_SUFFIX)
    if scale is not None and not isinstance(scale, dict):
      qname = next(n for n, t in QTYPES.items() if quantized_shapes[name].dtype == t)
      out[name], out[name + SCALE_SUFFIX] = _quantize(value, tuple(scale.shape), qname)
    elif isinstance(value, dict):
      out[name] = quantize_tree(value, quantized_shapes.get(name, {}))
    else:
      out[name] = value
  return out


def is_quantized_tree(params) -> bool:
  """Whether any leaf of `params` is a quantization scale (the tree of a quantized model)."""
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  return any(str(getattr(p[-1], "key", "")).endswith(SCALE_SUFFIX) for p, _ in paths)


def matmul(x, q, scale, contract: tuple[int, ...], dtype):
  """x [..., C...] times the quantized matrix (q, scale), contracting x's last len(contract)
  axes with q's `contract` axes -> [..., q's other axes] in `dtype` (qwix's dot_general; the
  product depends on the backend: module docstring)."""
  rows = math.prod(x.shape[:x.ndim - len(contract)])
  if jax.default_backend() == "cpu" and q.dtype == jnp.int8 and rows <= DYNAMIC_MAX_ROWS:
    return _int8_rows(x, q, scale, tuple(contract), jnp.dtype(dtype))
  return _weight_only(x, q, scale, tuple(contract), dtype)


def _weight_only(x, q, scale, contract, dtype):
  x_axes = tuple(range(x.ndim - len(contract), x.ndim))
  y = qwix.dot_general(x.astype(dtype), qwix.QArray(q, scale.astype(dtype)),
                       ((x_axes, contract), ((), ())))
  return y.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _int8_rows(x, q, scale, contract, dtype):
  """The CPU's int8 x int8 product of a few rows (module docstring). Its gradient is the
  weight-only product's (straight through the activations' rounding, which has none): LoRA
  over an int8 base trains through it."""
  n = len(contract)
  lead, inner = x.shape[:x.ndim - n], x.shape[x.ndim - n:]
  rows = math.prod(lead)
  xq = qwix.quantize(x.astype(jnp.float32).reshape((rows,) + inner), jnp.int8,
                     channelwise_axes=(0,))
  if rows == 1:  # A zero row (scale 1) makes the product a GEMM; dropped after it.
    xq = qwix.QArray(jnp.pad(xq.qvalue, ((0, 1),) + ((0, 0),) * n),
                     jnp.pad(xq.scale, ((0, 1),) + ((0, 0),) * n, constant_values=1))
  y = qwix.dot_general(xq, qwix.QArray(q, scale.astype(jnp.float32)),
                       ((tuple(range(1, n + 1)), contract), ((), ())))
  return y[:rows].reshape(lead + y.shape[1:]).astype(dtype)


def _int8_rows_fwd(x, q, scale, contract, dtype):
  return _int8_rows(x, q, scale, contract, dtype), (x, q, scale)


def _int8_rows_bwd(contract, dtype, saved, dy):
  x, q, scale = saved
  _, vjp = jax.vjp(lambda x: _weight_only(x, q, scale, contract, dtype), x)
  return vjp(dy)[0].astype(x.dtype), None, None  # The frozen q and scale have none.


_int8_rows.defvjp(_int8_rows_fwd, _int8_rows_bwd)


def take(q, scale, rows, dtype):
  """Rows `rows` of the quantized table (q [V, D], scale [V, ...]), dequantized: the embedding."""
  return dequantize(q[rows], scale[rows], dtype)


class Dense(nn.Module):
  """The quantized twin of nn.Dense / nn.DenseGeneral (contiguous trailing input axes): the same
  `kernel` and `bias` leaves, the kernel in `qtype`, plus `kernel_scale`."""
  features: int | tuple[int, ...]
  qtype: str = INT8
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
    shape = x.shape[x.ndim - n_in:] + features
    contract = tuple(range(n_in))
    kernel = self.param("kernel", nn.initializers.zeros, shape, QTYPES[self.qtype])
    scale = self.param("kernel" + SCALE_SUFFIX, nn.initializers.ones,
                       scale_shape(shape, contract, self.qtype), self.param_dtype)
    y = matmul(x, kernel, scale, contract, self.dtype)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def layer(qtype_: str | None, float_layer):
  """The layer a model builds for `float_layer` (nn.Dense or nn.DenseGeneral) with `qtype_`
  weights: the float layer itself for None, else this Dense."""
  return float_layer if qtype_ is None else functools.partial(Dense, qtype=qtype_)
