"""The decoding core: one setup, one per-row state, one prefill and one step for every loop.

  Setup    what stays fixed while decoding: the model (its weight layout), the ids that may be
           chosen, <eos> and pad, the KV cache's dtype (float or int8), the mesh and the
           shardings on it.
  State    one row per sequence: KV cache, last token, tokens chosen so far (the index of its
           next key), limit, done, PRNG key, sampler settings (scalars, or [B] per row).
  prefill  images (one or several per row), or image features already computed (the server's
           image cache), and right-padded prompts -> a cache of `cache_len` slots and each
           row's last logits.
  start    the first token of each row from the prefill's logits -> State.
  step     one token for every active, unfinished row (`forward` + `choose`), and on demand
           each row's most likely ids with their log-probs (`top_logprobs`).

The loops keep only what is their own: `autoregressive.Generator` is a while_loop over `step` writing
its output buffers; the serving engine a fori_loop over `step` with an active mask, taking new
rows in with `insert`; beam search `forward` plus its candidate selection and
`kv_cache.take_rows` of the parents; scoring `prefill` plus `PaliGemma.extend` on copies of a
row. Row b's key at its step s is fold_in(rng[b], s), so a row's samples depend on its own key
only, whatever else runs beside it. These are pure functions, called inside jit.
"""

import dataclasses

import jax
import jax.numpy as jnp
import flax
import ml_collections
import numpy as np

from paligemma_jax import sharding
from paligemma_jax.decoding import sampling
from paligemma_jax.model import kv_cache
from paligemma_jax.model import paligemma


def default_scan_layers() -> bool:
  """The decoding layout by default (see Setup.create): on CPU, paligemma.decoding_layout."""
  return jax.default_backend() != "cpu"


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
  """What every decoding function needs besides the parameters and the state."""
  model: paligemma.PaliGemma  # Its config's scan_layers is the weight layout decoded over.
  eos_id: int
  pad_id: int
  valid: np.ndarray  # [V] bool: the ids that may be chosen.
  cache_dtype: np.dtype
  mesh: jax.sharding.Mesh | None = None

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, *, eos_id: int = 1, pad_id: int = 0,
             vocab_size: int | None = None, cache_dtype=None, mesh=None,
             scan_layers: bool | None = None) -> "Setup":
    """vocab_size: the number of real token ids (the tokenizer's `vocab_size`); larger ids and
    `config.image_token_id` are never chosen. Default: every row of the embedding table but the
    image token.

    cache_dtype: the KV cache's keys and values; default the compute dtype (`config.dtype`);
    "int8": int8 with a scale per token and kv head, read back in the compute dtype (kv_cache.py).

    scan_layers: decode over the checkpoint's stacked [L, ...] weights; False: over the CPU
    decoding layout (paligemma.decoding_layout: one weight array per layer, MLP kernels
    [out, in]). Default: False on CPU, where XLA copies a weight sliced out of a stacked array
    before each matrix-vector product (2.4x slower decoding) and repacks a product's right
    operand (an [in, out] kernel) on every call; True elsewhere: per-layer
    weights cost a second copy of the decoder weights while the caller keeps the stacked ones,
    which GPU and TPU memory, sized for the largest models, cannot spare.
    """
    config = config.copy_and_resolve_references()
    config.scan_layers = default_scan_layers() if scan_layers is None else scan_layers
    ids = np.arange(config.text.vocab_size)
    valid = (ids < (len(ids) if vocab_size is None else vocab_size)) & (
        ids != config.image_token_id)
    return cls(paligemma.PaliGemma(config), eos_id, pad_id, valid,
               kv_cache.checked_dtype(cache_dtype or config.dtype), mesh)

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.model.config

  @property
  def scan_layers(self) -> bool:
    return self.config.scan_layers

  def on(self, mesh) -> "Setup":
    """The same setup for another mesh (parameters moved)."""
    return self if mesh is self.mesh else dataclasses.replace(self, mesh=mesh)

  def decoding_layout(self, params):
    """Checkpoint-layout params (or their shapes, under jax.eval_shape) in the decoding layout."""
    stacked = "layers" in params["llm"]
    if stacked and not self.scan_layers:
      return paligemma.decoding_layout(params)
    if not stacked and self.scan_layers:
      raise ValueError("This generator takes the checkpoint's stacked layers (`llm/layers`).")
    return params

  def split_cache(self, cache: kv_cache.KVCache) -> kv_cache.KVCache:
    """The cache laid out over the mesh: rows like the batch, kv heads over `tensor`."""
    return sharding.constrain(cache, sharding.cache_shardings, self.mesh)

  def replicate(self, x):
    """Results every host reads whole."""
    return sharding.constrain(x, lambda x, m: sharding.replicated(m), self.mesh)

  def init_cache(self, batch: int, max_len: int) -> kv_cache.KVCache:
    return paligemma.init_cache(self.config, batch, max_len, self.cache_dtype)


@flax.struct.dataclass
class State:
  """B rows being decoded."""
  cache: kv_cache.KVCache  # k, v [L, B, M, K, H]; end [B]; int8: k_scale, v_scale [L, B, M, K].
  token: jax.Array  # [B] int32: the last chosen token, input of the next step.
  step: jax.Array  # [B] int32: tokens chosen so far = the index of the row's next key.
  limit: jax.Array  # [B] int32: most tokens the row may choose.
  done: jax.Array  # [B] bool: chose <eos> or reached its limit.
  rng: jax.Array  # [B, 2] uint32: the row's key.
  sampler: dict  # `sampling.Sampler.as_arrays()` (scalars) or `sampling.per_row` ([B] each).


def row_keys(key, indices):
  """One key per row from one key: the row of example i gets fold_in(key, i)."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.asarray(indices, jnp.uint32))


def prefill(setup: Setup, params, tokens, input_mask, prefix_mask, *, cache_len: int,
            images=None, features=None, image_index=None):
  """Right-padded prompts [B, T] with their images [M, S, S, 3] or image features [M, N, D]
  (row b's are those at image_index[b], see `paligemma`; None: one per row, M = B)
  -> (last-token logits [B, V], cache of `cache_len` slots holding the prompts)."""
  cache = setup.split_cache(setup.init_cache(tokens.shape[0], cache_len))
  logits, cache = setup.model.apply({"params": params}, tokens, images, input_mask, prefix_mask,
                                    cache, features=features, image_index=image_index,
                                    method=setup.model.prefill)
  return logits, setup.split_cache(cache)


def forward(setup: Setup, params, tokens, cache: kv_cache.KVCache):
  """tokens [B] at each row's cache end -> (logits [B, V], cache advanced by one slot)."""
  return setup.model.apply({"params": params}, tokens, cache, method=setup.model.decode_step)


def choose(setup: Setup, logits, rng, step, sampler):
  """Each row's token by its sampler with key fold_in(rng[b], step[b]), never an invalid id
  -> (token [B] int32, its log-probability [B]: log-softmax of the raw logits)."""
  step = jnp.broadcast_to(step, logits.shape[:1]).astype(jnp.uint32)
  token = sampling.sample(logits, jax.vmap(jax.random.fold_in)(rng, step), sampler,
                          jnp.asarray(setup.valid))
  return token, sampling.chosen_logprobs(logits, token)


def top_logprobs(setup: Setup, logits, k: int):
  """The k ids most likely to be chosen of each row and their log-probs as `choose` reports them
  -> (ids [B, k] int32, logprobs [B, k]); never an invalid id (k is cut to their number)."""
  return sampling.top_logprobs(logits, min(k, int(setup.valid.sum())), jnp.asarray(setup.valid))


def start(setup: Setup, logits, cache: kv_cache.KVCache, rng, sampler, limit):
  """The prefill's logits -> (State after each row's first token, that token's log-prob)."""
  batch = logits.shape[0]
  token, logprob = choose(setup, logits, rng, 0, sampler)
  limit = jnp.broadcast_to(jnp.asarray(limit, jnp.int32), (batch,))
  state = State(cache=cache, token=token, step=jnp.ones((batch,), jnp.int32), limit=limit,
                done=(token == setup.eos_id) | (limit <= 1), rng=rng, sampler=sampler)
  return state, logprob


def step(setup: Setup, params, state: State, active=None, top: int = 0):
  """One token for every active row that is not done -> (state, token [B], log-prob [B],
  running [B]: the rows that chose one, top: `top_logprobs(setup, logits, top)` for a static
  top > 0, else None). Other rows keep their token, step and cache end."""
  running = ~state.done if active is None else active & ~state.done
  logits, cache = forward(setup, params, state.token, state.cache)
  token, logprob = choose(setup, logits, state.rng, state.step, state.sampler)
  best = top_logprobs(setup, logits, top) if top else None
  token = jnp.where(running, token, state.token)
  count = state.step + running
  cache = cache.replace(end=jnp.where(running, cache.end, state.cache.end))
  done = state.done | (running & ((token == setup.eos_id) | (count >= state.limit)))
  state = state.replace(cache=setup.split_cache(cache), token=token, step=count, done=done)
  return state, token, logprob, running, best


ROW_FIELDS = ("token", "step", "limit", "done", "rng", "sampler")  # State's [B, ...] arrays.


def insert(state: State, rows, new: State) -> State:
  """`state` with rows `rows` [b] replaced by `new`'s b rows (its cache may be shorter); rows
  out of range are dropped (padding)."""
  put = lambda old, value: old.at[rows].set(value, mode="drop")
  return State(cache=kv_cache.put_rows(state.cache, rows, new.cache),
               **{f: jax.tree.map(put, getattr(state, f), getattr(new, f)) for f in ROW_FIELDS})


def take(state: State, rows) -> State:
  """Rows `rows` [b] of `state` (copies, in range; per-row sampler arrays): the rows a narrower
  decode runs on, or rows that move (`insert` puts them back, or elsewhere)."""
  at = lambda x: jnp.take(x, rows, axis=0)
  return State(cache=kv_cache.take_rows(state.cache, rows),
               **{f: jax.tree.map(at, getattr(state, f)) for f in ROW_FIELDS})
