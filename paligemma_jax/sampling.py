"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

Pure functions of (logits [B, V], one PRNG key per row, sampler values), so a seed reproduces
its output, a row's choice does not depend on the other rows, and the choice runs inside the
jitted decode loop. The sampler's values are traced, not static:
one compiled loop serves every method, temperature, k and p.
"""

import dataclasses

import jax
import jax.numpy as jnp

METHODS = ("greedy", "temperature", "top_k", "top_p")


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How to pick tokens; validated here, handed to the compiled loop as `as_arrays()`."""
  method: str = "greedy"
  temperature: float = 1.0
  top_k: int = 0  # For "top_k": keep the k most likely tokens.
  top_p: float = 1.0  # For "top_p": keep the smallest set whose probability reaches p.

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"Unknown sampler {self.method!r}; choose one of {METHODS}.")
    if self.method != "greedy" and not self.temperature > 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature}.")
    if self.method == "top_k" and self.top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {self.top_k}.")
    if self.method == "top_p" and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")

  def as_arrays(self) -> dict:
    return dict(method=jnp.int32(METHODS.index(self.method)), temperature=jnp.float32(self.temperature),
                top_k=jnp.int32(self.top_k), top_p=jnp.float32(self.top_p))


def sample(logits, rng, sampler: dict, valid=None):
  """logits [B, V] float32, rng [B] keys (one per row), sampler = `Sampler.as_arrays()` ->
  token ids [B] int32.

  valid [V] bool (optional): the ids that may be chosen, by every method; the others are
  dropped before temperature, k and p apply (ids past the tokenizer must never come out).
  """
  method = sampler["method"]
  if valid is not None:
    logits = jnp.where(valid, logits, -jnp.inf)

  def greedy(logits):
    return jnp.argmax(logits, axis=-1)

  def stochastic(logits):
    logits = logits / sampler["temperature"]
    return jax.lax.cond(method == METHODS.index("temperature"), temperature, truncated, logits)

  draw = jax.vmap(jax.random.categorical)  # Row b from its own key: independent of the others.

  def temperature(logits):
    return draw(rng, logits)

  def truncated(logits):
    """Top-k or top-p, drawn among the ranked logits: exactly the kept ones, ties or not."""
    order = jnp.argsort(-logits, axis=-1)  # Stable: of tied logits the lower id ranks first.
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    last = logits.shape[-1] - 1
    k_index = jnp.clip(sampler["top_k"] - 1, 0, last)
    cumulative = jnp.cumsum(jax.nn.softmax(ranked, axis=-1), axis=-1)
    # The nucleus ends at the first token whose cumulative probability reaches p; keep it too.
    p_index = jnp.minimum(jnp.sum(cumulative < sampler["top_p"], axis=-1, keepdims=True), last)
    kept = jnp.where(method == METHODS.index("top_k"), k_index, p_index)  # [B, 1] or []
    rank = draw(rng, jnp.where(jnp.arange(last + 1) <= kept, ranked, -jnp.inf))
    return jnp.take_along_axis(order, rank[:, None], axis=-1)[:, 0]

  return jax.lax.cond(method == METHODS.index("greedy"), greedy, stochastic, logits).astype(jnp.int32)


def chosen_logprobs(logits, tokens):
  """log_softmax of the unmodified logits at the chosen tokens: [B, V], [B] -> [B]."""
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
