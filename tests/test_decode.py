"""Generation parity with transformers' generate, batching, <eos>, samplers and compile reuse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from paligemma_jax import decode
from paligemma_jax import inference
from paligemma_jax import paligemma
from paligemma_jax import sampling

MAX_NEW = 12  # Past the tiny Gemma 2 sliding window (8): generated tokens lose the early prefix.


@pytest.fixture(scope="module", params=[1, 2], ids=["pg1", "pg2"])
def model(request, converted_checkpoint):
  directory, reference = converted_checkpoint(request.param)
  params, config, tokenizer = inference.load_model(directory)
  return reference, params, config, tokenizer


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
  generation = decode.Decoder(config, params).generate(tokens, images, input_mask, prefix_mask,
                                                       max_new_tokens=MAX_NEW)
  for b, length in enumerate(lengths):
    ours, our_logprobs, our_reason = generation.row(b)
    theirs, their_logprobs, their_reason = reference_generate(reference, tokens[b, :length], images[b])
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(our_logprobs, their_logprobs, atol=1e-4)
    assert our_reason == their_reason
    # The row equals its unbatched run.
    single = decode.Decoder(config, params).generate(
        tokens[b:b + 1, :length], images[b:b + 1], input_mask[b:b + 1, :length],
        prefix_mask[b:b + 1, :length], max_new_tokens=MAX_NEW)
    assert single.row(0)[0] == ours
    np.testing.assert_allclose(single.row(0)[1], our_logprobs, atol=1e-5)


def test_both_weight_layouts_decode_alike(model):
  """Stacked layers (GPU/TPU default) and per-layer weights (CPU default) give the same tokens."""
  _, params, config, _ = model
  n = paligemma.num_image_tokens(config)
  batch = prompts(config, [n + 9, n + 3], seed=3)
  unstacked, stacked = (decode.Decoder(config, params, unstack_layers=u) for u in (True, False))
  assert "layers_0" in unstacked.params["llm"] and "layers" in stacked.params["llm"]
  a, b = (d.generate(*batch, max_new_tokens=MAX_NEW) for d in (unstacked, stacked))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
  with pytest.raises(ValueError, match="stacked layers"):
    decode.Decoder(config, unstacked.params, unstack_layers=False)
  assert decode.Decoder(config, None).unstack_layers == (jax.default_backend() == "cpu")


def test_rows_stop_at_eos_like_transformers(model):
  reference, params, config, _ = model
  n = paligemma.num_image_tokens(config)
  tokens, images, input_mask, prefix_mask = prompts(config, [n + 5, n + 8], seed=3)
  free = decode.Decoder(config, params).generate(tokens, images, input_mask, prefix_mask,
                                                 max_new_tokens=MAX_NEW)
  eos = int(free.tokens[0, 3])  # Make row 0's 4th token the end of sequence.
  generation = decode.Decoder(config, params, eos_id=eos).generate(
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
  decoder = decode.Decoder(config, params)
  run = lambda sampler, seed: decoder.generate(*batch, max_new_tokens=MAX_NEW, sampler=sampler,
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
  assert all(f._cache_size() == 1 for f in decoder.compiled(MAX_NEW))


def test_top_k_and_top_p_keep_the_right_tokens():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000, jnp.float32))
  draw = lambda sampler: np.asarray(sampling.sample(logits, jax.random.PRNGKey(0), sampler.as_arrays()))
  assert set(draw(sampling.Sampler("top_k", top_k=2))) == {0, 1}
  assert set(draw(sampling.Sampler("top_p", top_p=0.7))) == {0, 1}  # 0.5 < 0.7 <= 0.8.
  assert set(draw(sampling.Sampler("top_p", top_p=0.5))) == {0}
  assert set(draw(sampling.Sampler("top_p", top_p=0.81))) == {0, 1, 2}
  counts = np.bincount(draw(sampling.Sampler("temperature")), minlength=4) / 2000
  np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.04)


def test_equal_shapes_compile_once(model):
  _, params, config, _ = model
  n = paligemma.num_image_tokens(config)
  decoder = decode.Decoder(config, params)
  for lengths in ([n + 3, n + 9], [n + 7, n + 2], [n + 5, n + 5]):  # One padded length (n + 9).
    tokens, images, input_mask, prefix_mask = prompts(config, lengths)
    pad = n + 9 - tokens.shape[1]
    widen = lambda x: np.pad(x, [(0, 0), (0, pad)])
    decoder.generate(widen(tokens), images, widen(input_mask), widen(prefix_mask), max_new_tokens=4)
  prefill, loop = decoder.compiled(4)
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


def test_too_long_requests_are_refused(model):
  _, params, config, tokenizer = model
  predictor = inference.Predictor(config, params, tokenizer)
  assert predictor.length_error(100, 10) is None
  assert "exceeds" in predictor.length_error(predictor.max_positions - 5, 10)
  with pytest.raises(ValueError, match="max_new_tokens"):
    decode.Decoder(config, params).generate(*prompts(config, [20]), max_new_tokens=0)
