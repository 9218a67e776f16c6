"""A preallocated, functional key/value cache for the Gemma decoder.

The cache is a pytree (so it can be carried through `jax.lax.while_loop`, donated to a jitted
function and sharded) holding every layer's keys and values for `max_len` slots:

  k, v [L, B, S, K, H]              layers, batch, slots, kv heads, head dim
  end  [B]                          slots written so far in each row = the next write slot
  k_scale, v_scale [L, B, S, K]     int8 caches only (None otherwise): float32 scales

Prompts are right-padded, so each row's tokens occupy slots 0..end-1 and a token's slot is also
its position. Rows advance independently: a short prompt starts decoding at its own length, so
batching prompts of different lengths changes no row's result.

An int8 cache (`init(..., dtype=jnp.int8)`) stores each token's key (and value) of each kv head
as H int8 numbers and one float32 scale: symmetric absmax over the head dim (`quantize`), so a
slot takes H + 4 bytes per head instead of 2H (bfloat16) or 4H (float32). `write_layer`
quantizes as it writes; `read_layer` gives the layer's keys and values back in the compute
dtype (`dequantize`). A token is quantized on its own, once, when it is written: prefill and
decode steps store it alike, and rows never affect each other.
"""

import math

import flax
import jax
import jax.numpy as jnp

INT8_MAX = 127


@flax.struct.dataclass
class KVCache:
  k: jax.Array
  v: jax.Array
  end: jax.Array
  k_scale: jax.Array | None = None  # int8 caches: [L, B, S, K] float32.
  v_scale: jax.Array | None = None

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  @property
  def quantized(self) -> bool:
    return self.k_scale is not None

  def slot_arrays(self) -> dict:
    """The arrays with a slot axis ([L, B, S, ...]): k, v and, in an int8 cache, their scales."""
    arrays = dict(k=self.k, v=self.v)
    return arrays | (dict(k_scale=self.k_scale, v_scale=self.v_scale) if self.quantized else {})


def checked_dtype(dtype) -> jnp.dtype:
  """`dtype` as a dtype, if a cache can hold it: a float dtype or int8; else ValueError."""
  try:
    checked = jnp.dtype(dtype)
  except TypeError:
    checked = None
  if checked is None or not (jnp.issubdtype(checked, jnp.floating) or checked == jnp.int8):
    raise ValueError(f"A KV cache holds a float dtype or int8, not {dtype!r}.")
  return checked


def init(num_layers, batch, max_len, num_kv_heads, head_dim, dtype=jnp.float32) -> KVCache:
  """An empty cache of `max_len` slots per row; keys and values in `dtype`, a float dtype or
  int8 (then with float32 scales)."""
  dtype = checked_dtype(dtype)
  shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
  cache = KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                  end=jnp.zeros((batch,), jnp.int32))
  if dtype != jnp.int8:
    return cache
  return cache.replace(k_scale=jnp.zeros(shape[:-1], jnp.float32),
                       v_scale=jnp.zeros(shape[:-1], jnp.float32))


def bytes_per_token(cache: KVCache) -> int:
  """Bytes one slot of one row takes (keys, values and any scales, every layer); `cache` may be
  shapes (jax.eval_shape)."""
  return sum(math.prod(x.shape[:1] + x.shape[3:]) * jnp.dtype(x.dtype).itemsize
             for x in cache.slot_arrays().values())


def quantize(x):
  """x [..., H] -> (int8 [..., H], float32 scale [...]): symmetric absmax over the last axis,
  x ~ q * scale with |error| <= scale / 2. An all-zero vector gets scale 0 and q 0."""
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1) / INT8_MAX
  q = jnp.round(x / jnp.where(scale == 0, 1, scale)[..., None])
  return jnp.clip(q, -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


def dequantize(q, scale, dtype):
  """int8 [..., H] and scale [...] -> q * scale [..., H], computed in `dtype`."""
  return q.astype(dtype) * scale[..., None].astype(dtype)


def write(buffer, layer, new, start):
  """Writes `new` [B, T, ...] into `buffer` [L, B, S, ...] at `layer`, row b from slot start[b]
  (clamped to 0..S-T, as `jax.lax.dynamic_update_slice` clamps).

  One scatter of B x T slots, which XLA updates in place inside a jitted loop. (A per-row
  dynamic_update_slice under vmap made XLA:CPU copy the whole cache at every layer's write.)
  """
  b, t = new.shape[:2]
  first = jnp.clip(start, 0, buffer.shape[2] - t)
  slots = first[:, None] + jnp.arange(t)  # [B, T]
  return buffer.at[layer, jnp.arange(b)[:, None], slots].set(
      new.astype(buffer.dtype), indices_are_sorted=True, unique_indices=True)


def write_layer(cache: KVCache, layer, k, v) -> KVCache:
  """`cache` with keys and values k, v [B, T, K, H] written at `layer` from each row's end
  (quantized first in an int8 cache)."""
  put = lambda buffer, new: write(buffer, layer, new, cache.end)
  if not cache.quantized:
    return cache.replace(k=put(cache.k, k), v=put(cache.v, v))
  (k, k_scale), (v, v_scale) = quantize(k), quantize(v)
  return cache.replace(k=put(cache.k, k), v=put(cache.v, v), k_scale=put(cache.k_scale, k_scale),
                       v_scale=put(cache.v_scale, v_scale))


def read_layer(cache: KVCache, layer, dtype):
  """The keys and values [B, S, K, H] of `layer`, every slot, in `dtype` (the compute dtype)."""
  at = lambda x: jax.lax.dynamic_index_in_dim(x, layer, keepdims=False)
  if not cache.quantized:
    return at(cache.k).astype(dtype), at(cache.v).astype(dtype)
  return (dequantize(at(cache.k), at(cache.k_scale), dtype),
          dequantize(at(cache.v), at(cache.v_scale), dtype))


def take_rows(cache: KVCache, rows) -> KVCache:
  """The cache of rows `rows` [R] (copies, repeats allowed): beams following their parents,
  suffixes each on a copy of its prompt's row."""
  taken = {name: jnp.take(x, rows, axis=1) for name, x in cache.slot_arrays().items()}
  return cache.replace(**taken, end=jnp.take(cache.end, rows))


def put_rows(cache: KVCache, rows, new: KVCache) -> KVCache:
  """`cache` with rows `rows` [R] replaced by `new`'s R rows, whose first new.max_len slots are
  written (the rest keep what they held, never read past `end`); rows out of range are dropped.
  Both are int8 caches, or neither."""
  if cache.quantized != new.quantized:
    raise ValueError("put_rows: one cache is int8 and the other is not.")
  length = new.max_len
  put = lambda old, x: old.at[:, rows, :length].set(x.astype(old.dtype), mode="drop")
  written = {name: put(x, new.slot_arrays()[name]) for name, x in cache.slot_arrays().items()}
  return cache.replace(**written, end=cache.end.at[rows].set(new.end, mode="drop"))
