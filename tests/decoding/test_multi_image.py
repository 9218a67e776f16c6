"""Several images in one prompt: generation and scoring against transformers' multi-image inputs
(each image's N tokens in order before <bos>, pixel_values one image after another)."""

import numpy as np
import pytest
import torch
from PIL import Image

from paligemma_jax.checkpoints import loading
from paligemma_jax.decoding import autoregressive
from paligemma_jax.decoding import batching
from paligemma_jax.decoding import beam_search
from paligemma_jax.decoding import inference
from paligemma_jax.decoding import scoring
from paligemma_jax.model import paligemma

MAX_NEW = 10


@pytest.fixture(scope="module", params=[1, 2], ids=["pg1", "pg2"])
def model(request, converted_checkpoint):
  """(transformers model, params, config, tokenizer); the tiny Gemma 2's sliding window (8)
  cuts inside each image's 16 tokens."""
  directory, reference = converted_checkpoint(request.param)
  return (reference, *loading.load_model(directory))


@pytest.fixture(scope="module")
def pg1(converted_checkpoint):
  """PaliGemma 1 alone, for what does not depend on the model family."""
  directory, reference = converted_checkpoint(1)
  return (reference, *loading.load_model(directory))


def rows(config, counts, seed=0):
  """Per row: (unpadded tokens: N image tokens per image, <bos>, random text; its images)."""
  rng = np.random.RandomState(seed)
  n, s = paligemma.num_image_tokens(config), config.vision.image_size
  out = []
  for k in counts:
    text = rng.randint(5, config.image_token_id, size=3 + k).astype(np.int32)
    tokens = np.concatenate([np.full(k * n, config.image_token_id, np.int32), [2], text])
    out.append((tokens, [rng.uniform(-1, 1, (s, s, 3)).astype(np.float32) for _ in range(k)]))
  return out


def reference_generate(model, tokens, images):
  """transformers greedy generate for one row with its k images: (tokens, log-probs)."""
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(tokens[None], dtype=torch.long),
                         pixel_values=torch.tensor(np.stack(images).transpose(0, 3, 1, 2)),
                         attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
                         token_type_ids=torch.zeros(1, len(tokens), dtype=torch.long),
                         max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=-1, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
  new = out.sequences[0, len(tokens):].numpy()
  return new, np.array([torch.log_softmax(l[0].float(), -1)[t].item()
                        for l, t in zip(out.logits, new)])


def batch(examples):
  """Right-padded rows with `batching.image_batch`'s images."""
  length = max(len(t) for t, _ in examples)
  tokens, mask = batching.right_pad([t for t, _ in examples], length)
  images, image_index = batching.image_batch([i for _, i in examples])
  return tokens, images, mask, mask.copy(), image_index


def test_rows_with_two_three_and_one_image_match_transformers(model):
  reference, params, config, _ = model
  examples = rows(config, [2, 3, 1])
  generation = autoregressive.Generator(params, config, eos_id=-1).generate(
      *batch(examples), max_new_tokens=MAX_NEW)
  for b, (tokens, images) in enumerate(examples):
    theirs, their_logprobs = reference_generate(reference, tokens, images)
    ours, our_logprobs, _ = generation.row(b)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(our_logprobs, their_logprobs, atol=1e-4)


def test_image_order_matters_and_beam_search_takes_several_images(pg1):
  _, params, config, _ = pg1
  (tokens, images), = rows(config, [2], seed=1)
  generator = autoregressive.Generator(params, config, eos_id=-1)
  model = paligemma.PaliGemma(config)
  logits = lambda imgs: model.apply({"params": params}, *batch([(tokens, imgs)]))
  assert np.abs(logits(images) - logits(images[::-1])).max() > 1e-2
  beams = beam_search.BeamGenerator(generator).generate(
      *batch([(tokens, images)]), max_new_tokens=MAX_NEW, sampler=beam_search.BeamSearch(1))
  greedy = generator.generate(*batch([(tokens, images)]), max_new_tokens=MAX_NEW)
  np.testing.assert_array_equal(beams.tokens, greedy.tokens)  # One beam is greedy search.


def test_image_batch_runs_each_image_once():
  a, b, c = (np.full((2, 2, 3), v, np.float32) for v in range(3))
  images, index = batching.image_batch([[a], [b], [a]])
  assert index is None and images.shape == (3, 2, 2, 3)  # One per row: today's layout.
  images, index = batching.image_batch([[a, b], [c], [a, b]])  # A dummy row repeats row 0.
  assert images.shape[0] % 3 == 0 and images.shape[0] >= 3  # A multiple of the rows.
  assert index.shape == (3, 2)
  np.testing.assert_array_equal(images[:3], [a, b, c])
  np.testing.assert_array_equal(index, [[0, 1], [2, 0], [0, 1]])
  _, index = batching.image_batch([[a, b, c], [a]])
  assert index.shape == (2, 4)  # Image counts round up to a power of two.


def image_files(tmp_path, config, count, seed=0):
  rng = np.random.RandomState(seed)
  paths = []
  for i in range(count):
    path = tmp_path / f"img{i}.png"
    Image.fromarray(rng.randint(0, 256, (20 + i, 24, 3), np.uint8)).save(path)
    paths.append(str(path))
  return paths


def test_predictor_takes_examples_with_several_images(pg1, tmp_path):
  _, params, config, tokenizer = pg1
  paths = image_files(tmp_path, config, 3)
  predictor = inference.Predictor(params, config, tokenizer, batch_size=2)
  examples = [inference.Example(images=paths[:2], prompt="answer en which"),
              inference.Example(paths[2], "caption en"),
              inference.Example(images=paths[::-1], prompt="caption en", extra={"id": 7})]
  results = list(predictor.predict(examples, max_new_tokens=4))
  assert results[0]["images"] == paths[:2] and "image" not in results[0]
  assert results[0]["image_sizes"] == [[24, 20], [24, 21]] and results[0]["image_size"] == [24, 20]
  assert results[1]["image"] == paths[2] and "image_sizes" not in results[1]
  assert results[2]["id"] == 7
  for example, result in zip(examples, results):  # Each equals its run alone.
    alone, = inference.Predictor(params, config, tokenizer).predict([example], max_new_tokens=4)
    assert alone["tokens"] == result["tokens"]
    np.testing.assert_allclose(alone["logprobs"], result["logprobs"], atol=1e-5)


def test_missing_or_too_many_images_fail_only_their_example(pg1, tmp_path):
  _, params, config, tokenizer = pg1
  paths = image_files(tmp_path, config, 2)
  predictor = inference.Predictor(params, config, tokenizer, batch_size=4, bucket=8)
  n = paligemma.num_image_tokens(config)
  predictor.max_positions = 4 * n  # Room for two images and a short prompt, not for four.
  examples = [inference.Example(images=paths * 2, prompt="caption en"),
              inference.Example(images=[], prompt="caption en"),
              inference.Example(images=[paths[0], str(tmp_path / "gone.png")], prompt="x"),
              inference.Example(images=paths, prompt="caption en")]
  results = list(predictor.predict(examples, max_new_tokens=4))
  assert "exceeds the model's" in results[0]["error"] and "4 images" in results[0]["error"]
  assert "images" in results[1]["error"]
  assert "gone.png" in results[2]["error"]
  assert "error" not in results[3] and len(results[3]["tokens"]) == 4


def test_scores_with_several_images_match_transformers(model, tmp_path):
  reference, params, config, tokenizer = model
  paths = image_files(tmp_path, config, 2, seed=3)
  scorer = scoring.Scorer(params, config, tokenizer, batch_size=2)
  suffixes = ["left", "right one"]
  result, single = scorer.score([scoring.Candidates(images=paths, prompt="answer en which",
                                                    suffixes=suffixes),
                                 scoring.Candidates(paths[1], "answer en", ["no"])])
  pixels = np.stack(batching.prepare(inference.Example(images=paths), lambda k: [],
                                     config.vision.image_size).pixels)
  for suffix, ours in zip(suffixes, result["logprob"]):
    tokens, prefix_mask, _ = scorer.row("answer en which", suffix, num_images=2)
    with torch.no_grad():
      logits = reference(input_ids=torch.tensor(tokens[None], dtype=torch.long),
                         pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)),
                         token_type_ids=torch.tensor(~prefix_mask[None], dtype=torch.long)).logits
    logprobs = torch.log_softmax(logits[0, :-1].float(), -1).numpy()
    targets = np.flatnonzero(~prefix_mask)
    theirs = logprobs[targets - 1, tokens[targets]].sum()
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
  assert result["images"] == paths and single["image"] == paths[1]
