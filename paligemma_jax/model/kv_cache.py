"""A preallocated, functional key/value cache for the Gemma decoder.

The cache is a pytree (so it can be carried through `jax.lax.while_loop`, donated to a jitted
function and sharded) holding every layer's keys and values for `max_len` slots:

  k, v [L, B, S, K, H]   layers, batch, slots, kv heads, head dim
  end  [B]               slots written so far in each row = the next write slot

Prompts are right-padded, so each row's tokens occupy slots 0..end-1 and a token's slot is also
its position. Rows advance independently: a short prompt starts decoding at its own length, so
batching prompts of different lengths changes no row's result.
"""

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
  k: jax.Array
  v: jax.Array
  end: jax.Array

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


def init(num_layers, batch, max_len, num_kv_heads, head_dim, dtype=jnp.float32) -> KVCache:
  """An empty cache of `max_len` slots per row."""
  shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 end=jnp.zeros((batch,), jnp.int32))


def write(buffer, layer, new, start):
  """Writes `new` [B, T, K, H] into `buffer` [L, B, S, K, H] at `layer`, row b from slot start[b].

  A per-row `jax.lax.dynamic_update_slice`; inside a jitted loop XLA updates the buffer in place.
  """
  def row(buf, upd, s):  # buf [L, S, K, H], upd [T, K, H]
    return jax.lax.dynamic_update_slice(buf, upd[None].astype(buf.dtype), (layer, s, 0, 0))
  return jax.vmap(row, in_axes=(1, 0, 0), out_axes=1)(buffer, new, start)


def take_rows(cache: KVCache, rows) -> KVCache:
  """The cache of rows `rows` [R] (copies, repeats allowed): beams following their parents,
  suffixes each on a copy of its prompt's row."""
  return cache.replace(k=jnp.take(cache.k, rows, axis=1), v=jnp.take(cache.v, rows, axis=1),
                       end=jnp.take(cache.end, rows))


def put_rows(cache: KVCache, rows, new: KVCache) -> KVCache:
  """`cache` with rows `rows` [R] replaced by `new`'s R rows, whose first new.max_len slots are
  written (the rest keep what they held, never read past `end`); rows out of range are dropped."""
  length = new.max_len
  return cache.replace(
      k=cache.k.at[:, rows, :length].set(new.k.astype(cache.k.dtype), mode="drop"),
      v=cache.v.at[:, rows, :length].set(new.v.astype(cache.v.dtype), mode="drop"),
      end=cache.end.at[rows].set(new.end, mode="drop"))
