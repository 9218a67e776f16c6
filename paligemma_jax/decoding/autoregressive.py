"""Autoregressive decoding: one prefill, then one jitted `lax.while_loop` over new tokens.

  prefill  image tower + the whole right-padded prompt in one pass, fills a KV cache preallocated
           for prompt + max_new_tokens slots, and samples the first token;
  loop     `decode_step` + sampling per iteration, entirely on device (no host round trip per
           token); exits when every row has produced <eos> or max_new_tokens are done. Its
           state (`DecodeState`, the KV cache included) is donated, so XLA updates the cache in
           place.

Rows are independent: each has its own cache end and RoPE positions, and a row that has
stopped emits `pad_id` from then on. Only real token ids are ever chosen: ids at or past the
tokenizer's `vocab_size` (the embedding's padding rows) and the image token are masked out of
every sampler, greedy included; the reported log-probabilities stay the log-softmax of the raw
logits, over the whole table. Each `Generator` keeps its compiled functions per
(max_new_tokens, mesh), and `jax.jit` keeps their executables per input shape, so equal shapes
never compile twice; sampler settings are traced values and never cause a compile. The compiled
functions hold neither the generator nor its parameters: a dropped generator is freed.
"""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from paligemma_jax import multihost
from paligemma_jax import sharding
from paligemma_jax.decoding import core
from paligemma_jax.decoding import sampling


@dataclasses.dataclass
class Generation:
  """Host-side results for B rows and N = max_new_tokens steps."""
  tokens: np.ndarray  # [B, N] int32: generated ids; pad_id after a row stopped.
  logprobs: np.ndarray  # [B, N] float32: log-softmax of the raw logits at each chosen token.
  lengths: np.ndarray  # [B] int32: generated tokens before <eos> (<eos> itself excluded).
  hit_eos: np.ndarray  # [B] bool: the row stopped at <eos> (else it ran out of tokens).

  def row(self, i):
    """(tokens, logprobs, stop_reason) of row i, <eos> and padding removed."""
    n = int(self.lengths[i])
    return (self.tokens[i, :n].tolist(), self.logprobs[i, :n].tolist(),
            "eos" if self.hit_eos[i] else "length")


@flax.struct.dataclass
class DecodeState:
  """What the decode loop carries from one step to the next (B rows, N = max_new_tokens)."""
  rows: core.State  # The rows being decoded; each row's limit is N.
  column: jax.Array  # [] int32: the next column of `tokens` to write.
  tokens: jax.Array  # [B, N] int32: chosen ids, pad_id after <eos> and where not yet written.
  logprobs: jax.Array  # [B, N] float32.


def _compile(setup: core.Setup, max_new_tokens: int):
  """The jitted (prefill, loop) pair; jax.jit caches their executables per input shape. Built
  from the setup only, so it keeps no generator or parameters alive."""

  def prefill(params, tokens, images, input_mask, prefix_mask, rng, sampler,
              image_index=None) -> DecodeState:
    batch, length = tokens.shape
    logits, cache = core.prefill(setup, params, tokens, input_mask, prefix_mask, images=images,
                                 image_index=image_index, cache_len=length + max_new_tokens)
    rows, logprob = core.start(setup, logits, cache, rng, sampler, max_new_tokens)
    out_tokens = jnp.full((batch, max_new_tokens), setup.pad_id, jnp.int32).at[:, 0].set(rows.token)
    out_logprobs = jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(logprob)
    return DecodeState(rows=rows, column=jnp.int32(1), tokens=setup.replicate(out_tokens),
                       logprobs=setup.replicate(out_logprobs))

  def loop(params, state: DecodeState) -> DecodeState:
    def cond(s):
      return (s.column < max_new_tokens) & ~jnp.all(s.rows.done)

    def body(s):
      rows, token, logprob, running, _ = core.step(setup, params, s.rows)
      write = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None], (0, s.column))
      return s.replace(rows=rows, column=s.column + 1,
                       tokens=setup.replicate(write(s.tokens, jnp.where(running, token,
                                                                          setup.pad_id))),
                       logprobs=setup.replicate(write(s.logprobs, jnp.where(running, logprob,
                                                                              0.0))))

    return jax.lax.while_loop(cond, body, state)  # Returned whole, so every buffer aliases.

  return jax.jit(prefill), jax.jit(loop, donate_argnums=1)


class Generator:
  """Generates from a PaliGemma checkpoint; reuses its compiled functions across calls.

  Set `params` to decode with new parameters (fine-tuning's evaluation): same shapes compile
  nothing new, and a new mesh they are sharded over is followed.
  """

  def __init__(self, params, config: ml_collections.ConfigDict, *, eos_id: int = 1, pad_id: int = 0,
               vocab_size: int | None = None, cache_dtype=None, mesh=None,
               scan_layers: bool | None = None):
    """eos_id, pad_id, vocab_size (ids from it on are never chosen), cache_dtype and scan_layers
    (the weight layout decoded over; default layers apart on CPU): see `core.Setup.create`.

    mesh (default: the one `params` are sharded over, if any, followed when `params` change):
    batches and the KV cache are split over it (sharding.py) and results come back replicated,
    readable on every host.
    """
    self.setup = core.Setup.create(config, eos_id=eos_id, pad_id=pad_id, vocab_size=vocab_size,
                                   cache_dtype=cache_dtype, scan_layers=scan_layers)
    self._mesh = mesh
    self._compiled = {}  # (max_new_tokens, mesh) -> (prefill, loop)
    self.params = params

  config = property(lambda self: self.setup.config)
  scan_layers = property(lambda self: self.setup.scan_layers)
  eos_id = property(lambda self: self.setup.eos_id)
  pad_id = property(lambda self: self.setup.pad_id)
  valid_ids = property(lambda self: self.setup.valid)
  cache_dtype = property(lambda self: self.setup.cache_dtype)

  @property
  def params(self):
    return self._params

  @params.setter
  def params(self, params):
    """Takes either layout (stacked layers, or apart) and keeps the decoding one."""
    self._params_mesh = sharding.mesh_of(params)
    self._params = None if params is None else self.decoding_layout(params)

  @property
  def mesh(self) -> jax.sharding.Mesh | None:
    """The mesh given, else the one the current parameters are sharded over (or None)."""
    return self._params_mesh if self._mesh is None else self._mesh

  def decoding_layout(self, params):
    """Checkpoint-layout params (or their shapes, under jax.eval_shape) in the decoding layout."""
    return self.setup.decoding_layout(params)

  def compiled(self, max_new_tokens: int):
    """The jitted (prefill, loop) pair for `max_new_tokens` on the current mesh."""
    key = (int(max_new_tokens), self.mesh)
    if key not in self._compiled:
      self._compiled[key] = _compile(self.setup.on(self.mesh), int(max_new_tokens))
    return self._compiled[key]

  def generate(self, tokens, images, input_mask, prefix_mask, image_index=None, *,
               max_new_tokens: int, sampler: sampling.Sampler = sampling.Sampler(),
               rng=None) -> Generation:
    """Continues each right-padded prompt row ([B, T] arrays; images [B, S, S, 3], one per row,
    or [M, S, S, 3] with image_index [B, K]: several per row, see `paligemma`).

    rng: [B] keys, one per row (a row's samples depend on its key only), or one key (row b
    then uses `core.row_keys(rng, range(B))[b]`); default PRNGKey(0).
    """
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    rng = jax.random.PRNGKey(0) if rng is None else jnp.asarray(rng)
    if rng.ndim == 1:
      rng = core.row_keys(rng, np.arange(tokens.shape[0]))
    mesh = self.mesh
    prefill, loop = self.compiled(max_new_tokens)
    settings = sampler.as_arrays()
    if mesh is not None:  # Every host passes the same global batch.
      tokens, images, input_mask, prefix_mask, image_index = sharding.shard_batch(
          (tokens, images, input_mask, prefix_mask, image_index), mesh)
      rng, settings = jax.device_put((rng, settings), sharding.replicated(mesh))
    state = loop(self.params, prefill(self.params, tokens, images, input_mask, prefix_mask, rng,
                                      settings, image_index=image_index))
    out_tokens, logprobs = multihost.fetch((state.tokens, state.logprobs))  # Any host.
    is_eos = out_tokens == self.eos_id
    lengths = np.where(is_eos.any(1), is_eos.argmax(1), max_new_tokens).astype(np.int32)
    return Generation(out_tokens, logprobs, lengths, is_eos.any(1))
