"""From examples to fixed-shape batches, shared by the predictor (inference.py) and the scorer
(scoring.py).

  chunks -> prefetch(prepare)  examples in groups of the batch size, each prepared in background
                               threads one batch ahead of the model: tokens, then the image;
  Prepared                     one example's token rows and the pixels of its images (one or
                               several), or why it cannot run;
  image_batch                  every image of a batch once, and which are each row's;
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


def images_note(num_images: int, num_image_tokens: int) -> str:
  """What the images take of a prompt too long for the model, where there are several."""
  if num_images < 2:
    return ""
  return f" ({num_images} images of {num_image_tokens} tokens each)"


@dataclasses.dataclass
class Prepared:
  """One example ready for the model, or the reason it is not."""
  example: Any  # inference.Example or scoring.Candidates: anything with `sources()`.
  rows: list = dataclasses.field(default_factory=list)  # (tokens, prefix_mask, ...) per sequence.
  pixels: list = dataclasses.field(default_factory=list)  # [S, S, 3] float32 per image, in order.
  image_sizes: list = dataclasses.field(default_factory=list)  # Original (width, height) each.
  error: str | None = None

  @property
  def image_size(self) -> tuple[int, int] | None:
    """The first image's size: the one task outputs (boxes, masks) refer to."""
    return self.image_sizes[0] if self.image_sizes else None

  def size_fields(self) -> dict:
    """`image_size` for task outputs, and `image_sizes` too where there are several images."""
    sizes = [list(s) for s in self.image_sizes]
    return {"image_size": sizes[0], **({"image_sizes": sizes} if len(sizes) > 1 else {})}


def prepare(example, make_rows: Callable[[int], list], image_size: int) -> Prepared:
  """The example's token rows (`make_rows(number of images)`), then its pixels; runs in the
  background threads.

  An `errors.InputError` from `make_rows` (text the tokenizer cannot take, a request longer than
  the model) or from an image (`processor.ImageLoadError`: missing, unreadable) becomes the
  example's `error`, so one bad example never stops a run. Rows come first: a refused example
  costs no image loading. `processor.load_pixels` bounds the memory of images in flight.
  """
  try:
    sources = example.sources()
    rows = make_rows(len(sources))
    loaded = [processor.load_pixels(source, image_size) for source in sources]
  except errors.InputError as e:
    return Prepared(example, error=errors.message(e))
  return Prepared(example, rows, [p for p, _ in loaded], [s for _, s in loaded])


def image_batch(per_row: list[list]) -> tuple[np.ndarray, np.ndarray | None]:
  """Each row's pixels ([S, S, 3] arrays, in prompt order) -> (images [M, S, S, 3], image_index
  [B, K]), the model's inputs for several images per row (see `paligemma`): every distinct
  array once (dummy rows repeat a real one and add none), M rounded up to a multiple of B (the
  batch's split over a mesh holds) and K to a power of two, the padding repeating image 0.
  Where every row has one image: (images [B, S, S, 3], None), one per row."""
  if all(len(pixels) == 1 for pixels in per_row):
    return np.stack([pixels[0] for pixels in per_row]), None
  distinct = {}  # id(array) -> (position, array)
  for pixels in per_row:
    for x in pixels:
      distinct.setdefault(id(x), (len(distinct), x))
  rows = len(per_row)
  count = bucketed(bucketed(len(distinct)), multiple=rows)
  arrays = [x for _, x in distinct.values()]
  images = np.stack(arrays + arrays[:1] * (count - len(arrays)))
  image_index = np.zeros((rows, bucketed(max(len(p) for p in per_row))), np.int32)
  for b, pixels in enumerate(per_row):
    image_index[b, :len(pixels)] = [distinct[id(x)][0] for x in pixels]
  return images, image_index


def right_pad(sequences: list, length: int, dtype=np.int32):
  """1-D arrays -> ([len(sequences), length] zero-padded, [len(sequences), length] bool mask)."""
  padded = np.zeros((len(sequences), length), dtype)
  mask = np.zeros((len(sequences), length), bool)
  for i, x in enumerate(sequences):
    padded[i, :len(x)], mask[i, :len(x)] = x, True
  return padded, mask


def collate(prepared: list[Prepared], batch_size: int, bucket: int = DEFAULT_BUCKET):
  """One-row examples -> (tokens, images, input_mask, prefix_mask, image_index), right-padded
  to [batch_size, bucketed T], images as `image_batch` gives them; dummy rows repeat the first,
  so they are valid inputs."""
  rows = prepared + prepared[:1] * (batch_size - len(prepared))
  length = bucketed(max(len(p.rows[0][0]) for p in rows), multiple=bucket)
  tokens, input_mask = right_pad([p.rows[0][0] for p in rows], length)
  prefix_mask, _ = right_pad([p.rows[0][1] for p in rows], length, bool)
  images, image_index = image_batch([p.pixels for p in rows])
  return tokens, images, input_mask, prefix_mask, image_index


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
