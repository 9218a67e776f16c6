"""Training data: JSONL lines {"image", "prefix", "suffix"} -> fixed-shape batches. A line may
name several images instead, in prompt order: {"images": [path, ...], "prefix", "suffix"}.

  read_jsonl   parses and tokenises every line up front (image tokens, <bos>, prefix, "\\n",
               suffix, <eos>, see `processor.build_prompt`); a bad line (invalid UTF-8 or JSON,
               text that is not valid Unicode, a missing or mistyped field, a missing image
               file, a prompt longer than max_text_len) is reported with its line number,
               counted and left out.
  TrainLoader  an endless, seeded stream over the examples, epoch after epoch, each epoch in its
               own permutation. Images are loaded in background threads; one that cannot be
               read is reported with its line number and skipped.
  eval_batches one pass in file order, the last batch padded with zero-weight rows.

Every batch has the same shapes: tokens, input_mask, prefix_mask, loss_mask [B, K * N +
max_text_len] and images [B, S, S, 3], or [B, K, S, S, 3] where some line has several images (K:
the most any line has; a row with fewer has zero images after its own, which no token reads).
The stream is a pure function of (seed, position), where position counts the stream slots
consumed (skipped ones included), so a run restored at a saved position sees exactly the batches
an uninterrupted run would have seen.
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import os

from absl import logging
import numpy as np

from paligemma_jax import errors
from paligemma_jax import files
from paligemma_jax.preprocess import image_fields
from paligemma_jax.preprocess import processor


@dataclasses.dataclass
class Record:
  """One usable line, tokenised; the images are loaded later."""
  where: str  # "file:line", for messages.
  images: list[str]  # Resolved paths, in prompt order.
  prefix: str
  suffix: str
  tokens: np.ndarray  # int32 [T], T <= N + max_text_len.
  prefix_mask: np.ndarray  # bool [T]
  loss_mask: np.ndarray  # bool [T]


@dataclasses.dataclass(frozen=True)
class Layout:
  """What the model expects: image tokens per image, image size, the fixed text length, and the
  most images a line has (`for_records` sets it from the data)."""
  num_image_tokens: int
  image_token_id: int
  image_size: int
  max_text_len: int
  max_images: int = 1

  @property
  def length(self) -> int:
    return self.max_images * self.num_image_tokens + self.max_text_len

  def for_records(self, *record_lists) -> "Layout":
    """This layout with room for the most images any of the records has."""
    most = max((len(r.images) for records in record_lists for r in records), default=1)
    return dataclasses.replace(self, max_images=most)


def _fields(value) -> tuple[list[str], str, str]:
  if not isinstance(value, dict):
    raise errors.InputError("expected a JSON object")
  images = image_fields.paths(value)
  for key in ("prefix", "suffix"):
    if key not in value:
      raise errors.InputError(f"missing field {key!r}")
  if not all(isinstance(value[k], str) for k in ("prefix", "suffix")):
    raise errors.InputError("'prefix' and 'suffix' must be strings")
  return images, value["prefix"], value["suffix"]


def _record(where: str, value, root: str, tokenizer, layout: Layout) -> Record:
  """The record of one parsed line; InputError says why the line is unusable."""
  images, prefix, suffix = _fields(value)
  images = [os.path.join(root, image) for image in images]  # Absolute paths stay as they are.
  for image in images:
    if not os.path.isfile(image):
      raise errors.InputError(f"image not found: {image}")
  # The tokenizer raises InputError for text it cannot take.
  image_tokens = len(images) * layout.num_image_tokens
  tokens, prefix_mask, loss_mask = processor.build_prompt(
      tokenizer, prefix, image_tokens, layout.image_token_id, suffix)
  length = image_tokens + layout.max_text_len
  if prefix_mask.sum() >= length:
    raise errors.InputError(f"the prompt alone has {prefix_mask.sum() - image_tokens} "
                            f"text tokens, max_text_len is {layout.max_text_len}")
  if len(tokens) > length:
    logging.warning("%s: %d text tokens cut to max_text_len=%d (the suffix loses its end)",
                    where, len(tokens) - image_tokens, layout.max_text_len)
    tokens, prefix_mask, loss_mask = (x[:length] for x in (tokens, prefix_mask, loss_mask))
  return Record(where, images, prefix, suffix, tokens, prefix_mask, loss_mask)


def read_jsonl(path: str, tokenizer, layout: Layout, image_root: str = "") -> list[Record]:
  """The usable lines of `path`, in file order; the others are logged as warnings and left out."""
  root = image_root or os.path.dirname(os.path.abspath(path))
  records, bad = [], 0
  for line in files.read_jsonl(path):
    where = f"{path}:{line.number}"
    try:
      if line.error:
        raise errors.InputError(line.error)
      records.append(_record(where, line.value, root, tokenizer, layout))
    except errors.InputError as e:
      bad += 1
      logging.warning("%s: bad line, skipped: %s", where, e)
  if bad:
    logging.warning("%s: %d bad line(s) skipped, %d usable.", path, bad, len(records))
  return records


def fingerprint(records: list[Record]) -> str:
  """A digest of the examples (image paths and tokens): a resumed run checks it is on the same data."""
  digest = hashlib.sha256()
  for r in records:
    digest.update("\0".join(r.images).encode() + b"\0" + r.tokens.tobytes())
  return digest.hexdigest()[:16]


def load_example(record: Record, layout: Layout) -> dict:
  """Padded arrays for one record; raises processor.ImageLoadError for an unreadable image."""
  # Bounded decode memory (processor.decode_budget), one image at a time.
  pixels = [processor.load_pixels(image, layout.image_size)[0] for image in record.images]
  if layout.max_images == 1:
    pixels = pixels[0]
  else:
    pixels = np.stack(pixels + [np.zeros_like(pixels[0])] * (layout.max_images - len(pixels)))
  n, pad = len(record.tokens), layout.length - len(record.tokens)
  return dict(tokens=np.pad(record.tokens, (0, pad)),  # Pad id 0.
              input_mask=np.arange(layout.length) < n,
              prefix_mask=np.pad(record.prefix_mask, (0, pad)),
              loss_mask=np.pad(record.loss_mask, (0, pad)),
              images=pixels)


def _try_load(record: Record, layout: Layout):
  try:
    return load_example(record, layout), None
  except processor.ImageLoadError as e:
    return None, f"{record.where}: image skipped: {e}"


def stack(examples: list[dict]) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
  """The permutation of one epoch: a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(size)


class TrainLoader:
  """Endless shuffled batches; `next()` returns (batch, position after it).

  Decoding runs ahead in a thread pool, `prefetch` examples beyond the current one.
  """

  def __init__(self, records: list[Record], layout: Layout, *, batch_size: int, seed: int,
               position: int = 0, num_threads: int = 8, prefetch: int | None = None):
    if not records:
      raise errors.InputError("No usable training examples.")
    self.records, self.layout = records, layout
    self.batch_size, self.seed = batch_size, seed
    self.position = position  # Next stream slot to hand out.
    self._pool = concurrent.futures.ThreadPoolExecutor(num_threads)
    self._prefetch = prefetch or 2 * batch_size
    self._pending = collections.deque()  # (slot, record, future) for slots position, position + 1, ...
    self._orders = {}
    self._bad = set()  # Lines whose image failed: reported once, then skipped.

  def record_at(self, slot: int) -> Record:
    epoch, i = divmod(slot, len(self.records))
    if epoch not in self._orders:
      self._orders = {epoch: epoch_order(self.seed, epoch, len(self.records))}
    return self.records[self._orders[epoch][i]]

  def _fill(self):
    next_slot = self._pending[-1][0] + 1 if self._pending else self.position
    while len(self._pending) < self._prefetch:
      record = self.record_at(next_slot)
      future = None if record.where in self._bad else self._pool.submit(_try_load, record, self.layout)
      self._pending.append((next_slot, record, future))
      next_slot += 1

  def __iter__(self):
    return self

  def __next__(self):
    examples = []
    while len(examples) < self.batch_size:
      self._fill()
      slot, record, future = self._pending.popleft()
      example, error = (None, None) if future is None else future.result()
      self.position = slot + 1
      if example is None:
        if record.where not in self._bad:
          logging.warning("%s", error)
          self._bad.add(record.where)
        if len(self._bad) == len(self.records):
          raise errors.InputError(f"None of the {len(self.records)} training examples has a "
                                  "readable image (each is reported above).")
        continue
      examples.append(example)
    return stack(examples), self.position

  def close(self):
    self._pool.shutdown(wait=True, cancel_futures=True)


def eval_batches(records: list[Record], layout: Layout, batch_size: int, num_threads: int = 8):
  """One pass in file order: batches with a per-row `weight` (0 for padding rows)."""
  buffer = []
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    for start in range(0, len(records), batch_size):
      for example, error in pool.map(lambda r: _try_load(r, layout), records[start:start + batch_size]):
        if error:
          logging.warning("%s", error)
        else:
          buffer.append(example)
      while len(buffer) >= batch_size or buffer and start + batch_size >= len(records):
        chunk, buffer = buffer[:batch_size], buffer[batch_size:]
        weight = np.arange(batch_size) < len(chunk)
        yield {**stack(chunk + [chunk[0]] * (batch_size - len(chunk))), "weight": weight}
