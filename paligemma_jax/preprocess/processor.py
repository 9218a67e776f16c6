"""Turns an image file and a prompt into model inputs, as transformers' PaliGemmaProcessor does.

Image: decoded with Pillow, EXIF orientation applied, converted to RGB, squashed to S x S with
PIL bicubic on uint8, then scaled to [-1, 1]. Text: `<image>` * N, `<bos>`, prompt + "\\n"
(always appended, even when the prompt already ends in a newline); for training, the suffix
tokenised on its own, then `<eos>`. Token ids and pixels equal transformers' (16-bit images
aside, see `to_rgb`). Only numpy and Pillow are needed here.

Memory: `load_pixels` decodes under a process-wide budget of decoded bytes (`decode_budget`), so
threads preparing a batch of huge images never hold more than about that much pixel memory.
"""

import collections
import contextlib
import io
import os
import threading

import numpy as np
from PIL import ExifTags, Image, ImageOps, PngImagePlugin

from paligemma_jax.errors import InputError

DEFAULT_DECODE_BUDGET_BYTES = 1 << 30
DECODE_BUDGET_ENV = "PALIGEMMA_JAX_DECODE_BUDGET_MIB"  # Overrides the default, in MiB.
# A JPEG is decoded at 1/2, 1/4 or 1/8 scale only where at least DRAFT_MARGIN times the target
# size remains. Measured against the full decode (8192 and 4096 px photo-like, sharp-edged and
# noise images, quality 75-95, 4:4:4 and 4:2:0, S = 224 and 448): mean |difference| <= 0.41 of
# a uint8 level, 99% of values within 2 levels, every value within 7 (4:2:0 colour edges).
DRAFT_MARGIN = 4
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that transpose the image.
_PILLOW_BLOCK_BYTES = 64 << 20  # Over glibc's 32 MiB ceiling for heap (not mmap) allocations.
# Pillow's bicubic resize keeps about 32 bytes of filter coefficients per source pixel of each
# resized axis (measured: a 5,000,000 x 1 image to 224 x 224 took 153 MB).
_RESIZE_BYTES_PER_PIXEL = 32


class ImageLoadError(InputError):
  """An image file that is missing or cannot be decoded; the message names the file."""


class ByteBudget:
  """A semaphore counted in bytes: `with budget.hold(n):` waits until n more bytes fit.

  Requests are admitted in arrival order, so a large image is not starved by a stream of small
  ones; one larger than the whole limit waits until nothing else is held, then runs alone.
  `in_use`, `high_water` (the most ever held at once) and `waiting` show how it is used.
  """

  def __init__(self, limit: int):
    if limit <= 0:
      raise InputError(f"decode budget must be a positive number of bytes, got {limit}")
    self.limit = limit
    self.in_use = 0
    self.high_water = 0
    self._changed = threading.Condition()
    self._queue = collections.deque()

  @property
  def waiting(self) -> int:
    """Number of requests not yet admitted."""
    with self._changed:
      return len(self._queue)

  @contextlib.contextmanager
  def hold(self, nbytes: int):
    with self._changed:
      turn = object()
      self._queue.append(turn)
      try:
        self._changed.wait_for(lambda: self._queue[0] is turn and (
            self.in_use == 0 or self.in_use + nbytes <= self.limit))
      finally:  # Also when interrupted while waiting: the next in line may go.
        self._queue.remove(turn)
        self._changed.notify_all()
      self.in_use += nbytes
      self.high_water = max(self.high_water, self.in_use)
    try:
      yield
    finally:
      with self._changed:
        self.in_use -= nbytes
        self._changed.notify_all()


_budget = None
_budget_lock = threading.Lock()


def _return_freed_pixels_to_the_system():
  """Has Pillow allocate large images in blocks that are unmapped when freed.

  glibc keeps freed chunks under 32 MiB in the arena of the thread that freed them, so with
  Pillow's default 16 MiB blocks every decoding thread kept its largest image resident (8
  threads on 12000 px PNGs: 3.9 GB resident with one image decoded at a time). Larger blocks are
  mmapped. A PILLOW_BLOCK_SIZE the user set is kept.
  """
  if "PILLOW_BLOCK_SIZE" not in os.environ:
    Image.core.set_block_size(max(Image.core.get_block_size(), _PILLOW_BLOCK_BYTES))


def decode_budget() -> ByteBudget:
  """The process-wide budget: $PALIGEMMA_JAX_DECODE_BUDGET_MIB MiB, else 1 GiB."""
  global _budget
  with _budget_lock:
    if _budget is None:
      value = os.environ.get(DECODE_BUDGET_ENV, "")
      if value and not (value.isdigit() and int(value) > 0):
        raise InputError(f"${DECODE_BUDGET_ENV} must be a positive number of MiB, got {value!r}")
      _return_freed_pixels_to_the_system()
      _budget = ByteBudget(int(value) << 20 if value else DEFAULT_DECODE_BUDGET_BYTES)
    return _budget


def set_decode_budget(limit_bytes: int) -> ByteBudget:
  """Replaces the process-wide budget (decodes already admitted finish under the old one)."""
  global _budget
  with _budget_lock:
    _return_freed_pixels_to_the_system()
    _budget = ByteBudget(limit_bytes)
    return _budget


def to_rgb(image: Image.Image) -> Image.Image:
  """RGB view of any Pillow image.

  Transparency (RGBA, LA, PA, palette with a transparent colour) is composited onto white, as
  transformers' `convert_to_rgb` does. 16-bit greyscale is scaled to 8 bits (v / 257); Pillow's
  plain conversion, which transformers uses, clips it to 255 and returns an almost white image.
  """
  if image.mode == "RGB":
    return image
  if image.mode.startswith("I;16"):
    grey = np.asarray(image).astype(np.uint32)
    grey += 128
    grey //= 257  # round(v / 257) without float64 copies: v / 257 is never a tie.
    return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
  if image.has_transparency_data:
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
  return image.convert("RGB")


def _name(source) -> str:
  if isinstance(source, (bytes, bytearray)):
    return f"<{len(source)}-byte buffer>"
  if isinstance(source, (str, os.PathLike)):
    return os.fspath(source)
  return getattr(source, "name", repr(source))


@contextlib.contextmanager
def _decoding(source):
  """Opens `source` (reading only its header) and turns decoding failures into ImageLoadError."""
  try:
    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as f:
      yield f
  except FileNotFoundError:
    raise ImageLoadError(f"Image not found: {_name(source)}", reason="image not found") from None
  except Image.UnidentifiedImageError:
    raise ImageLoadError(f"Not an image format Pillow can read: {_name(source)}",
                         reason="unreadable image") from None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ImageLoadError(f"Cannot decode image {_name(source)}: {e}",
                         reason="unreadable image") from None


def load_image(source) -> Image.Image:
  """Decodes a file path, bytes or binary file object into an upright RGB image.

  Raises ImageLoadError (a ValueError) with a one-line message naming the file, so callers can
  skip a bad example and go on. For model inputs use `load_pixels`, which bounds memory.
  """
  with _decoding(source) as f:
    return to_rgb(ImageOps.exif_transpose(f))  # Decodes fully; returns a new image.


def _orientation(image: Image.Image) -> int:
  """EXIF orientation read from the header, without decoding the pixels.

  Pillow decodes a PNG to look for EXIF after its pixels; such rare files count as upright here
  (load_pixels still turns them, with one uncounted copy).
  """
  if isinstance(image, PngImagePlugin.PngImageFile) and "exif" not in image.info:
    return 1
  return image.getexif().get(ExifTags.Base.Orientation, 1)


def _decode_bytes(image: Image.Image, coded_size, turned: bool) -> int:
  """Most bytes alive at once while load_pixels decodes `image` (header read, draft chosen).

  Pillow keeps 1 byte a pixel for modes 1, L and P, 2 for I;16 and 4 for every other mode (RGB
  too). Turning upright (`turned`) copies the image once; making it RGB adds at most the RGB copy
  (4 bytes a pixel), to_rgb's 16-to-8-bit arrays (8) or its three RGBA images for transparency
  (12). A progressive JPEG's decoder also keeps every DCT coefficient: 2 bytes per component per
  pixel of the coded (not drafted) size. The resize adds `_resize_bytes`.
  """
  mode = image.mode
  stored = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
  if mode == "RGB":
    conversion = 0
  elif image.has_transparency_data:
    conversion = 12
  else:
    conversion = 8 if mode.startswith("I;16") else 4
  per_pixel = stored + max(stored if turned else 0, conversion)
  coefficients = 2 * len(image.getbands()) * coded_size[0] * coded_size[1]
  progressive = image.info.get("progressive")
  # Pillow also keeps a pointer per line, and a decoder the previous and current line: what a
  # 1 x 20,000,000 (or 20,000,000 x 1) PNG costs beyond its pixels (measured: 230 and 190 MB).
  lines = 8 * image.height + 2 * stored * image.width
  return per_pixel * image.width * image.height + lines + (coefficients if progressive else 0)


def load_pixels(source, size) -> tuple[np.ndarray, tuple[int, int]]:
  """Model input for one image file, in bounded memory: (pixels, upright (width, height)).

  Pixels are preprocess_image(load_image(source), size): float32 [H, W, 3]; `size` is S or
  (H, W). Decoding waits for its bytes in `decode_budget()` and frees the full image before
  giving them back, so many threads decoding huge images hold about the budget at most. A JPEG
  at least 2 * DRAFT_MARGIN times larger than the target is decoded at 1/2, 1/4 or 1/8 scale,
  within the tolerance stated at DRAFT_MARGIN; other images give exactly today's pixels.
  Raises ImageLoadError as load_image does.
  """
  height, width = (size, size) if isinstance(size, int) else size
  budget = decode_budget()
  with _decoding(source) as image:
    coded_size = image.size
    orientation = _orientation(image)
    target = (height, width) if orientation in _SWAPS_AXES else (width, height)  # As stored.
    want = DRAFT_MARGIN * target[0], DRAFT_MARGIN * target[1]
    if image.width >= 2 * want[0] and image.height >= 2 * want[1]:
      image.draft(image.mode, want)  # Only JPEG (and PhotoCD) decoders act on it.
    held = _decode_bytes(image, coded_size, turned=orientation != 1) + _resize_bytes(
        image.size, target)
    with budget.hold(held):
      try:
        image.load()
        swaps = image.getexif().get(ExifTags.Base.Orientation, 1) in _SWAPS_AXES  # PNGs' too.
        ImageOps.exif_transpose(image, in_place=True)
        upright_size = coded_size[::-1] if swaps else coded_size
        pixels = preprocess_image(_thinned(image, (width, height)), size)
      finally:
        image.close()  # Frees the decoded pixels while their bytes are still held.
  return pixels, upright_size


def _thinned(image: Image.Image, target) -> Image.Image:
  """A strip (1 x 50,000,000 pixels) box-averaged along its long axis to DRAFT_MARGIN times
  the target first: resizing it directly would take _RESIZE_BYTES_PER_PIXEL bytes per source
  pixel (1.6 GB), more than the image itself. Other images are returned as they are, so their
  pixels stay exactly transformers'."""
  if not _is_strip(image.size, target):
    return image
  factors = tuple(max(1, have // (DRAFT_MARGIN * want)) for have, want in zip(image.size, target))
  return image.reduce(factors)


def _is_strip(size, target) -> bool:
  return _coefficient_bytes(size, target) > 4 * size[0] * size[1]


def _coefficient_bytes(size, target) -> int:
  return _RESIZE_BYTES_PER_PIXEL * sum(have for have, want in zip(size, target) if have != want)


def _resize_bytes(size, target) -> int:
  """Most bytes the resize to `target` adds, after `_thinned`: its filter coefficients."""
  if _is_strip(size, target):
    size = [min(have, 2 * DRAFT_MARGIN * want) for have, want in zip(size, target)]
  return _coefficient_bytes(size, target)


def preprocess_image(image, size) -> np.ndarray:
  """Float32 [H, W, 3] in [-1, 1]; `size` is S or (H, W). Takes a Pillow image or uint8 [h, w, 3].

  Same arithmetic as transformers' image processor: uint8 bicubic resize, x * (1/255) in float64
  rounded to float32, then (x - 0.5) / 0.5 in float32.
  """
  height, width = (size, size) if isinstance(size, int) else size
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise TypeError(f"expected a uint8 image array, got {image.dtype}")
    image = Image.fromarray(image)
  image = to_rgb(image).resize((width, height), resample=Image.Resampling.BICUBIC)
  x = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)
  return (x - np.float32(0.5)) / np.float32(0.5)


def num_image_tokens(image_size: int, patch_size: int) -> int:
  """Number of SigLIP patches, one `<image>` token each: (S / P)^2."""
  if image_size % patch_size:
    raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
  return (image_size // patch_size) ** 2


def build_prompt(tokenizer, prompt: str, num_image_tokens: int, image_token_id: int, suffix=None):
  """Token ids and masks for one example.

  Layout: `<image>` * N, `<bos>`, encode(prompt + "\\n"), and when `suffix` is given (training)
  encode(suffix), `<eos>`. The prefix (image + prompt) attends bidirectionally; the loss is on
  the suffix and its `<eos>`.

  Returns:
    tokens int32 [T], prefix_mask bool [T] (transformers' token_type_ids == 0),
    loss_mask bool [T] (positions whose token is a target).
  """
  prefix = [image_token_id] * num_image_tokens + [tokenizer.bos_id]
  prefix += tokenizer.encode(prompt + "\n")
  target = [] if suffix is None else tokenizer.encode(suffix) + [tokenizer.eos_id]
  tokens = np.asarray(prefix + target, np.int32)
  loss_mask = np.arange(len(tokens)) >= len(prefix)
  return tokens, ~loss_mask, loss_mask
