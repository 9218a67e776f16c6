"""Generation parity with transformers' generate, batching, <eos>, samplers and compile reuse."""

import gc
import os
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from paligemma_jax import errors
from paligemma_jax.checkpoints import loading
from paligemma_jax.decoding import autoregressive
from paligemma_jax.decoding import inference
from paligemma_jax.decoding import sampling
from paligemma_jax.model import paligemma

MAX_NEW = 12  # Past the tiny Gemma 2 sliding window (8): generated tokens lose the early prefix.


@pytest.fixture(scope="module", params=[1, 2], ids=["pg1", "pg2"])
def model(request, converted_checkpoint):
  directory, reference = converted_checkpoint(request.param)
  params, config, tokenizer = loading.load_model(directory)
  return reference, params, config, tokenizer


@pytest.fixture(scope="module")
def pg1(converted_checkpoint):
  """(params, config, tokenizer) of PaliGemma 1 alone: for behaviour that does not depend on the
  model family."""
  return loading.load_model(converted_checkpoint(1)[0])


@pytest.mark.parametrize("kind", ["converted", "hf"])
def test_load_model_puts_each_kind_on_the_device_in_the_layout_asked(converted_checkpoint, kind):
  """Device arrays, not host ones a jitted call would transfer again on every call; layers apart
  (the CPU decoding layout) equal to the stacked ones."""
  directory, _ = converted_checkpoint(1)
  path = directory if kind == "converted" else os.path.join(os.path.dirname(directory), "hf")
  stacked, apart = loading.load_model(path), loading.load_model(path, scan_layers=False)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves((stacked.params, apart.params)))
  assert (stacked.config.scan_layers, apart.config.scan_layers) == (True, False)
  assert "layers" in stacked.params["llm"] and "layers" not in apart.params["llm"]
  jax.tree.map(np.testing.assert_array_equal, apart.params,
               paligemma.decoding_layout(stacked.params))
  override = loading.load_model(path, scan_layers=False, config=stacked.config)  # --config.
  jax.tree.map(np.testing.assert_array_equal, override.params, apart.params)
  other = stacked.config.copy_and_resolve_references()
  other.text.depth += 1
  with pytest.raises(errors.InputError, match="does not match the checkpoint"):
    loading.load_model(path, scan_layers=False, config=other)
  quantized = loading.load_model(path, scan_layers=False, quantize="int8")  # From host leaves.
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(quantized.params))
  assert "layers_1" in quantized.params["llm"] and not quantized.config.scan_layers


def prompts(config, lengths, seed=0):
  """Right-padded prompts of the given lengths (image tokens, <bos>, random text)."""
  rng = np.random.RandomState(seed)
  n, t = paligemma.num_image_tokens(config), max(lengths)
  tokens = rng.randint(5, config.image_token_id, size=(len(lengths), t)).astype(np.int32)
  tokens[:, :n], tokens[:, n] = config.image_token_id, 2
  input_mask = np.arange(t)[None] < np.array(lengths)[:, None]
  s = config.vision.image_size
  images = rng.uniform(-1, 1, (len(lengths), s, s, 3)).astype(np.float32)
  return np.where(input_mask, tokens, 0), images, input_mask, input_mask.copy()


def reference_generate(model, tokens, images, eos_id=1, max_new=MAX_NEW):
  """transformers greedy generate for one unpadded row: (new tokens, their log-probs)."""
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(tokens[None], dtype=torch.long),
                         pixel_values=torch.tensor(images[None].transpose(0, 3, 1, 2)),
                         attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
                         token_type_ids=torch.zeros(1, len(tokens), dtype=torch.long),
                         max_new_tokens=max_new, do_sample=False, eos_token_id=eos_id, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
  new = out.sequences[0, len(tokens):].numpy()
  logprobs = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(out.logits, new)]
  if eos_id in new:  # transformers includes the <eos>; we report it as the stop reason.
    k = list(new).index(eos_id)
    return new[:k], np.array(logprobs[:k]), "eos"
  return new, np.array(logprobs), "length"


def test_greedy_padded_batch_matches_transformers_row_by_row(model):
  reference, params, config, _ = model
  n = paligemma.num_image_tokens(config)
  lengths = [n + 9, n + 3, n + 6]
  tokens, images, input_mask, prefix_mask = prompts(config, lengths)
  generation = autoregressive.Generator(params, config).generate(tokens, images, input_mask, prefix_mask,
                                                         max_new_tokens=MAX_NEW)
  for b, length in enumerate(lengths):
    ours, our_logprobs, our_reason = generation.row(b)
    theirs, their_logprobs, their_reason = reference_generate(reference, tokens[b, :length], images[b])
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(our_logprobs, their_logprobs, atol=1e-4)
    assert our_reason == their_reason
    # The row equals its unbatched run.
    single = autoregressive.Generator(params, config).generate(
        tokens[b:b + 1, :length], images[b:b + 1], input_mask[b:b + 1, :length],
        prefix_mask[b:b + 1, :length], max_new_tokens=MAX_NEW)
    assert single.row(0)[0] == ours
    np.testing.assert_allclose(single.row(0)[1], our_logprobs, atol=1e-5)


def test_both_weight_layouts_decode_alike(model):
  """Stacked layers (GPU/TPU default) and per-layer weights (CPU default) give the same tokens."""
  _, params, config, _ = model
  n = paligemma.num_image_tokens(config)
  batch = prompts(config, [n + 9, n + 3], seed=3)
  unstacked, stacked = (autoregressive.Generator(params, config, scan_layers=s) for s in (False, True))
  assert "layers_0" in unstacked.params["llm"] and "layers" in stacked.params["llm"]
  a, b = (d.generate(*batch, max_new_tokens=MAX_NEW) for d in (unstacked, stacked))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
  with pytest.raises(ValueError, match="stacked layers"):
    autoregressive.Generator(unstacked.params, config, scan_layers=True)
  assert autoregressive.Generator(None, config).scan_layers == (jax.default_backend() != "cpu")


def test_rows_stop_at_eos_like_transformers(model):
  reference, params, config, _ = model
  n = paligemma.num_image_tokens(config)
  tokens, images, input_mask, prefix_mask = prompts(config, [n + 5, n + 8], seed=3)
  free = autoregressive.Generator(params, config).generate(tokens, images, input_mask, prefix_mask,
                                                   max_new_tokens=MAX_NEW)
  eos = int(free.tokens[0, 3])  # Make row 0's 4th token the end of sequence.
  generation = autoregressive.Generator(params, config, eos_id=eos).generate(
      tokens, images, input_mask, prefix_mask, max_new_tokens=MAX_NEW)
  first = list(free.tokens[0]).index(eos)
  assert generation.row(0)[0] == list(free.tokens[0, :first]) and generation.row(0)[2] == "eos"
  assert np.all(generation.tokens[0, first + 1:] == 0)  # Padding after the stop.
  for b, length in enumerate([n + 5, n + 8]):
    theirs, _, reason = reference_generate(reference, tokens[b, :length], images[b], eos_id=eos)
    assert generation.row(b)[0] == list(theirs) and generation.row(b)[2] == reason


def test_samplers_are_seeded_and_topk1_is_greedy(model):
  _, params, config, _ = model
  n = paligemma.num_image_tokens(config)
  batch = prompts(config, [n + 4, n + 7], seed=5)
  generator = autoregressive.Generator(params, config)
  run = lambda sampler, seed: generator.generate(*batch, max_new_tokens=MAX_NEW, sampler=sampler,
                                               rng=jax.random.PRNGKey(seed)).tokens
  greedy = run(sampling.Sampler(), 0)
  np.testing.assert_array_equal(run(sampling.Sampler("top_k", top_k=1), 7), greedy)
  np.testing.assert_array_equal(run(sampling.Sampler("top_p", top_p=1e-6), 7), greedy)
  hot = sampling.Sampler("temperature", temperature=5.0)
  np.testing.assert_array_equal(run(hot, 1), run(hot, 1))
  assert not np.array_equal(run(hot, 1), run(hot, 2))
  for sampler in [sampling.Sampler("top_k", temperature=2.0, top_k=5),
                  sampling.Sampler("top_p", temperature=2.0, top_p=0.9)]:
    np.testing.assert_array_equal(run(sampler, 4), run(sampler, 4))
  # Sampler settings are traced values: all of the above shared one compiled loop.
  assert all(f._cache_size() == 1 for f in generator.compiled(MAX_NEW))


def row_keys(logits):
  return jax.random.split(jax.random.PRNGKey(0), logits.shape[0])


def test_top_k_draws_among_exactly_k_tied_tokens():
  """Ties with the k-th logit are not all kept: exactly k tokens, the lower ids first."""
  logits = jnp.array([[1.0, 3.0, 3.0, 3.0, 3.0, 0.0]] * 2000, jnp.float32)
  draw = lambda logits, sampler: set(np.asarray(
      sampling.sample(logits, row_keys(logits), sampler.as_arrays())))
  for k, kept in [(2, {1, 2}), (3, {1, 2, 3}), (1, {1})]:
    assert draw(logits, sampling.Sampler("top_k", top_k=k)) == kept, k
  uniform = jnp.zeros((2000, 8), jnp.float32)  # Everything tied.
  # 0.25 < 0.3 <= 0.375: three tokens, not eight.
  assert draw(uniform, sampling.Sampler("top_p", top_p=0.3)) == {0, 1, 2}


def test_top_logprobs_are_the_most_likely_valid_ids_with_chosen_logprobs_values():
  """Against numpy: the k largest logits among the valid ids (ties: the lower id first, as
  greedy's argmax), valued as log_softmax over the whole table; the greedy choice comes first."""
  logits = np.array(jax.random.normal(jax.random.PRNGKey(4), (3, 50)) * 4, np.float32)
  logits[0, [7, 9, 11]] = 20.0  # Tied first: ids 7, 9, 11 in that order.
  logits[1, 3] = 50.0  # Most likely, but not valid.
  valid = np.ones((50,), bool)
  valid[[3, 40, 41]] = False
  ids, values = sampling.top_logprobs(jnp.asarray(logits), 6, jnp.asarray(valid))
  shifted = logits - logits.max(1, keepdims=True)
  want_logprobs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
  for row in range(3):
    order = [i for i in np.argsort(-logits[row], kind="stable") if valid[i]][:6]
    assert list(np.asarray(ids[row])) == order
    np.testing.assert_allclose(values[row], want_logprobs[row, order], rtol=1e-6, atol=1e-6)
  assert list(np.asarray(ids[0, :3])) == [7, 9, 11]
  greedy = sampling.sample(jnp.asarray(logits), row_keys(logits), sampling.Sampler().as_arrays(),
                           jnp.asarray(valid))
  np.testing.assert_array_equal(ids[:, 0], greedy)
  np.testing.assert_array_equal(values[:, 0], sampling.chosen_logprobs(jnp.asarray(logits), greedy))


def test_invalid_ids_are_never_chosen_by_any_sampler():
  logits = jnp.array([[0.0, 1.0, 2.0, 9.0, 8.0]] * 500, jnp.float32)  # The best two are invalid.
  valid = jnp.array([True, True, True, False, False])
  for sampler in [sampling.Sampler(), sampling.Sampler("temperature", temperature=1e4),
                  sampling.Sampler("top_k", temperature=1e4, top_k=4),
                  sampling.Sampler("top_p", temperature=1e4, top_p=1.0)]:
    draws = np.asarray(sampling.sample(logits, row_keys(logits), sampler.as_arrays(), valid))
    assert set(draws) == ({2} if sampler.method == "greedy" else {0, 1, 2}), sampler


def test_generator_produces_only_tokenizer_ids_at_high_temperature(pg1):
  """The embedding's padding rows and the image token are never produced, greedy included;
  log-probs stay those of the raw logits."""
  params, config, tokenizer = pg1
  n = paligemma.num_image_tokens(config)
  batch = prompts(config, [n + 4, n + 7, n + 2, n + 5], seed=2)
  assert tokenizer.vocab_size <= config.image_token_id < config.text.vocab_size  # Padding rows.
  unmasked = autoregressive.Generator(params, config, eos_id=-1)
  masked = autoregressive.Generator(params, config, eos_id=-1, vocab_size=tokenizer.vocab_size)
  hot = sampling.Sampler("temperature", temperature=1e4)  # Near uniform over the table.
  run = lambda generator, sampler: generator.generate(
      *batch, max_new_tokens=MAX_NEW, sampler=sampler, rng=jax.random.PRNGKey(3))
  assert (run(unmasked, hot).tokens >= tokenizer.vocab_size).any()  # What the mask prevents.
  for sampler in [hot, sampling.Sampler("top_p", temperature=1e4, top_p=0.99)]:
    tokens = run(masked, sampler).tokens
    assert tokens.max() < tokenizer.vocab_size and len(np.unique(tokens)) > 20
  # Greedy: give the image token and the last padding row the largest logits.
  table = params["llm"]["embedder"]["input_embedding"]
  boost = 1e3 * jnp.sign(table).mean(0)
  table = table.at[config.image_token_id].set(boost).at[config.text.vocab_size - 1].set(boost)
  unmasked.params = masked.params = {**params, "llm": {**params["llm"],
                                                       "embedder": {"input_embedding": table}}}
  free, kept = run(unmasked, sampling.Sampler()), run(masked, sampling.Sampler())
  invalid = free.tokens[:, 0] >= tokenizer.vocab_size
  assert invalid.any() and kept.tokens.max() < tokenizer.vocab_size
  # The log-softmax of the raw logits, where the boosted ids took most of the probability.
  assert np.all(kept.logprobs[invalid, 0] < free.logprobs[invalid, 0] - 1)


def test_a_dropped_generator_and_its_weights_are_freed(pg1):
  """Nothing global (a method cache) keeps a generator or its decoding-layout weights alive."""
  params, config, _ = pg1
  n = paligemma.num_image_tokens(config)
  generator = autoregressive.Generator(params, config, scan_layers=False)  # Makes its own weights.
  generator.generate(*prompts(config, [n + 3]), max_new_tokens=2)
  dropped = weakref.ref(generator)
  weights = weakref.ref(generator.params["llm"]["layers_0"]["attn"]["q"]["kernel"])
  del generator
  gc.collect()
  assert dropped() is None and weights() is None


def test_top_k_and_top_p_keep_the_right_tokens():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000, jnp.float32))
  draw = lambda sampler: np.asarray(sampling.sample(logits, row_keys(logits), sampler.as_arrays()))
  assert set(draw(sampling.Sampler("top_k", top_k=2))) == {0, 1}
  assert set(draw(sampling.Sampler("top_p", top_p=0.7))) == {0, 1}  # 0.5 < 0.7 <= 0.8.
  assert set(draw(sampling.Sampler("top_p", top_p=0.5))) == {0}
  assert set(draw(sampling.Sampler("top_p", top_p=0.81))) == {0, 1, 2}
  counts = np.bincount(draw(sampling.Sampler("temperature")), minlength=4) / 2000
  np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.04)


def test_equal_shapes_compile_once(model):
  _, params, config, _ = model
  n = paligemma.num_image_tokens(config)
  generator = autoregressive.Generator(params, config)
  for lengths in ([n + 3, n + 9], [n + 7, n + 2], [n + 5, n + 5]):  # One padded length (n + 9).
    tokens, images, input_mask, prefix_mask = prompts(config, lengths)
    pad = n + 9 - tokens.shape[1]
    widen = lambda x: np.pad(x, [(0, 0), (0, pad)])
    generator.generate(widen(tokens), images, widen(input_mask), widen(prefix_mask),
                       max_new_tokens=4)
  prefill, loop = generator.compiled(4)
  assert prefill._cache_size() == 1 and loop._cache_size() == 1


def test_sampler_arguments_are_checked():
  with pytest.raises(ValueError, match="Unknown sampler"):
    sampling.Sampler("beam")
  with pytest.raises(ValueError, match="top_k"):
    sampling.Sampler("top_k", top_k=0)
  with pytest.raises(ValueError, match="top_p"):
    sampling.Sampler("top_p", top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    sampling.Sampler("temperature", temperature=0.0)


def test_a_bad_example_becomes_its_error_and_the_rest_run(pg1, tmp_path):
  """A prompt the tokenizer cannot take (a lone surrogate), a too-long prompt or a missing image
  are that example's `error`; the others in the batch are answered as when run alone."""
  params, config, tokenizer = pg1
  Image.new("RGB", (20, 10), (0, 128, 255)).save(tmp_path / "blue.png")
  image = str(tmp_path / "blue.png")
  predictor = inference.Predictor(params, config, tokenizer, batch_size=4)
  examples = [inference.Example(image, "caption en", {"i": 0}),
              inference.Example(image, "caption \ud83d en", {"i": 1}),
              inference.Example(str(tmp_path / "missing.png"), "caption en", {"i": 2}),
              inference.Example(image, "x " * 9000, {"i": 3}),
              inference.Example(image, "describe en", {"i": 4})]
  results = list(predictor.predict(examples, max_new_tokens=3))
  assert [r["i"] for r in results] == [0, 1, 2, 3, 4]
  assert "surrogates not allowed" in results[1]["error"] and "text" not in results[1]
  assert "missing.png" in results[2]["error"] and "exceeds" in results[3]["error"]
  alone = list(predictor.predict([examples[0], examples[4]], max_new_tokens=3))
  for r, want in zip([results[0], results[4]], alone):
    assert "error" not in r and r["tokens"] == want["tokens"]


def test_too_long_requests_are_refused(model):
  _, params, config, tokenizer = model
  predictor = inference.Predictor(params, config, tokenizer)
  assert predictor.length_error(100, 10) is None
  assert "exceeds" in predictor.length_error(predictor.max_positions - 5, 10)
  with pytest.raises(ValueError, match="max_new_tokens"):
    autoregressive.Generator(params, config).generate(*prompts(config, [20]), max_new_tokens=0)


def test_a_sampled_row_depends_on_its_own_key_only(pg1, tmp_path):
  """Batch neighbours and batch boundaries do not change a sampled answer, so a run resumed
  at example k (first_index=k) answers as the whole run did."""
  params, config, tokenizer = pg1
  n = paligemma.num_image_tokens(config)
  tokens, images, input_mask, prefix_mask = prompts(config, [n + 4, n + 7, n + 5], seed=8)
  generator = autoregressive.Generator(params, config, vocab_size=tokenizer.vocab_size)
  hot = sampling.Sampler("temperature", temperature=1e3)  # Near uniform: keys decide.
  keys = jax.random.split(jax.random.PRNGKey(5), 3)
  run = lambda rows: generator.generate(tokens[rows], images[rows], input_mask[rows],
                                        prefix_mask[rows], max_new_tokens=MAX_NEW, sampler=hot,
                                        rng=keys[np.asarray(rows)]).tokens
  np.testing.assert_array_equal(run([0, 1])[0], run([0, 2])[0])

  colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
  examples = []
  for i, color in enumerate(colors * 2):
    Image.new("RGB", (16, 12), color).save(tmp_path / f"{i}.png")
    examples.append(inference.Example(str(tmp_path / f"{i}.png"), "caption en"))
  predictor = inference.Predictor(params, config, tokenizer, batch_size=4)
  whole = [r["tokens"] for r in predictor.predict(examples, max_new_tokens=MAX_NEW, sampler=hot,
                                                  seed=3)]
  resumed = [r["tokens"] for r in predictor.predict(examples[3:], max_new_tokens=MAX_NEW,
                                                    sampler=hot, seed=3, first_index=3)]
  assert resumed == whole[3:] and whole[0] != whole[3]  # Same image, other key: other answer.
