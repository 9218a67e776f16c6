"""Autoregressive decoding: one prefill, then one jitted `lax.while_loop` over new tokens.

  prefill  image tower + the whole right-padded prompt in one pass, fills a KV cache preallocated
           for prompt + max_new_tokens slots, and samples the first token;
  loop     `decode_step` + sampling per iteration, entirely on device (no host round trip per
           token); exits when every row has produced <eos> or max_new_tokens are done. Its
           state, the KV cache included, is donated, so XLA updates the cache in place.

Rows are independent: each has its own cache end and RoPE positions, and a row that has
stopped emits `pad_id` from then on. Compiled functions are cached per (batch, prompt bucket,
max_new_tokens) by `jax.jit`, so equal shapes never compile twice; sampler settings are traced
values and never cause a compile.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from paligemma_jax import paligemma
from paligemma_jax import sampling
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


class Decoder:
  """Generates from a PaliGemma checkpoint; reuses its compiled functions across calls."""

  def __init__(self, config: ml_collections.ConfigDict, params, *, eos_id: int = 1, pad_id: int = 0,
               cache_dtype=None, mesh=None, unstack_layers: bool | None = None):
    """mesh (default: the one `params` are sharded over, if any): batches and the KV cache are
    split over it (sharding.py) and results come back replicated, readable on every host.

    unstack_layers: decode over one weight array per layer instead of the checkpoint's stacked
    [L, ...] arrays (gemma.Decoder.scan_layers). Default: on CPU only, where XLA copies a weight
    sliced out of a stacked array before each matrix-vector product (2.4x slower decoding). It
    costs a second copy of the decoder weights while the caller keeps the stacked ones, which
    GPU and TPU memory, sized for the largest models, cannot spare.
    """
    if unstack_layers is None:
      unstack_layers = jax.default_backend() == "cpu"
    self.unstack_layers = unstack_layers
    self.config = config.copy_and_resolve_references()
    self.config.scan_layers = not unstack_layers
    self.params = params
    self.eos_id, self.pad_id = eos_id, pad_id
    self.cache_dtype = cache_dtype or config.dtype
    self.mesh = sharding.mesh_of(params) if mesh is None else mesh
    self.model = paligemma.PaliGemma(self.config)

  @property
  def params(self):
    return self._params

  @params.setter
  def params(self, params):
    """Takes the checkpoint layout (stacked layers) and keeps the decoding one."""
    self._params = None if params is None else self.decoding_layout(params)

  def decoding_layout(self, params):
    """Checkpoint-layout params (or their shapes, under jax.eval_shape) in this decoder's layout."""
    stacked = "layers" in params["llm"]
    if stacked and self.unstack_layers:
      return paligemma.unstack_layers(params)
    if not stacked and not self.unstack_layers:
      raise ValueError("This decoder takes the checkpoint's stacked layers (`llm/layers`).")
    return params

  def generate(self, tokens, images, input_mask, prefix_mask, *, max_new_tokens: int,
               sampler: sampling.Sampler = sampling.Sampler(), rng=None) -> Generation:
    """Continues each right-padded prompt row ([B, T] arrays, images [B, S, S, 3])."""
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    if self.mesh is None:  # `params` may have been set after construction (fine-tuning evaluation).
      self.mesh = sharding.mesh_of(self.params)
    prefill, loop = self.compiled(int(max_new_tokens))
    settings = sampler.as_arrays()
    if self.mesh is not None:  # Every host passes the same global batch.
      tokens, images, input_mask, prefix_mask = sharding.shard_batch(
          (tokens, images, input_mask, prefix_mask), self.mesh)
      rng, settings = jax.device_put((rng, settings), sharding.replicated(self.mesh))
    state = prefill(self.params, tokens, images, input_mask, prefix_mask, rng, settings)
    state = loop(self.params, state)
    out_tokens, logprobs = sharding.fetch((state["tokens"], state["logprobs"]))  # Any host.
    is_eos = out_tokens == self.eos_id
    lengths = np.where(is_eos.any(1), is_eos.argmax(1), max_new_tokens).astype(np.int32)
    return Generation(out_tokens, logprobs, lengths, is_eos.any(1))

  @functools.lru_cache(maxsize=None)
  def compiled(self, max_new_tokens: int):
    """The jitted (prefill, loop) pair; jax.jit caches their executables per input shape."""
    model, eos_id, pad_id, mesh = self.model, self.eos_id, self.pad_id, self.mesh
    split_cache = lambda cache: sharding.constrain(cache, sharding.cache_shardings, mesh)
    replicate = lambda x: sharding.constrain(x, lambda x, m: sharding.replicated(m), mesh)

    def choose(logits, rng, sampler, done):
      token = sampling.sample(logits, rng, sampler)
      logprob = sampling.chosen_logprobs(logits, token)
      return jnp.where(done, pad_id, token), jnp.where(done, 0.0, logprob)

    def prefill(params, tokens, images, input_mask, prefix_mask, rng, sampler):
      batch, length = tokens.shape
      cache = split_cache(paligemma.init_cache(self.config, batch, length + max_new_tokens,
                                               self.cache_dtype))
      logits, cache = model.apply({"params": params}, tokens, images, input_mask, prefix_mask,
                                  cache, method=model.prefill)
      done = jnp.zeros((batch,), bool)
      token, logprob = choose(logits, jax.random.fold_in(rng, 0), sampler, done)
      out_tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
      out_logprobs = jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(logprob)
      return dict(step=jnp.int32(1), token=token, done=token == eos_id, cache=split_cache(cache),
                  rng=rng, sampler=sampler, tokens=replicate(out_tokens),
                  logprobs=replicate(out_logprobs))

    def loop(params, state):
      def cond(s):
        return (s["step"] < max_new_tokens) & ~jnp.all(s["done"])

      def body(s):
        logits, cache = model.apply({"params": params}, s["token"], s["cache"],
                                    method=model.decode_step)
        token, logprob = choose(logits, jax.random.fold_in(s["rng"], s["step"]), s["sampler"],
                                s["done"])
        write = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None], (0, s["step"]))
        return dict(step=s["step"] + 1, token=token, done=s["done"] | (token == eos_id),
                    cache=split_cache(cache), rng=s["rng"], sampler=s["sampler"],
                    tokens=replicate(write(s["tokens"], token)),
                    logprobs=replicate(write(s["logprobs"], logprob)))

      return jax.lax.while_loop(cond, body, state)  # Returned whole, so every buffer aliases.

    return jax.jit(prefill), jax.jit(loop, donate_argnums=1)
