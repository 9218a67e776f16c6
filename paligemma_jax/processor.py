"""Turns an image file and a prompt into model inputs, as transformers' PaliGemmaProcessor does.

Image: decoded with Pillow, EXIF orientation applied, converted to RGB, squashed to S x S with
PIL bicubic on uint8, then scaled to [-1, 1]. Text: `<image>` * N, `<bos>`, prompt + "\\n"
(always appended, even when the prompt already ends in a newline); for training, the suffix
tokenised on its own, then `<eos>`. Token ids and pixels equal transformers' (16-bit images
aside, see `to_rgb`). Only numpy and Pillow are needed here.
"""

import io
import os

import numpy as np
from PIL import Image, ImageOps


class ImageLoadError(ValueError):
  """An image file that is missing or cannot be decoded; the message names the file."""


def to_rgb(image: Image.Image) -> Image.Image:
  """RGB view of any Pillow image.

  Transparency (RGBA, LA, PA, palette with a transparent colour) is composited onto white, as
  transformers' `convert_to_rgb` does. 16-bit greyscale is scaled to 8 bits (v / 257); Pillow's
  plain conversion, which transformers uses, clips it to 255 and returns an almost white image.
  """
  if image.mode == "RGB":
    return image
  if image.mode.startswith("I;16"):
    grey = (np.asarray(image, np.float64) / 257.0).round().astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")
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


def load_image(source) -> Image.Image:
  """Decodes a file path, bytes or binary file object into an upright RGB image.

  Raises ImageLoadError (a ValueError) with a one-line message naming the file, so callers can
  skip a bad example and go on.
  """
  try:
    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as f:
      image = ImageOps.exif_transpose(f)  # Decodes fully; returns a new image.
    return to_rgb(image)
  except FileNotFoundError:
    raise ImageLoadError(f"Image not found: {_name(source)}") from None
  except Image.UnidentifiedImageError:
    raise ImageLoadError(f"Not an image format Pillow can read: {_name(source)}") from None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ImageLoadError(f"Cannot decode image {_name(source)}: {e}") from None


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
  prefix = [image_token_id] * num_image_tokens + [tokenizer.bos_id] + tokenizer.encode(prompt + "\n")
  target = [] if suffix is None else tokenizer.encode(suffix) + [tokenizer.eos_id]
  tokens = np.asarray(prefix + target, np.int32)
  loss_mask = np.arange(len(tokens)) >= len(prefix)
  return tokens, ~loss_mask, loss_mask
