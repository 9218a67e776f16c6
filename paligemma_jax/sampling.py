"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

Pure functions of (logits [B, V], PRNG key), so a seed reproduces its output and the choice
can run inside the jitted decode loop.
"""

import dataclasses

import jax
import jax.numpy as jnp

METHODS = ("greedy", "temperature", "top_k", "top_p")


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How to pick tokens. Hashable: it is a static argument of the compiled decode loop."""
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


def sample(logits, rng, sampler: Sampler):
  """logits [B, V] float32 -> token ids [B] int32."""
  if sampler.method == "greedy":
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampler.temperature
  if sampler.method == "top_k":
    top_logits, top_ids = jax.lax.top_k(logits, sampler.top_k)
    choice = jax.random.categorical(rng, top_logits, axis=-1)
    return jnp.take_along_axis(top_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  if sampler.method == "top_p":
    logits = _nucleus(logits, sampler.top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _nucleus(logits, top_p: float):
  """Masks every token outside the smallest most-likely set whose probability reaches top_p."""
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
  # The set ends at the first token whose cumulative probability reaches top_p; keep it too.
  cutoff_index = jnp.minimum(jnp.sum(cumulative < top_p, axis=-1, keepdims=True), logits.shape[-1] - 1)
  cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
  return jnp.where(logits < cutoff, -jnp.inf, logits)


def chosen_logprobs(logits, tokens):
  """log_softmax of the unmodified logits at the chosen tokens: [B, V], [B] -> [B]."""
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
