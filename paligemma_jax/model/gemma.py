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

  @nn.compact
  def __call__(self, x):
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    Dense = quantize.layer(self.qtype, nn.Dense)
    gate = jax.nn.gelu(Dense(self.mlp_dim, name="gate", **kw)(x), approximate=True)
    return Dense(x.shape[-1], name="down", **kw)(gate * Dense(self.mlp_dim, name="up", **kw)(x))


class Block(nn.Module):
  """One decoder layer; the nn.scan body. Gemma 2 adds norms after attention and MLP."""
  config: ml_collections.ConfigDict
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  qtype: str | None = None

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
    h = Mlp(cfg.mlp_dim, self.dtype, self.param_dtype, self.qtype, name="mlp")(
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
  # grow with depth. False: separate blocks `layers_0`..`layers_{L-1}`, for decoding: XLA on CPU
  # copies a weight sliced out of a stacked array before a matrix-vector product, which costs
  # more than the product itself (`paligemma.unstack_layers` converts the parameters).
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
      self.blocks = [block(cfg, self.dtype, self.param_dtype, self.qtype, name=f"layers_{i}")
                     for i in range(cfg.depth)]
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
    return tied_head(hidden, self.input_embedding.astype(self.dtype))


# Up to this many rows, XLA:CPU runs the head as table @ hidden.T (see tied_head).
HEAD_TABLE_FIRST_MAX_ROWS = 128


def tied_head(hidden, table):
  """hidden [..., D] @ table [V, D].T -> logits [..., V].

  On CPU, 2 to HEAD_TABLE_FIRST_MAX_ROWS rows (decode steps, beams, prefill's last positions) are
  computed as table @ hidden.T ([V, R]) and transposed: XLA:CPU's library GEMM streams its left
  operand and repacks its right one per call, so with the 2.1 GB table on the left an 8-row
  head reads the table about once (~70 ms, at the bandwidth limit) instead of ~250 ms; the
  barrier keeps XLA from folding the transpose back into the product. One row keeps
  `hidden @ table.T`, which XLA runs as a matrix-vector product at the limit, and more rows
  (compute-bound) keep it too. Results equal within float rounding (the summation order).
  """
  rows = math.prod(hidden.shape[:-1])
  if jax.default_backend() != "cpu" or not 1 < rows <= HEAD_TABLE_FIRST_MAX_ROWS:
    # `hidden @ table.T` lowers to a faster XLA CPU dot than einsum("btd,vd->btv") (2x at batch 1).
    return hidden @ table.T
  flat = hidden.reshape(rows, hidden.shape[-1])
  by_vocab = jax.lax.dot_general(table, flat, (((1,), (1,)), ((), ())))  # [V, R]
  return jax.lax.optimization_barrier(by_vocab).T.reshape(*hidden.shape[:-1], table.shape[0])
