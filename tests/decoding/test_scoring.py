"""Teacher-forced suffix log-likelihoods against transformers, batching, errors."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from paligemma_jax.checkpoints import loading
from paligemma_jax.decoding import scoring
from paligemma_jax.preprocess import processor
from paligemma_jax.tasks import score

SUFFIXES = ["cat", "a red car on the street near two trees", "dog ; <loc0012><loc0400> man"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  paths = []
  for i, size in enumerate([(20, 12), (9, 30)]):
    path = root / f"img{i}.png"
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8)).save(path)
    paths.append(str(path))
  return paths


def reference_logprob(model, config, tokens, prefix_mask, image_path):
  """Sum of transformers' log-softmax at the suffix labels (token_type_ids 1 = suffix)."""
  pixels = processor.preprocess_image(processor.load_image(image_path), config.vision.image_size)
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(tokens[None], dtype=torch.long),
                   pixel_values=torch.tensor(pixels[None].transpose(0, 3, 1, 2)),
                   attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
                   token_type_ids=torch.tensor(~prefix_mask[None], dtype=torch.long)).logits[0]
  logprobs = torch.log_softmax(logits.double(), -1).numpy()
  targets = np.flatnonzero(~prefix_mask)
  return float(sum(logprobs[t - 1, tokens[t]] for t in targets))


@pytest.mark.parametrize("version", [1, 2])
def test_sum_logprobs_match_transformers(converted_checkpoint, images, version):
  path, model = converted_checkpoint(version)
  params, config, tokenizer = loading.load_model(path)
  # One bucket for every row (T = 64, K = 32): a single compile.
  scorer = scoring.Scorer(params, config, tokenizer, batch_size=2, bucket=64, target_bucket=32)
  examples = [scoring.Candidates(images[0], "answer en what is this?", SUFFIXES, {"id": 7}),
              scoring.Candidates(images[1], "caption en", SUFFIXES[1:])]
  results = list(scorer.score(examples))  # 5 rows in batches of 2: the last is padded.
  assert [r.get("id") for r in results] == [7, None] and "error" not in results[0]
  for example, result in zip(examples, results):
    want = []
    for suffix in example.suffixes:
      tokens, prefix_mask, n = scorer.row(example.prompt, suffix)
      assert n == len(tokenizer.encode(suffix)) + 1  # The suffix and its <eos>.
      want.append(reference_logprob(model, config, tokens, prefix_mask, example.image))
    np.testing.assert_allclose(result["logprob"], want, rtol=0, atol=1e-4)
    assert result["num_tokens"] == [len(tokenizer.encode(s)) + 1 for s in example.suffixes]
    np.testing.assert_allclose(result["mean_logprob"], np.array(want) / result["num_tokens"], atol=1e-5)
    assert result["choice"] == int(np.argmax(want))
    assert min(want) < -1.0  # Random weights: nothing is trivially likely.
  # One bucket (T = 64, K = 32); batches run 1 or 2 prompts: at most two compiles.
  assert scorer.logprobs_fn._cache_size() <= 2


def test_batches_pad_and_keep_order_and_shapes(converted_checkpoint, images):
  path, _ = converted_checkpoint(1)
  params, config, tokenizer = loading.load_model(path)
  scorer = scoring.Scorer(params, config, tokenizer, batch_size=3)
  short = ["cat", "dog man", "red car"]  # Rows of at most 32 tokens with the caption prompt.
  # Examples i and i + 6 are the same, but sit at other places in their batches, beside other
  # rows, and the last one in a batch padded with dummy rows.
  examples = [scoring.Candidates(images[i % 2], "caption en", short[:1 + i % 3], {"i": i})
              for i in range(10)]
  examples.insert(2, scoring.Candidates("missing.png", "caption en", ["cat"], {"i": "bad"}))
  examples.insert(4, scoring.Candidates(images[0], "caption en", [], {"i": "empty"}))
  # Text the tokenizer cannot take (a lone surrogate), in the prompt or in a suffix.
  examples.insert(5, scoring.Candidates(images[0], "caption \ud83d", ["cat"], {"i": "prompt"}))
  examples.insert(6, scoring.Candidates(images[0], "caption en", ["cat", "\ud83d"],
                                        {"i": "suffix"}))
  results = list(scorer.score(examples))
  assert [r["i"] for r in results] == [0, 1, "bad", 2, "empty", "prompt", "suffix", 3, 4, 5, 6, 7,
                                       8, 9]
  assert "Image not found: missing.png" in results[2]["error"]
  assert results[4]["error"] == "no suffixes to score"
  assert all("surrogates not allowed" in r["error"] for r in results[5:7])
  by_index = {r["i"]: r for r in results}
  assert sum(len(short[:1 + i % 3]) for i in range(10)) % 3 != 0  # The last batch is padded.
  for i in range(4):
    assert len(by_index[i]["logprob"]) == 1 + i % 3
    np.testing.assert_allclose(by_index[i]["logprob"], by_index[i + 6]["logprob"], atol=1e-5)
  assert abs(by_index[0]["logprob"][0] - by_index[1]["logprob"][0]) > 1e-3  # "cat", other image.
  # Every batch had one length bucket (T = 32, K = 16) and ran 1, 2 or 3 prompts: one compile
  # per prompt count, however many batches.
  assert scorer.logprobs_fn._cache_size() <= 3


def test_collate_runs_each_prompt_once_and_points_rows_at_theirs():
  # (tokens, prefix_mask, num_targets, pixels, group): rows 0 and 2 continue one prompt.
  rows = [(np.array([9, 9, 2, 5, 6, 7, 1]), np.array([1, 1, 1, 1, 0, 0, 0], bool), 3, [np.zeros((2, 2, 3))], "a"),
          (np.array([9, 9, 2, 8, 1]), np.array([1, 1, 1, 0, 0], bool), 2, [np.ones((2, 2, 3))], "b"),
          (np.array([9, 9, 2, 5, 4, 1]), np.array([1, 1, 1, 1, 0, 0], bool), 2, [np.zeros((2, 2, 3))], "a")]
  prompt_tokens, images, prompt_mask, suffix_tokens, suffix_mask, source, image_index = (
      scoring.collate(rows, 4, 8, 4))
  assert prompt_tokens.shape == (2, 8) and images.shape == (2, 2, 2, 3) and suffix_tokens.shape == (4, 4)
  assert image_index is None  # One image per prompt.
  np.testing.assert_array_equal(prompt_tokens[:, :4], [[9, 9, 2, 5], [9, 9, 2, 0]])
  np.testing.assert_array_equal(prompt_mask.sum(1), [4, 3])
  np.testing.assert_array_equal(images[:, 0, 0, 0], [0, 1])
  np.testing.assert_array_equal(source, [0, 1, 0, 0])
  np.testing.assert_array_equal(suffix_tokens[suffix_mask], [6, 7, 1, 8, 1, 4, 1])
  np.testing.assert_array_equal(suffix_mask.sum(1), [3, 2, 2, 0])  # The dummy row has no targets.
  # Three prompts run as four (a power of two), the dummy repeating the first.
  third = (np.array([9, 9, 2, 3, 1]), np.array([1, 1, 1, 1, 0], bool), 1, [np.ones((2, 2, 3))], "c")
  prompt_tokens, images, prompt_mask, *_, source, _ = scoring.collate(rows + [third], 4, 8, 4)
  assert prompt_tokens.shape == (4, 8) and images.shape == (4, 2, 2, 3)
  np.testing.assert_array_equal(prompt_mask.sum(1), [4, 3, 4, 4])
  np.testing.assert_array_equal(prompt_tokens[3], prompt_tokens[0])
  np.testing.assert_array_equal(source, [0, 1, 0, 2])


def test_perplexity():
  assert score.perplexity([-2.0, -4.0], [2, 4]) == pytest.approx(math.e)
  assert math.isnan(score.perplexity([], []))
