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
