"""The KV cache (paligemma_jax/model/kv_cache.py): int8 quantization of keys and values, the cache
operations on both kinds, its size, every decoding loop on an int8 cache, and an int8 cache
against the float one at real widths."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_fixtures
from configs import paligemma as presets
from paligemma_jax.checkpoints import loading
from paligemma_jax.decoding import autoregressive
from paligemma_jax.decoding import beam_search
from paligemma_jax.decoding import core
from paligemma_jax.decoding import sampling
from paligemma_jax.decoding import scoring
from paligemma_jax.model import kv_cache
from paligemma_jax.model import paligemma


def test_quantize_rounds_each_token_and_head_to_half_a_step():
  rng = np.random.RandomState(0)
  x = rng.normal(size=(2, 5, 3, 16)) * rng.uniform(0.01, 100, size=(2, 5, 3, 1))
  x[1, 2, 0] = 0  # An all-zero key: scale 0, no division by zero.
  q, scale = kv_cache.quantize(jnp.asarray(x, jnp.float32))
  assert q.dtype == jnp.int8 and scale.dtype == jnp.float32 and scale.shape == (2, 5, 3)
  np.testing.assert_allclose(scale, np.abs(x).max(-1) / 127, rtol=1e-6)
  assert scale[1, 2, 0] == 0 and (np.asarray(q)[1, 2, 0] == 0).all()
  largest = np.abs(np.asarray(q)).max(-1)
  assert (largest[scale > 0] == 127).all()  # Symmetric: each vector's largest maps to +-127.
  got = np.asarray(kv_cache.dequantize(q, scale, jnp.float32))
  assert np.isfinite(got).all() and (got[1, 2, 0] == 0).all()
  assert (np.abs(got - x) <= np.asarray(scale)[..., None] * (0.5 + 1e-5)).all()
  assert kv_cache.dequantize(q, scale, jnp.bfloat16).dtype == jnp.bfloat16  # The compute dtype.


def test_both_kinds_write_read_take_and_put_rows():
  rng = np.random.RandomState(1)
  new = [jnp.asarray(rng.normal(size=(3, 2, 2, 8)), jnp.float32) for _ in range(2)]  # k, v
  start = jnp.array([0, 2, 3])
  for dtype in (jnp.float32, jnp.int8):
    cache = kv_cache.init(2, 3, 6, 2, 8, dtype)
    assert cache.quantized == (dtype == jnp.int8) and cache.k.dtype == dtype
    cache = kv_cache.write_layer(cache.replace(end=start), 1, *new)
    k, v = kv_cache.read_layer(cache, 1, jnp.float32)
    assert k.shape == (3, 6, 2, 8) and k.dtype == jnp.float32
    for got, x in ((k, new[0]), (v, new[1])):
      want = x if dtype == jnp.float32 else kv_cache.dequantize(*kv_cache.quantize(x), jnp.float32)
      for b, s in enumerate(start.tolist()):  # Row b's two tokens at slots s, s + 1; zeros elsewhere.
        np.testing.assert_array_equal(got[b, s:s + 2], want[b])
        assert not np.asarray(got[b, :s]).any() and not np.asarray(got[b, s + 2:]).any()
      if dtype == jnp.int8:
        assert 0 < np.abs(np.asarray(got[0, :2]) - np.asarray(x[0])).max() < 0.02
    assert not np.asarray(kv_cache.read_layer(cache, 0, jnp.float32)[0]).any()  # Other layer.

    taken = kv_cache.take_rows(cache, jnp.array([2, 2, 0]))
    np.testing.assert_array_equal(taken.end, [3, 3, 0])
    np.testing.assert_array_equal(kv_cache.read_layer(taken, 1, jnp.float32)[0][1], k[2])
    bigger = kv_cache.put_rows(kv_cache.init(2, 4, 9, 2, 8, dtype), jnp.array([3, 0, 7]), cache)
    np.testing.assert_array_equal(bigger.end, [2, 0, 0, 0])  # Row 7 is out of range: dropped.
    read = kv_cache.read_layer(bigger, 1, jnp.float32)[0]
    np.testing.assert_array_equal(read[3, :6], k[0])
    np.testing.assert_array_equal(read[0, :6], k[1])
    assert not np.asarray(read[1:3]).any() and not np.asarray(read[:, 6:]).any()
  with pytest.raises(ValueError, match="int8"):
    kv_cache.put_rows(kv_cache.init(1, 1, 2, 1, 4, jnp.int8), jnp.array([0]),
                      kv_cache.init(1, 1, 2, 1, 4))
  for bad in ("int4", "int32", "uint8", "auto"):
    with pytest.raises(ValueError, match="float dtype or int8"):
      kv_cache.init(1, 1, 2, 1, 4, bad)
    with pytest.raises(ValueError, match="float dtype or int8"):
      core.Setup.create(presets.get_config("tiny-pg1"), cache_dtype=bad)


def vmapped_write(buffer, layer, new, start):
  """The cache write as it was: a per-row dynamic_update_slice under vmap (the reference)."""
  def row(buf, upd, s):
    return jax.lax.dynamic_update_slice(buf, upd[None].astype(buf.dtype),
                                        (layer, s) + (0,) * (buf.ndim - 2))
  return jax.vmap(row, in_axes=(1, 0, 0), out_axes=1)(buffer, new, start)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int8])
def test_scatter_write_equals_the_per_row_slice_write(dtype):
  """kv_cache.write writes exactly what a per-row dynamic_update_slice wrote, in every cache dtype
  and for the int8 cache's scales, jitted as the loops run it, starts past the end clamped alike."""
  rng = np.random.RandomState(2)
  buffer = jnp.asarray(rng.normal(size=(3, 4, 7, 2, 8)) * 50, dtype)  # [L, B, S, K, H]
  scales = jnp.asarray(rng.uniform(size=(3, 4, 7, 2)), jnp.float32)  # [L, B, S, K]
  for t, start in ((1, [0, 3, 6, 9]), (3, [0, 2, 4, 6]), (7, [0, 0, 0, 0])):
    new = jnp.asarray(rng.normal(size=(4, t, 2, 8)) * 50, jnp.float32)
    quantized, scale = kv_cache.quantize(new)
    for layer in (0, 2, jnp.int32(1)):
      for buf, upd in ((buffer, quantized if dtype == jnp.int8 else new), (scales, scale)):
        want = vmapped_write(buf, layer, upd, jnp.array(start))
        got = jax.jit(kv_cache.write)(buf, layer, upd, jnp.array(start))
        assert got.dtype == buf.dtype
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)),
                                      np.asarray(want.astype(jnp.float32)))


def test_bytes_per_token():
  config = presets.get_config("pg2-10b-896")  # 42 layers, 8 kv heads of 256.
  bf16 = paligemma.cache_bytes_per_token(config, "bfloat16")
  assert bf16 == 42 * 8 * 256 * 2 * 2 == 336 << 10
  assert 4096 * bf16 == 1.3125 * 2**30  # A row of 896 px image tokens: 1.3 GiB.
  assert paligemma.cache_bytes_per_token(config, "float32") == 2 * bf16
  assert paligemma.cache_bytes_per_token(config, "int8") == 42 * 8 * (256 + 4) * 2
  assert paligemma.cache_bytes_per_token(config) == 2 * bf16  # The compute dtype, float32.


def test_every_loop_decodes_over_an_int8_cache_alike(converted_checkpoint):
  """Generator, beam search and scoring take cache_dtype="int8" and hold int8 keys and values;
  the log-probs each loop reports equal those of teacher-forced scoring of its tokens over an
  int8 cache: a token is quantized once, on its own, whether a prefill, a decode step or a
  suffix writes it."""
  params, config, _ = loading.load_model(converted_checkpoint(2)[0])
  tokens, images, mask = hf_fixtures.text_prompts(config, [3, 7])
  steps = 6
  generator = autoregressive.Generator(params, config, eos_id=-1, cache_dtype="int8")
  assert generator.cache_dtype == jnp.int8
  prefill, _ = generator.compiled(steps)
  state = prefill(generator.params, tokens, images, mask, mask,
                  core.row_keys(jax.random.PRNGKey(0), [0, 1]),
                  sampling.Sampler().as_arrays())
  cache = state.rows.cache
  assert cache.k.dtype == jnp.int8 and cache.k_scale.shape == cache.k.shape[:-1]
  greedy = generator.generate(tokens, images, mask, mask, max_new_tokens=steps)
  beams = beam_search.BeamGenerator(generator).generate(
      tokens, images, mask, mask, max_new_tokens=steps, sampler=beam_search.BeamSearch(2, 0.0))

  suffixes = np.concatenate([greedy.tokens, beams.tokens])
  setup = scoring.make_setup(config, cache_dtype="int8")
  int8 = np.asarray(jax.jit(functools.partial(scoring.suffix_logprobs, setup))(
      params, tokens, images, mask, suffixes, np.ones(suffixes.shape, bool), np.array([0, 1, 0, 1])))
  np.testing.assert_allclose(int8[:2], greedy.logprobs, atol=1e-4)
  np.testing.assert_allclose(int8[2:], beams.logprobs, atol=1e-4)
  np.testing.assert_allclose(int8[2:].sum(1), beams.scores, atol=1e-4)


@pytest.mark.xdist_group("real_width")
def test_int8_cache_keeps_greedy_tokens_and_log_probs_at_real_widths(real_width_model,
                                                                    real_width_greedy):
  """Prompts of 3, 11 and 20 text tokens, 16 new tokens (conftest.py): the same greedy tokens as
  the float cache and log-probs within 0.05."""
  _, config = real_width_model
  assert config.text.head_dim == 256 and config.text.vocab_size == 257216
  want, got = real_width_greedy(), real_width_greedy(cache_dtype="int8")
  assert want.tokens.shape[1] == 16
  assert want.logprobs.min() < -0.3  # Not saturated: log-probs near 0 would hide any error.
  np.testing.assert_array_equal(got.tokens, want.tokens)
  error = np.abs(got.logprobs - want.logprobs).max()
  assert 0 < error < 0.05, error
