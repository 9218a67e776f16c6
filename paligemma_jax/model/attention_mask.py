"""Which keys each query may attend to: the prefix-LM rule, padding and sliding windows.

One rule serves training, prefill and decode, so that all three agree with the reference:

  visible(i, j) = valid[j] and ((j <= i and i - j < window) or (prefix[i] and prefix[j]))

Prefix tokens (image + prompt, token type 0) see each other fully, whatever the window;
suffix and generated tokens (type 1) are causal. `i`, `j` are sequence slots (cache slots
during decoding). This is the rule transformers applies to PaliGemma 2's sliding layers;
a window of 0 means no window.

Axis letters: B batch, T query slots, S key slots.
"""

import jax.numpy as jnp


def attention_mask(q_slot, q_prefix, kv_valid, kv_prefix, window: int = 0):
  """Returns the boolean mask [B, T, S].

  Args:
    q_slot: [B, T] int, the slot of each query.
    q_prefix: [B, T] bool, queries that belong to the full-attention prefix.
    kv_valid: [B, S] bool, keys that hold a real token (not padding, not yet written).
    kv_prefix: [B, S] bool, keys that belong to the prefix.
    window: sliding-window size; 0 for full attention.
  """
  kv_slot = jnp.arange(kv_valid.shape[1])[None, None, :]
  q = q_slot[:, :, None]
  causal = kv_slot <= q
  if window:
    causal &= q - kv_slot < window
  both_prefix = q_prefix[:, :, None] & kv_prefix[:, None, :]
  return kv_valid[:, None, :] & (causal | both_prefix)
