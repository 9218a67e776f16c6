"""From examples to fixed-shape batches, shared by the predictor (inference.py) and the scorer
(scoring.py).

  chunks -> prefetch(prepare)  examples in groups of the batch size, each prepared in background
                               threads one batch ahead of the model: tokens, then the image;
  Prepared                     one example's token rows and pixels, or why it cannot run;
  bucketed, right_pad          lengths and counts rounded up to few shapes, so compiles repeat:
                               the one rule for prompts, batch rows and mask objects;
  length_error                 the one check that a request fits the model's positions.
"""

import concurrent.futures
import dataclasses
from typing import Any, Callable, Iterable, Iterator

import ml_collections
import numpy as np

from paligemma_jax import errors
from paligemma_jax.preprocess import processor

DEFAULT_BUCKET = 32  # Prompt lengths are rounded up to a multiple of this: one compile per bucket.


def bucketed(n: int, *, multiple: int | None = None, minimum: int = 1,
             maximum: int | None = None) -> int:
  """`n` (>= 1) rounded up to the size it runs at, so that few shapes (compiles) serve every n:
  a multiple of `multiple` (prompt lengths of generate and scoring), else a power of two (batch
  rows, mask objects, the server's prompt lengths); at least `minimum`, at most `maximum`."""
  size = -(-n // multiple) * multiple if multiple else 1 << (max(n, 1) - 1).bit_length()
  size = max(size, minimum)
  return size if maximum is None else min(size, maximum)


def max_positions(config: ml_collections.ConfigDict) -> int:
  """The model's RoPE positions: every prompt, suffix and generated token must fit in them."""
  return config.text.get("max_position_embeddings", 8192)


def length_error(length: int, limit: int, *, bucket: int = DEFAULT_BUCKET, new_tokens: int = 0,
                 what: str = "prompt") -> str | None:
  """Why `length` tokens, padded to the bucket, and `new_tokens` more cannot fit `limit`
  positions, if they cannot."""
  padded = bucketed(length, multiple=bucket)
  if padded + new_tokens <= limit:
    return None
  more = f" + max_new_tokens={new_tokens}" if new_tokens else ""
  return (f"{what} of {length} tokens (padded to {padded}){more} exceeds the model's {limit} "
          "positions")


@dataclasses.dataclass
class Prepared:
  """One example ready for the model, or the reason it is not."""
  example: Any  # inference.Example or scoring.Candidates: anything with an `image`.
  rows: list = dataclasses.field(default_factory=list)  # (tokens, prefix_mask, ...) per sequence.
  pixels: np.ndarray | None = None  # [S, S, 3] float32.
  image_size: tuple[int, int] | None = None  # Original (width, height), for task outputs.
  error: str | None = None


def prepare(example, make_rows: Callable[[], list], image_size: int) -> Prepared:
  """The example's token rows (`make_rows()`), then its pixels; runs in the background threads.

  An `errors.InputError` from `make_rows` (text the tokenizer cannot take, a request longer than
  the model) or from the image (`processor.ImageLoadError`: missing, unreadable) becomes the
  example's `error`, so one bad example never stops a run. Rows come first: a refused example
  costs no image loading. `processor.load_pixels` bounds the memory of images in flight.
  """
  try:
    rows = make_rows()
    pixels, size = processor.load_pixels(example.image, image_size)
  except errors.InputError as e:
    return Prepared(example, error=errors.message(e))
  return Prepared(example, rows, pixels, size)


def right_pad(sequences: list, length: int, dtype=np.int32):
  """1-D arrays -> ([len(sequences), length] zero-padded, [len(sequences), length] bool mask)."""
  padded = np.zeros((len(sequences), length), dtype)
  mask = np.zeros((len(sequences), length), bool)
  for i, x in enumerate(sequences):
    padded[i, :len(x)], mask[i, :len(x)] = x, True
  return padded, mask


def collate(prepared: list[Prepared], batch_size: int, bucket: int = DEFAULT_BUCKET):
  """One-row examples -> (tokens, pixels, input_mask, prefix_mask), right-padded to
  [batch_size, bucketed T]; dummy rows repeat the first, so they are valid inputs."""
  rows = prepared + prepared[:1] * (batch_size - len(prepared))
  length = bucketed(max(len(p.rows[0][0]) for p in rows), multiple=bucket)
  tokens, input_mask = right_pad([p.rows[0][0] for p in rows], length)
  prefix_mask, _ = right_pad([p.rows[0][1] for p in rows], length, bool)
  return tokens, np.stack([p.pixels for p in rows]), input_mask, prefix_mask


def chunks(items: Iterable, size: int) -> Iterator[list]:
  """Consecutive lists of `size` items; the last may be shorter."""
  chunk = []
  for item in items:
    chunk.append(item)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def prefetch(fn, batches: Iterable[list], num_threads: int) -> Iterator[list]:
  """Yields [fn(x) for x in batch] per batch, computed in `num_threads` threads that live as long
  as the iteration; batch k + 1 is submitted before batch k is handed over, so its images load
  while the caller runs the model on batch k. At most two batches are in flight."""
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    ahead = None
    for batch in batches:
      futures = [pool.submit(fn, x) for x in batch]
      if ahead is not None:
        yield [f.result() for f in ahead]
      ahead = futures
    if ahead is not None:
      yield [f.result() for f in ahead]
