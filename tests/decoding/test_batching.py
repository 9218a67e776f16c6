"""The batching shared by the predictor and the scorer: prefetch, padding, buckets, the length
check and per-example errors."""

import threading

import numpy as np
import pytest
from PIL import Image

from paligemma_jax import errors
from paligemma_jax.decoding import batching
from paligemma_jax.decoding import inference


def test_prefetch_prepares_the_next_batch_while_the_caller_works():
  """Images of batch k + 1 are decoded (in pool threads) before the caller is done with batch k."""
  seen, threads, cond = [], set(), threading.Condition()

  def prepare(x):
    with cond:
      seen.append(x)
      threads.add(threading.current_thread())
      cond.notify_all()
    return x * 10

  out = []
  for batch in batching.prefetch(prepare, iter([[0, 1], [2, 3], [4]]), num_threads=2):
    if not out:  # The model would run on batch 0 now; batch 1 is already on its way.
      with cond:
        assert cond.wait_for(lambda: {2, 3} <= set(seen), timeout=10)
    out.append(batch)
  assert out == [[0, 10], [20, 30], [40]]
  assert threading.current_thread() not in threads
  assert not any(t.is_alive() for t in threads)  # The threads end with the iteration.


def test_chunks_and_buckets():
  assert list(batching.chunks(range(5), 2)) == [[0, 1], [2, 3], [4]]
  assert [batching.bucketed(n, multiple=32) for n in (1, 32, 33)] == [32, 32, 64]
  assert [batching.bucketed(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
  # The server's prompt lengths: powers of two from 16, the last bucket its limit.
  assert [batching.bucketed(n, minimum=16, maximum=40) for n in (1, 16, 17, 33, 40)] == [16, 16, 32, 40, 40]
  assert batching.bucketed(1, multiple=16, minimum=2) == 16 and batching.bucketed(1, multiple=1, minimum=2) == 2


def test_length_error_counts_the_padded_prompt_and_the_new_tokens():
  assert batching.length_error(33, 100, bucket=32, new_tokens=36) is None  # 64 + 36.
  assert batching.length_error(33, 100, bucket=32, new_tokens=37) == (
      "prompt of 33 tokens (padded to 64) + max_new_tokens=37 exceeds the model's 100 positions")
  assert "prompt + suffix of 101 tokens" in batching.length_error(101, 100, bucket=1,
                                                                  what="prompt + suffix")


def test_collate_right_pads_and_repeats_the_first_row():
  pixels = np.zeros((2, 2, 3), np.float32)
  rows = [batching.Prepared(None, [(np.array([7, 8, 9]), np.array([1, 1, 0], bool))], [pixels]),
          batching.Prepared(None, [(np.array([5]), np.array([1], bool))], [pixels + 1])]
  tokens, images, input_mask, prefix_mask, image_index = batching.collate(rows, 3, bucket=4)
  assert image_index is None  # One image per row.
  np.testing.assert_array_equal(tokens, [[7, 8, 9, 0], [5, 0, 0, 0], [7, 8, 9, 0]])
  np.testing.assert_array_equal(input_mask.sum(1), [3, 1, 3])
  np.testing.assert_array_equal(prefix_mask.sum(1), [2, 1, 2])
  np.testing.assert_array_equal(images[:, 0, 0, 0], [0, 1, 0])


def test_prepare_turns_input_errors_into_the_example_error(tmp_path):
  Image.new("RGB", (6, 4)).save(tmp_path / "a.png")
  example = inference.Example(str(tmp_path / "a.png"), "p")
  ok = batching.prepare(example, lambda num_images: ["row"] * num_images, 8)
  assert ok.error is None and ok.rows == ["row"] and np.shape(ok.pixels) == (1, 8, 8, 3)
  assert ok.image_size == (6, 4)

  def untokenizable(num_images):  # As Tokenizer.encode on text SentencePiece cannot take.
    raise errors.InputError("text is not valid Unicode")

  def bug(num_images):
    raise RuntimeError("bug")

  missing = inference.Example(str(tmp_path / "missing.png"), "p")
  # The rows come first: a refused example is not decoded (here it would fail differently).
  assert batching.prepare(missing, untokenizable, 8).error == "text is not valid Unicode"
  assert "missing.png" in batching.prepare(missing, lambda num_images: ["row"], 8).error
  with pytest.raises(RuntimeError):  # Anything else is a bug, not the example's error.
    batching.prepare(example, bug, 8)
