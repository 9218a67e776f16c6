"""PaliGemma: SigLIP image encoder -> linear projector -> Gemma decoder with a prefix-LM mask.

Inputs, for a batch of B examples of T tokens (see `processor.build_prompt`):
  images      [M, S, S, 3] float in [-1, 1]: every image of the batch, each run through the
              image tower once;
  image_index [B, K] int: row b's k-th image is images[image_index[b, k]] (entries past the row's
              own images are ignored); None: one image per row, row b's is images[b] (M = B);
  tokens      [B, T] int: N image tokens (config.image_token_id) per image, in the row's image
              order, then <bos>, prompt, "\\n", [suffix, <eos>]
  input_mask  [B, T] bool: real tokens (False for padding)
  prefix_mask [B, T] bool: the full-attention prefix (images + prompt); suffix tokens are causal

Four entry points share one layer stack:
  __call__     logits at every position, or at the given ones (training's loss), no cache;
  prefill      runs the image and the right-padded prompt, fills a KV cache, returns each row's
               last-token logits;
  extend       causal tokens after the cached ones (scoring suffixes against one cached prompt);
  decode_step  one new token per row, read from and written to the cache (`extend` by one).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from paligemma_jax.model import gemma
from paligemma_jax.model import kv_cache as kv_cache_lib
from paligemma_jax.model import quantize
from paligemma_jax.model import siglip
from paligemma_jax.model.attention_mask import attention_mask


class PaliGemma(nn.Module):
  config: ml_collections.ConfigDict

  def setup(self):
    cfg = self.config
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), remat=cfg.remat,
              qtype=quantize.qtype(cfg))
    self.img = siglip.Encoder(cfg.vision, **kw)
    self.projector = nn.Dense(cfg.text.width, dtype=kw["dtype"], param_dtype=kw["param_dtype"])
    self.llm = gemma.Decoder(cfg.text, **kw, scan_layers=cfg.get("scan_layers", True))

  def embed_image(self, images):
    """[B, S, S, 3] -> [B, N, D]: image features in the text embedding space."""
    return self.projector(self.img(images))

  def embed(self, tokens, images, features=None, image_index=None):
    """Token embeddings with each row's image-token slots replaced, in order, by the features of
    its images: `embed_image(images)`, or `features` [M, N, D] computed before (an image cache).
    Row b's j-th image token takes patch j % N of its image j // N, as transformers'
    masked_scatter places a flat list of image features over the batch's image tokens."""
    is_image = tokens == self.config.image_token_id
    x = self.llm.embed(jnp.where(is_image, 0, tokens))  # The image id may lie past the table.
    if features is None:
      if images is None:
        return x
      features = self.embed_image(images)
    features = features.astype(x.dtype)  # [M, N, D]
    if image_index is not None:  # -> [B, K * N, D]: each row's images, in order.
      features = features[image_index].reshape(tokens.shape[0], -1, features.shape[-1])
    index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
    gathered = jnp.take_along_axis(features, index[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered, x)

  def _masks(self, q_slot, q_prefix, kv_valid, kv_prefix):
    """The full-attention mask, and the sliding-window one if any layer uses it."""
    full = attention_mask(q_slot, q_prefix, kv_valid, kv_prefix)
    if not gemma.layer_is_sliding(self.config.text).any():
      return full, None
    return full, attention_mask(q_slot, q_prefix, kv_valid, kv_prefix, self.config.text.sliding_window)

  def __call__(self, tokens, images, input_mask, prefix_mask, image_index=None,
               return_hidden=False, logits_at=None):
    """All-position logits [B, T, V] (float32), no cache; `logits_at` [B, W] int: the logits at
    those positions only, [B, W, V] (a training loss reads a few text positions, and the tied
    head over every image position was most of a train step's work)."""
    input_mask, prefix_mask = input_mask.astype(bool), prefix_mask.astype(bool)
    slots = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    positions = jnp.maximum(jnp.cumsum(input_mask, axis=1) - 1, 0)
    masks = self._masks(slots, prefix_mask, input_mask, prefix_mask & input_mask)
    hidden, _ = self.llm(self.embed(tokens, images, image_index=image_index), positions, *masks)
    if return_hidden:
      return hidden
    if logits_at is not None:
      hidden = jnp.take_along_axis(hidden, logits_at[..., None], axis=1)
    return self.llm.logits(hidden)

  def prefill(self, tokens, images, input_mask, prefix_mask, cache: kv_cache_lib.KVCache,
              features=None, image_index=None):
    """Runs right-padded prompts into an empty cache; returns (last-token logits [B, V], cache).
    `features` [M, N, D] (then images is None): image features computed before (an image cache)."""
    input_mask, prefix_mask = input_mask.astype(bool), prefix_mask.astype(bool)
    b, t = tokens.shape
    pad = [(0, 0), (0, cache.max_len - t)]
    kv_valid = jnp.pad(input_mask, pad)
    kv_prefix = jnp.pad(prefix_mask & input_mask, pad)
    slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    masks = self._masks(slots, prefix_mask, kv_valid, kv_prefix)
    hidden, cache = self.llm(self.embed(tokens, images, features, image_index), slots, *masks,
                             cache=cache)
    lengths = input_mask.sum(axis=1).astype(jnp.int32)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
    return self.llm.logits(last)[:, 0], cache.replace(end=lengths)

  def extend(self, tokens, cache: kv_cache_lib.KVCache):
    """Causal text tokens [B, S] written from slot cache.end on -> (hidden [B, S, D], cache
    advanced by S slots). They see the cached prompt and each other causally, as suffix tokens."""
    slots = cache.end[:, None] + jnp.arange(tokens.shape[1])  # [B, S]
    kv_valid = jnp.arange(cache.max_len)[None, :] <= slots[:, -1:]
    no_prefix = jnp.zeros_like(kv_valid)
    masks = self._masks(slots, jnp.zeros(tokens.shape, bool), kv_valid, no_prefix)
    hidden, cache = self.llm(self.embed(tokens, None), slots, *masks, cache=cache)
    return hidden, cache.replace(end=cache.end + tokens.shape[1])

  def decode_step(self, tokens, cache: kv_cache_lib.KVCache):
    """tokens [B] at slot cache.end -> (logits [B, V], cache advanced by one slot)."""
    hidden, cache = self.extend(tokens[:, None], cache)
    return self.llm.logits(hidden)[:, 0], cache


def num_image_tokens(config: ml_collections.ConfigDict) -> int:
  return (config.vision.image_size // config.vision.patch_size) ** 2


def images_per_row(images):
  """Training's fixed-shape images -> the model's (images, image_index): [B, S, S, 3] (one per
  row) as they are, with None; [B, K, S, S, 3] (K per row) -> ([B * K, S, S, 3], [B, K])."""
  if images.ndim == 4:
    return images, None
  b, k = images.shape[:2]
  return images.reshape(b * k, *images.shape[2:]), jnp.arange(b * k).reshape(b, k)


def init_cache(config: ml_collections.ConfigDict, batch: int, max_len: int, dtype=None):
  """An empty KV cache for `batch` rows of up to `max_len` tokens (prompt + generated); dtype:
  default the compute dtype, or int8 (see kv_cache.py)."""
  t = config.text
  return kv_cache_lib.init(t.depth, batch, max_len, t.num_kv_heads, t.head_dim,
                           jnp.dtype(dtype or config.dtype))


def cache_bytes_per_token(config: ml_collections.ConfigDict, dtype=None) -> int:
  """Bytes of KV cache one token of one row takes, every layer (int8: with its scales)."""
  return kv_cache_lib.bytes_per_token(jax.eval_shape(lambda: init_cache(config, 1, 1, dtype)))


def dummy_inputs(config: ml_collections.ConfigDict, batch: int = 1):
  """Smallest valid inputs (image tokens + <bos>), for init and shape inference."""
  n, s = num_image_tokens(config), config.vision.image_size
  tokens = jnp.concatenate([jnp.full((batch, n), config.image_token_id), jnp.full((batch, 1), 2)], 1)
  ones = jnp.ones(tokens.shape, bool)
  return tokens, jnp.zeros((batch, s, s, 3), jnp.float32), ones, ones


def init_params(config: ml_collections.ConfigDict, rng):
  """Random parameters with the layout of a converted checkpoint."""
  return PaliGemma(config).init(rng, *dummy_inputs(config))["params"]


def decoding_layout(params):
  """The CPU decoding layout of checkpoint-layout params, that of a model whose config has
  `scan_layers=False` (see gemma.Decoder): the stacked decoder weights `llm/layers` [L, ...]
  apart as `llm/layers_0`.. (each [...]), and each layer's float MLP kernels stored transposed,
  `kernel_out_in` [out, in] (gemma.OutInDense; quantized kernels stay as they are).

  On host (numpy) arrays the layers are views and the transposed kernels views too, copied once
  as they are placed on the device (~1 GB/s on one core: a few seconds for PaliGemma 3B)."""
  llm = dict(params["llm"])
  stacked = llm.pop("layers")
  depth = jax.tree_util.tree_leaves(stacked)[0].shape[0]
  for i in range(depth):
    layer = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
    mlp = {name: {"kernel_out_in": dense["kernel"].T} if set(dense) == {"kernel"} else dense
           for name, dense in layer["mlp"].items()}
    llm[f"layers_{i}"] = {**layer, "mlp": mlp}
  return {**params, "llm": llm}


def param_shapes(config: ml_collections.ConfigDict):
  """The parameter tree as jax.ShapeDtypeStruct leaves, computed without allocating anything."""
  return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))


def quantize_params(params, config: ml_collections.ConfigDict, qtype: str = quantize.INT8):
  """(params, config) of the model with `qtype` ("int8" or "int4") weights (see quantize.py), from
  its float checkpoint-layout params; an already quantized model is returned as it is."""
  if quantize.enabled(config):
    return params, config
  config = config.copy_and_resolve_references()
  config.quantize = quantize.checked(qtype)
  return quantize.quantize_tree(params, param_shapes(config)), config


def float_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of the float model `config` quantizes (itself when float): what a dequantized
  tree, e.g. a LoRA merge over a quantized base, runs with."""
  config = config.copy_and_resolve_references()
  config.quantize = None
  return config
