"""SigLIP So400m/14 image encoder, as PaliGemma uses it: no pooling head.

images [B, S, S, 3] in [-1, 1] -> patch tokens [B, N, W], N = (S / patch)^2.

Axis letters: B batch, T tokens, W width, N heads, H head dim, F MLP width.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from paligemma_jax.model import quantize


class Attention(nn.Module):
  """Multi-head self-attention with biases; softmax in float32."""
  num_heads: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  qtype: str | None = None  # "int8" | "int4" kernels (quantize.py).

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    DenseGeneral = quantize.layer(self.qtype, nn.DenseGeneral)
    dense = lambda name: DenseGeneral((self.num_heads, head_dim), dtype=self.dtype,
                                      param_dtype=self.param_dtype, name=name)
    q, k, v = dense("q")(x), dense("k")(x), dense("v")(x)  # [B, T, N, H]
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * head_dim**-0.5, axis=-1).astype(self.dtype)
    out = jnp.einsum("bnts,bsnh->btnh", probs, v)
    return DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                        name="o")(out)


class Mlp(nn.Module):
  """fc1 -> GELU (tanh approximation) -> fc2."""
  mlp_dim: int
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  qtype: str | None = None

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    Dense = quantize.layer(self.qtype, nn.Dense)
    h = jax.nn.gelu(Dense(self.mlp_dim, name="fc1", **kw)(x), approximate=True)
    return Dense(x.shape[-1], name="fc2", **kw)(h)


class Block(nn.Module):
  """Pre-LayerNorm transformer block (nn.scan body: carry in, carry out)."""
  config: ml_collections.ConfigDict
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  qtype: str | None = None

  @nn.compact
  def __call__(self, x, _):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: nn.LayerNorm(epsilon=cfg.norm_eps, name=name, **kw)
    x = x + Attention(cfg.num_heads, name="attn", qtype=self.qtype, **kw)(norm("norm1")(x))
    x = x + Mlp(cfg.mlp_dim, name="mlp", qtype=self.qtype, **kw)(norm("norm2")(x))
    return x, None


class Encoder(nn.Module):
  """Patch embedding + learned positions + `depth` blocks + final LayerNorm."""
  config: ml_collections.ConfigDict
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  remat: bool = False
  qtype: str | None = None  # "int8" | "int4" attention and MLP kernels (quantize.py).

  @nn.compact
  def __call__(self, images):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = cfg.patch_size
    x = nn.Conv(cfg.width, (p, p), strides=(p, p), padding="VALID", name="embedding", **kw)(
        images.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, cfg.width)  # [B, N, W], patches in row-major order.
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), x.shape[1:], self.param_dtype)
    x = x + pos.astype(self.dtype)[None]
    block = nn.remat(Block, prevent_cse=False) if self.remat else Block
    x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=cfg.depth)(cfg, name="layers", qtype=self.qtype, **kw)(x, None)
    return nn.LayerNorm(epsilon=cfg.norm_eps, name="norm", **kw)(x)
