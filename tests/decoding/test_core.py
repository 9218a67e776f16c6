"""The decoding core's ways to start rows: from the prefill's logits, or in the first step."""

import jax
import numpy as np
import pytest

from paligemma_jax.checkpoints import loading
from paligemma_jax.decoding import core
from paligemma_jax.decoding import sampling
from paligemma_jax.model import paligemma

NEW = 5


@pytest.fixture(scope="module")
def pg2(converted_checkpoint):
  """PaliGemma 2 (final-logit softcap, sliding-window layers): the head's whole path."""
  return loading.load_model(converted_checkpoint(2)[0])


@pytest.mark.parametrize("cache_dtype", [None, "int8"])
def test_a_row_started_in_its_step_decodes_as_one_started_from_its_logits(pg2, cache_dtype):
  """`start_in_step` (the engine's prefill without the LM head): the first step chooses the
  token `start` chooses from the prefill's logits, with its log-prob, and leaves the cache end
  at the prompt; every step after chooses the same tokens (greedy and sampled rows, each with
  its key) and stops the rows at the same step."""
  params, config, tokenizer = pg2
  setup = core.Setup.create(config, vocab_size=tokenizer.vocab_size, cache_dtype=cache_dtype)
  params = setup.decoding_layout(params)
  rng = np.random.RandomState(0)
  n, lengths = paligemma.num_image_tokens(config), np.array([4, 7, 2])
  t = n + lengths.max()
  tokens = rng.randint(5, config.image_token_id, (3, t)).astype(np.int32)
  tokens[:, :n], tokens[:, n] = config.image_token_id, 2
  mask = np.arange(t)[None] < (n + lengths)[:, None]
  tokens = np.where(mask, tokens, 0)
  s = config.vision.image_size
  images = rng.uniform(-1, 1, (3, s, s, 3)).astype(np.float32)
  keys = core.row_keys(sampling.seed_key(7), np.arange(3))
  sampler = sampling.per_row([sampling.Sampler(), sampling.Sampler("temperature", 1.5),
                              sampling.Sampler("top_k", 2.0, top_k=3)])
  limit = np.array([NEW, 2, NEW], np.int32)

  @jax.jit
  def both(params):
    prefill = lambda head: core.prefill(setup, params, tokens, mask, mask, images=images,
                                        cache_len=t + NEW, head=head)
    logits, cache = prefill(True)
    hidden, pending_cache = prefill(False)
    started, logprob = core.start(setup, logits, cache, keys, sampler, limit)
    pending = core.start_in_step(setup, hidden, pending_cache, keys, sampler, limit)
    pending, token, first_logprob, running, _ = core.step(setup, params, pending)
    return started, logprob, pending, token, first_logprob, running

  started, logprob, pending, token, first_logprob, running = both(params)
  assert pending.hidden.shape == (3, config.text.width) and running.all()
  np.testing.assert_array_equal(token, started.token)
  np.testing.assert_allclose(first_logprob, logprob, atol=1e-5)
  np.testing.assert_array_equal(pending.cache.end, n + lengths)
  np.testing.assert_array_equal(pending.cache.end, started.cache.end)
  np.testing.assert_array_equal(pending.step, started.step)
  np.testing.assert_array_equal(pending.done, started.done)
  step = jax.jit(lambda params, state: core.step(setup, params, state)[:4])
  for _ in range(NEW - 1):
    started, want, want_logprob, want_running = step(params, started)
    pending, got, got_logprob, got_running = step(params, pending)
    np.testing.assert_array_equal(got_running, want_running)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_logprob, want_logprob, atol=1e-5)
    np.testing.assert_array_equal(pending.cache.end, started.cache.end)
  assert started.done.all() and pending.done.all()
  np.testing.assert_array_equal(pending.step, started.step)
