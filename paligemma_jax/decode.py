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

from paligemma_jax import kv_cache
from paligemma_jax import paligemma
from paligemma_jax import sampling
from paligemma_jax import multihost
from paligemma_jax import sharding


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
  step: jax.Array  # [] int32: the next column of `tokens` to write.
  token: jax.Array  # [B] int32: the last chosen token, input of the next step.
  done: jax.Array  # [B] bool: the row has produced <eos>.
  cache: kv_cache.KVCache
  rng: jax.Array  # [B] PRNG keys, one per row; step s samples row b with fold_in(rng[b], s).
  sampler: dict  # `Sampler.as_arrays()`.
  tokens: jax.Array  # [B, N] int32: chosen ids, pad_id after <eos> and where not yet written.
  logprobs: jax.Array  # [B, N] float32.


def _step_keys(row_keys, step):
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)


def row_keys(key, indices):
  """One key per row from one key: the row of example i gets fold_in(key, i)."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.asarray(indices, jnp.uint32))


def _compile(model: paligemma.PaliGemma, max_new_tokens: int, mesh, *, eos_id: int, pad_id: int,
             valid: np.ndarray, cache_dtype):
  """The jitted (prefill, loop) pair; jax.jit caches their executables per input shape. Built
  from these values only, so it keeps no generator or parameters alive."""
  split_cache = lambda cache: sharding.constrain(cache, sharding.cache_shardings, mesh)
  replicate = lambda x: sharding.constrain(x, lambda x, m: sharding.replicated(m), mesh)

  def choose(logits, rng, sampler, done):
    token = sampling.sample(logits, rng, sampler, jnp.asarray(valid))
    logprob = sampling.chosen_logprobs(logits, token)
    return jnp.where(done, pad_id, token), jnp.where(done, 0.0, logprob)

  def prefill(params, tokens, images, input_mask, prefix_mask, rng, sampler) -> DecodeState:
    batch, length = tokens.shape
    cache = split_cache(paligemma.init_cache(model.config, batch, length + max_new_tokens,
                                             cache_dtype))
    logits, cache = model.apply({"params": params}, tokens, images, input_mask, prefix_mask,
                                cache, method=model.prefill)
    token, logprob = choose(logits, _step_keys(rng, 0), sampler, jnp.zeros((batch,), bool))
    out_tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    out_logprobs = jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(logprob)
    return DecodeState(step=jnp.int32(1), token=token, done=token == eos_id,
                       cache=split_cache(cache), rng=rng, sampler=sampler,
                       tokens=replicate(out_tokens), logprobs=replicate(out_logprobs))

  def loop(params, state: DecodeState) -> DecodeState:
    def cond(s):
      return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s):
      logits, cache = model.apply({"params": params}, s.token, s.cache, method=model.decode_step)
      token, logprob = choose(logits, _step_keys(s.rng, s.step), s.sampler, s.done)
      write = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None], (0, s.step))
      return s.replace(step=s.step + 1, token=token, done=s.done | (token == eos_id),
                       cache=split_cache(cache), tokens=replicate(write(s.tokens, token)),
                       logprobs=replicate(write(s.logprobs, logprob)))

    return jax.lax.while_loop(cond, body, state)  # Returned whole, so every buffer aliases.

  return jax.jit(prefill), jax.jit(loop, donate_argnums=1)


def default_scan_layers() -> bool:
  """The decoding layout Generator picks by default (see its `scan_layers`): layers apart on CPU."""
  return jax.default_backend() != "cpu"


class Generator:
  """Generates from a PaliGemma checkpoint; reuses its compiled functions across calls.

  Set `params` to decode with new parameters (fine-tuning's evaluation): same shapes compile
  nothing new, and a new mesh they are sharded over is followed.
  """

  def __init__(self, config: ml_collections.ConfigDict, params, *, eos_id: int = 1, pad_id: int = 0,
               vocab_size: int | None = None, cache_dtype=None, mesh=None,
               scan_layers: bool | None = None):
    """vocab_size: the number of real token ids (the tokenizer's `vocab_size`); larger ids and
    `config.image_token_id` are never chosen. Default: every row of the embedding table but the
    image token.

    mesh (default: the one `params` are sharded over, if any, followed when `params` change):
    batches and the KV cache are split over it (sharding.py) and results come back replicated,
    readable on every host.

    scan_layers: decode over the checkpoint's stacked [L, ...] weights, as gemma.Decoder does
    when its `scan_layers` is True; False: over one weight array per layer. Default: False on
    CPU, where XLA copies a weight sliced out of a stacked array before each matrix-vector
    product (2.4x slower decoding); True elsewhere: per-layer weights cost a second copy of the
    decoder weights while the caller keeps the stacked ones, which GPU and TPU memory, sized for
    the largest models, cannot spare.
    """
    if scan_layers is None:
      scan_layers = default_scan_layers()
    self.scan_layers = scan_layers
    self.config = config.copy_and_resolve_references()
    self.config.scan_layers = scan_layers
    self.eos_id, self.pad_id = eos_id, pad_id
    self.cache_dtype = jnp.dtype(cache_dtype or config.dtype)
    ids = np.arange(self.config.text.vocab_size)  # [V] bool: the ids that may be chosen.
    self.valid_ids = (ids < (len(ids) if vocab_size is None else vocab_size)) & (
        ids != self.config.image_token_id)
    self._mesh = mesh
    self._model = paligemma.PaliGemma(self.config)
    self._compiled = {}  # (max_new_tokens, mesh) -> (prefill, loop)
    self.params = params

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
    stacked = "layers" in params["llm"]
    if stacked and not self.scan_layers:
      return paligemma.unstack_layers(params)
    if not stacked and self.scan_layers:
      raise ValueError("This generator takes the checkpoint's stacked layers (`llm/layers`).")
    return params

  def compiled(self, max_new_tokens: int):
    """The jitted (prefill, loop) pair for `max_new_tokens` on the current mesh."""
    key = (int(max_new_tokens), self.mesh)
    if key not in self._compiled:
      self._compiled[key] = _compile(self._model, *key, eos_id=self.eos_id, pad_id=self.pad_id,
                                     valid=self.valid_ids, cache_dtype=self.cache_dtype)
    return self._compiled[key]

  def generate(self, tokens, images, input_mask, prefix_mask, *, max_new_tokens: int,
               sampler: sampling.Sampler = sampling.Sampler(), rng=None) -> Generation:
    """Continues each right-padded prompt row ([B, T] arrays, images [B, S, S, 3]).

    rng: [B] keys, one per row (a row's samples depend on its key only), or one key (row b
    then uses `row_keys(rng, range(B))[b]`); default PRNGKey(0).
    """
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    rng = jax.random.PRNGKey(0) if rng is None else jnp.asarray(rng)
    if rng.ndim == 1:
      rng = row_keys(rng, np.arange(tokens.shape[0]))
    mesh = self.mesh
    prefill, loop = self.compiled(max_new_tokens)
    settings = sampler.as_arrays()
    if mesh is not None:  # Every host passes the same global batch.
      tokens, images, input_mask, prefix_mask = sharding.shard_batch(
          (tokens, images, input_mask, prefix_mask), mesh)
      rng, settings = jax.device_put((rng, settings), sharding.replicated(mesh))
    state = loop(self.params, prefill(self.params, tokens, images, input_mask, prefix_mask, rng,
                                      settings))
    out_tokens, logprobs = multihost.fetch((state.tokens, state.logprobs))  # Any host.
    is_eos = out_tokens == self.eos_id
    lengths = np.where(is_eos.any(1), is_eos.argmax(1), max_new_tokens).astype(np.int32)
    return Generation(out_tokens, logprobs, lengths, is_eos.any(1))
