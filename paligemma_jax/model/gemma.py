"""Gemma (PaliGemma 1) and Gemma 2 (PaliGemma 2) decoder with a tied LM head.

embeddings [B, T, D] -> `depth` blocks (scanned) -> RMSNorm -> hidden [B, T, D];
`logits` applies the tied head (and Gemma 2's final softcap).

Axis letters: B batch, T query tokens, S key slots, D width, N query heads, K kv heads,
G query heads per kv head (N = K * G), H head dim, F MLP width, V vocabulary, L layers.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from paligemma_jax.model import kv_cache
from paligemma_jax.model import quantize


def layer_is_sliding(cfg: ml_collections.ConfigDict) -> np.ndarray:
  """[L] bool: which layers use the sliding window (Gemma 2: the even-indexed ones)."""
  if not cfg.sliding_window:
    return np.zeros(cfg.depth, bool)
  if cfg.layer_types:
    if len(cfg.layer_types) != cfg.depth:
      raise ValueError(f"text.layer_types has {len(cfg.layer_types)} entries for {cfg.depth} layers.")
    return np.array([t == "sliding_attention" for t in cfg.layer_types])
  return np.arange(cfg.depth) % 2 == 0 if cfg.family == "gemma2" else np.zeros(cfg.depth, bool)


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) * (1 + scale), computed in float32 as the reference does."""
  eps: float = 1e-6
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def apply_rope(x, positions, base: float):
  """Rotary embedding with the half-split layout: x [B, T, N, H], positions [B, T]."""
  head_dim = x.shape[-1]
  inv_freq = 1.0 / base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def softcap(x, cap: float):
  return jnp.tanh(x / cap) * cap if cap else x


class Attention(nn.Module):
  """Grouped-query attention with RoPE, optional logit softcap, optional KV cache."""
  config: ml_collections.ConfigDict
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  qtype: str | None = None  # "int8" | "int4" kernels (quantize.py).

  @nn.compact
  def __call__(self, x, positions, mask, cache=None, layer=None):
    cfg = self.config
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    DenseGeneral = quantize.layer(self.qtype, nn.DenseGeneral)
    q = DenseGeneral((cfg.num_heads, cfg.head_dim), name="q", **kw)(x)  # [B, T, N, H]
    k = DenseGeneral((cfg.num_kv_heads, cfg.head_dim), name="k", **kw)(x)  # [B, T, K, H]
    v = DenseGeneral((cfg.num_kv_heads, cfg.head_dim), name="v", **kw)(x)
    q, k = apply_rope(q, positions, cfg.rope_base), apply_rope(k, positions, cfg.rope_base)

    if cache is not None:  # Write this step's keys/values, then attend over every slot.
      cache = kv_cache.write_layer(cache, layer, k, v)
      k, v = kv_cache.read_layer(cache, layer, self.dtype)  # [B, S, K, H]

    b, t, n, h = q.shape
    q = q.reshape(b, t, cfg.num_kv_heads, n // cfg.num_kv_heads, h)  # [B, T, K, G, H]
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = softcap(logits * cfg.query_pre_attn_scalar**-0.5, cfg.attn_logit_softcap)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h)
    out = DenseGeneral(x.shape[-1], axis=(-2, -1), name="o", **kw)(out)
    return out, cache


class Mlp(nn.Module):
  """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""
  mlp_dim: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  qtype: str | None = None
  out_in: bool = False  # Float kernels stored [out, in] (OutInDense): the CPU decoding layout.

  @nn.compact
  def __call__(self, x):
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    Dense = OutInDense if self.out_in else quantize.layer(self.qtype, nn.Dense)
    gate = jax.nn.gelu(Dense(self.mlp_dim, name="gate", **kw)(x), approximate=True)
    return Dense(x.shape[-1], name="down", **kw)(gate * Dense(self.mlp_dim, name="up", **kw)(x))


class OutInDense(nn.Module):
  """nn.Dense without bias whose kernel is stored transposed, `kernel_out_in` [out, in], and
  multiplied by `dot_out_in`: the MLP's layout for decoding on CPU, where a weight on the right
  of a product with a few rows is repacked on every call (see dot_out_in). Only the decoding
  layout (paligemma.decoding_layout) has it; checkpoints and training keep nn.Dense's [in, out]."""
  features: int
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    assert not self.use_bias, "The decoder's layers have no biases."
    kernel = self.param("kernel_out_in", nn.initializers.lecun_normal(in_axis=1, out_axis=0),
                        (self.features, x.shape[-1]), self.param_dtype)
    return dot_out_in(x.astype(self.dtype), kernel.astype(self.dtype))


class Block(nn.Module):
  """One decoder layer; the nn.scan body. Gemma 2 adds norms after attention and MLP."""
  config: ml_collections.ConfigDict
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  qtype: str | None = None
  decoding_layout: bool = False  # Float MLP kernels [out, in] (paligemma.decoding_layout).

  @nn.compact
  def __call__(self, carry, layer_inputs, positions, full_mask, sliding_mask):
    cfg = self.config
    x, cache = carry
    layer, is_sliding = layer_inputs
    mask = full_mask if sliding_mask is None else jnp.where(is_sliding, sliding_mask, full_mask)
    norm = lambda name: RMSNorm(cfg.norm_eps, self.param_dtype, name=name)
    post_norms = cfg.family == "gemma2"

    h, cache = Attention(cfg, self.dtype, self.param_dtype, self.qtype, name="attn")(
        norm("pre_attention_norm")(x), positions, mask, cache, layer)
    x = x + (norm("post_attention_norm")(h) if post_norms else h)
    h = Mlp(cfg.mlp_dim, self.dtype, self.param_dtype, self.qtype,
            out_in=self.decoding_layout and self.qtype is None, name="mlp")(
        norm("pre_ffw_norm")(x))
    x = x + (norm("post_ffw_norm")(h) if post_norms else h)
    return (x, cache), None


class Decoder(nn.Module):
  """Token embedding, the scanned blocks, the final norm and the tied LM head."""
  config: ml_collections.ConfigDict
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  remat: bool = False
  qtype: str | None = None  # "int8" | "int4" matrices and embedding table (quantize.py).
  # True: one scanned block over stacked [L, ...] weights (`layers`), so compile time does not
  # grow with depth. False: the CPU decoding layout (`paligemma.decoding_layout` converts the
  # parameters): separate blocks `layers_0`..`layers_{L-1}`, as XLA on CPU copies a weight sliced
  # out of a stacked array before a matrix-vector product, which costs more than the product
  # itself; and float MLP kernels stored [out, in] (OutInDense), as XLA:CPU repacks a product's
  # right operand on every call.
  scan_layers: bool = True

  def setup(self):
    cfg = self.config
    self.embedder = Embedder(cfg.vocab_size, cfg.width, self.dtype, self.param_dtype,
                             self.qtype)
    block = nn.remat(Block, prevent_cse=False) if self.remat else Block
    if self.scan_layers:
      self.layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.depth)(
                                cfg, self.dtype, self.param_dtype, self.qtype)
    else:
      self.blocks = [block(cfg, self.dtype, self.param_dtype, self.qtype, decoding_layout=True,
                           name=f"layers_{i}") for i in range(cfg.depth)]
    self.final_norm = RMSNorm(cfg.norm_eps, self.param_dtype)

  def embed(self, tokens):
    return self.embedder.encode(tokens)

  def __call__(self, x, positions, full_mask, sliding_mask=None, cache=None):
    """x [B, T, D] embeddings -> hidden [B, T, D], and the cache with this step written."""
    cfg = self.config
    carry = (x.astype(self.dtype), cache)
    if self.scan_layers:
      layer_inputs = (jnp.arange(cfg.depth), jnp.asarray(layer_is_sliding(cfg)))
      carry, _ = self.layers(carry, layer_inputs, positions, full_mask, sliding_mask)
    else:
      for layer, (block, is_sliding) in enumerate(zip(self.blocks, layer_is_sliding(cfg))):
        carry, _ = block(carry, (layer, is_sliding), positions, full_mask, sliding_mask)
    x, cache = carry
    return self.final_norm(x), cache

  def logits(self, hidden):
    return softcap(self.embedder.decode(hidden).astype(jnp.float32), self.config.final_logit_softcap)


class Embedder(nn.Module):
  """The token table, shared by the input embedding and the LM head. Quantized: one scale per row
  (int8) or per row and block of the width (int4), quantize.py."""
  vocab_size: int
  width: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  qtype: str | None = None

  def setup(self):
    shape = (self.vocab_size, self.width)
    if self.qtype:
      self.input_embedding = self.param("input_embedding", nn.initializers.zeros, shape,
                                        quantize.QTYPES[self.qtype])
      self.input_embedding_scale = self.param(
          "input_embedding" + quantize.SCALE_SUFFIX, nn.initializers.ones,
          quantize.scale_shape(shape, (1,), self.qtype), self.param_dtype)
    else:
      self.input_embedding = self.param("input_embedding", nn.initializers.normal(1.0), shape,
                                        self.param_dtype)

  def encode(self, tokens):
    # The reference multiplies by sqrt(width) rounded to the parameter dtype (48.0 for 2304 in bf16).
    normalizer = jnp.asarray(self.width**0.5, self.param_dtype).astype(self.dtype)
    if self.qtype:
      x = quantize.take(self.input_embedding, self.input_embedding_scale, tokens, self.dtype)
    else:
      x = self.input_embedding[tokens].astype(self.dtype)
    return x * normalizer

  def decode(self, hidden):
    if self.qtype:
      return quantize.matmul(hidden, self.input_embedding, self.input_embedding_scale, (1,),
                             self.dtype)
    return dot_out_in(hidden, self.input_embedding.astype(self.dtype))  # The table is [V, D].


# Up to this many rows, XLA:CPU runs dot_out_in with the weight on the left.
WEIGHT_FIRST_MAX_ROWS = 128


def dot_out_in(x, w):
  """x [..., in] @ w [out, in].T -> [..., out]: the tied head (w the [V, D] table) and the CPU
  decoding layout's MLP (OutInDense).

  On CPU, up to WEIGHT_FIRST_MAX_ROWS rows (decode steps, beams, prefill's last positions) are
  computed as w @ x.T ([out, R]) and transposed: XLA:CPU's library GEMM streams its left operand
  and repacks its right one per call, so with the weight on the left an 8-row product reads it
  about once, at the bandwidth limit (the 2.1 GB head: ~70 ms instead of ~250 ms; a [2048, 16384]
  MLP kernel 4.4 instead of 9.3 ms, docs/benchmarks.md); the barrier keeps XLA from folding the
  transpose back into the product. One row is then a matrix-vector product, whereas `x @ w.T`
  of one row can make XLA transpose w whole first (a [2048, 16384] kernel: 290 ms instead of 8).
  More rows (compute-bound) keep `x @ w.T`, as fast there as an [in, out] weight. Results equal
  within float rounding (the summation order).
  """
  rows = math.prod(x.shape[:-1])
  if jax.default_backend() != "cpu" or rows > WEIGHT_FIRST_MAX_ROWS:
    # `x @ w.T` lowers to a faster XLA CPU dot than einsum("btd,vd->btv") (2x at batch 1).
    return x @ w.T
  flat = x.reshape(rows, x.shape[-1])
  by_output = jax.lax.dot_general(w, flat, (((1,), (1,)), ((), ())))  # [out, R]
  return jax.lax.optimization_barrier(by_output).T.reshape(*x.shape[:-1], w.shape[0])
