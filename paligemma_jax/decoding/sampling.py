"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

Pure functions of (logits [B, V], one PRNG key per row, sampler values), so a seed reproduces
its output, a row's choice does not depend on the other rows, and the choice runs inside the
jitted decode loop. The sampler's values are traced, not static:
one compiled loop serves every method, temperature, k and p. They are scalars (one sampler for
the batch, `Sampler.as_arrays`) or [B] arrays (one per row, `per_row`, for the serving engine);
a row gets the same token either way.
"""

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("greedy", "temperature", "top_k", "top_p")
MAX_TOP_K = 2**31 - 1  # top_k is an int32 on the device.
MAX_TOP_LOGPROBS = 20  # The most alternatives `top_logprobs` reports per token (OpenAI's limit).
SEED_RANGE = (-2**63, 2**63 - 1)  # A seed is an int64 (OpenAI's range); all 64 bits count.
TEMPERATURE_RANGE = (1e-30, 1e30)  # Any positive temperature acts as its clip to this range.


def seed_key(seed: int) -> np.ndarray:
  """The PRNG key [2] uint32 of a seed: its 64 bits (two's complement), high word first.

  For 0 <= seed < 2**32 this is `jax.random.PRNGKey(seed)`; unlike it (which keeps the low 32
  bits without jax_enable_x64), no two seeds of the range share a key. ValueError for a
  non-integer or a seed outside SEED_RANGE.
  """
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
    raise ValueError(f"seed must be an integer, got {seed!r}")
  seed = int(seed)
  if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
    raise ValueError(f"seed must be in [-2**63, 2**63 - 1], got {seed}")
  bits = seed % 2**64
  return np.array([bits >> 32, bits & 0xFFFFFFFF], np.uint32)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How to pick tokens; validated here, handed to the compiled loop as `as_arrays()`."""
  method: str = "greedy"
  temperature: float = 1.0
  top_k: int = 0  # For "top_k": keep the k most likely tokens.
  top_p: float = 1.0  # For "top_p": keep the smallest set whose probability reaches p.

  def __post_init__(self):
    """Every value must fit the device arrays it becomes (`per_row` never fails on a Sampler)."""
    if self.method not in METHODS:
      raise ValueError(f"Unknown sampler {self.method!r}; choose one of {METHODS}.")
    for name in ("temperature", "top_p"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or not (
        0 <= self.top_k <= MAX_TOP_K):
      raise ValueError(f"top_k must be an integer in [0, {MAX_TOP_K}], got {self.top_k!r}.")
    if self.method != "greedy" and not self.temperature > 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature}.")
    if self.method == "top_k" and self.top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {self.top_k}.")
    if self.method == "top_p" and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")

  def as_arrays(self) -> dict:
    return dict(method=jnp.int32(METHODS.index(self.method)),
                temperature=jnp.float32(_held(self.temperature)),
                top_k=jnp.int32(self.top_k), top_p=jnp.float32(self.top_p))


def _held(temperature: float) -> float:
  """The temperature as the device holds it (1e308 would be inf in float32)."""
  return min(temperature, TEMPERATURE_RANGE[1])


def per_row(samplers) -> dict:
  """One sampler per row -> the `as_arrays()` dict of [B] numpy arrays."""
  return dict(method=np.array([METHODS.index(s.method) for s in samplers], np.int32),
              temperature=np.array([_held(s.temperature) for s in samplers], np.float32),
              top_k=np.array([s.top_k for s in samplers], np.int32),
              top_p=np.array([s.top_p for s in samplers], np.float32))


def sample(logits, rng, sampler: dict, valid=None):
  """logits [B, V] float32, rng [B] keys (one per row), sampler = `Sampler.as_arrays()` ->
  token ids [B] int32.

  valid [V] bool (optional): the ids that may be chosen, by every method; the others are
  dropped before temperature, k and p apply (ids past the tokenizer must never come out).
  """
  method = sampler["method"]
  column = lambda x: x[:, None] if jnp.ndim(x) else x  # Per-row [B] values against [B, V].
  if valid is not None:
    logits = jnp.where(valid, logits, -jnp.inf)

  def greedy(logits):
    return jnp.argmax(logits, axis=-1)

  def stochastic(logits):
    logits = _tempered(logits, column(sampler["temperature"]))
    return jax.lax.cond(method == METHODS.index("temperature"), temperature, truncated, logits)

  draw = jax.vmap(jax.random.categorical)  # Row b from its own key: independent of the others.

  def temperature(logits):
    return draw(rng, logits)

  def truncated(logits):
    """Top-k or top-p, drawn among the ranked logits: exactly the kept ones, ties or not."""
    order = jnp.argsort(-logits, axis=-1)  # Stable: of tied logits the lower id ranks first.
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    last = logits.shape[-1] - 1
    k_index = column(jnp.clip(sampler["top_k"] - 1, 0, last))
    cumulative = jnp.cumsum(jax.nn.softmax(ranked, axis=-1), axis=-1)
    # The nucleus ends at the first token whose cumulative probability reaches p; keep it too.
    p_index = jnp.minimum(jnp.sum(cumulative < column(sampler["top_p"]), axis=-1, keepdims=True),
                          last)
    kept = jnp.where(column(method) == METHODS.index("top_k"), k_index, p_index)  # [B, 1]
    rank = draw(rng, jnp.where(jnp.arange(last + 1) <= kept, ranked, -jnp.inf))
    return jnp.take_along_axis(order, rank[:, None], axis=-1)[:, 0]

  if jnp.ndim(method):  # Per-row methods: every row takes its own method's choice.
    is_greedy = method == METHODS.index("greedy")

    def mixed(logits):
      scaled = _tempered(logits, jnp.where(is_greedy, 1.0, sampler["temperature"])[:, None])
      drawn = temperature(scaled)
      any_truncated = jnp.any(method >= METHODS.index("top_k"))
      kept = jax.lax.cond(any_truncated, truncated, lambda _: drawn, scaled)
      chosen = jnp.where(method == METHODS.index("temperature"), drawn, kept)
      return jnp.where(is_greedy, greedy(logits), chosen)

    return jax.lax.cond(jnp.all(is_greedy), greedy, mixed, logits).astype(jnp.int32)
  return jax.lax.cond(method == METHODS.index("greedy"), greedy, stochastic, logits).astype(jnp.int32)


def _tempered(logits, temperature):
  """logits / temperature for any positive temperature. The largest logit is moved to 0 first,
  so a tiny temperature sends the others to -inf (the greedy limit) instead of everything to
  +-inf and NaN; the temperature is clipped to TEMPERATURE_RANGE, where its reciprocal stays a normal
  float32 (XLA divides by multiplying; a denormal is flushed to 0, and -inf * 0 is NaN). Past
  those bounds float32 logits give the same choices: greedy below, uniform above."""
  shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
  return shifted / jnp.clip(temperature, *TEMPERATURE_RANGE)


def chosen_logprobs(logits, tokens):
  """log_softmax of the unmodified logits at the chosen tokens: [B, V], [B] -> [B]."""
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]


def top_logprobs(logits, k: int, valid=None):
  """The k most likely ids and their log-probabilities: logits [B, V] -> (ids [B, k] int32,
  logprobs [B, k]), most likely first.

  Only `valid` ids [V] bool (optional) compete, ranked by their raw logits as greedy ranks them
  (of tied logits the lower id first), so a greedy row's token is its first id. The values are
  `chosen_logprobs`' (log_softmax of the raw logits over the whole table): a chosen token among
  them has the same log-probability in both. k: a static int, at most the number of valid ids.
  """
  ranked = logits if valid is None else jnp.where(valid, logits, -jnp.inf)
  _, ids = jax.lax.top_k(ranked, k)
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return ids.astype(jnp.int32), jnp.take_along_axis(logprobs, ids, axis=-1)
