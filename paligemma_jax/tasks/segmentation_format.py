"""PaliGemma segmentation answers: per object 4 loc + 16 seg tokens + label -> full-size masks.

The 16 `<segNNN>` codes index a 128-entry VQ-VAE codebook laid out as a row-major 4x4 grid.
The VAE's decoder (public weights `vae-oid.npz`, PyTorch layout) turns them into a 64x64 map
in about [-1, 1]; as in big_vision's RefCOCO evaluator
(big_vision/evaluators/proj/paligemma/transfers/segmentation.py) that map is resized
bilinearly (PIL, float) into the box truncated to whole pixels and thresholded at > 0.
"""

import functools
import zipfile
from typing import Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from paligemma_jax import errors
from paligemma_jax.decoding import batching
from paligemma_jax.tasks import detection_format

SEG_TOKENS_PER_OBJECT = 16  # A 4x4 grid of codebook entries.


class ResBlock(nn.Module):
  """conv3x3 -> relu -> conv3x3 -> relu -> conv1x1, plus the input; no activation after the sum."""
  features: int

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, self.features, precision="highest")
    y = nn.relu(conv((3, 3), padding=1)(x))
    y = nn.relu(conv((3, 3), padding=1)(y))
    return x + conv((1, 1), padding=0)(y)


class MaskDecoder(nn.Module):
  """VQ-VAE decoder: [..., 16] codebook indices -> [..., 64, 64] mask logits (about [-1, 1]).

  codebook lookup -> 1x1 conv (code_dim -> 128) + relu -> 2 ResBlocks (128) -> 4 x
  (4x4 transposed conv, stride 2, + relu) with 128, 64, 32, 16 channels (4 -> 64 px) ->
  1x1 conv to 1 channel. PyTorch's ConvTranspose2d(k=4, s=2, padding=1) is lax padding
  k - 1 - 1 = 2 with the kernel transposed. Parameter names match big_vision's tree. Convs run
  at "highest" precision so that GPUs (TF32 by default) threshold the same pixels as the CPU.
  """
  code_dim: int = 512
  num_embeddings: int = 128
  width: int = 128
  num_res_blocks: int = 2
  num_upsample: int = 4

  @nn.compact
  def __call__(self, codes):
    codebook = self.param("codebook", nn.initializers.normal(1.0), (self.num_embeddings, self.code_dim))
    side = int(round(codes.shape[-1] ** 0.5))
    x = jnp.take(codebook, codes, axis=0).reshape(*codes.shape[:-1], side, side, self.code_dim)
    x = nn.relu(nn.Conv(self.width, (1, 1), padding=0, precision="highest")(x))
    for _ in range(self.num_res_blocks):
      x = ResBlock(self.width)(x)
    for i in range(self.num_upsample):
      x = nn.ConvTranspose(self.width >> i, (4, 4), strides=(2, 2), padding=2, transpose_kernel=True,
                           precision="highest")(x)
      x = nn.relu(x)
    return nn.Conv(1, (1, 1), padding=0, precision="highest")(x)[..., 0]


def _expected_shapes(code_dim: int, num_embeddings: int = 128, width: int = 128) -> dict:
  """PyTorch-layout shapes of the decoder tensors in vae-oid.npz (the encoder is not needed)."""
  shapes = {"_vq_vae._embedding": (num_embeddings, code_dim),
            "decoder.0.weight": (width, code_dim, 1, 1), "decoder.0.bias": (width,)}
  for block in (2, 3):  # Sequential index of the two residual blocks.
    for layer, k in ((0, 3), (2, 3), (4, 1)):  # Index inside the block's `net` (ReLUs between).
      shapes[f"decoder.{block}.net.{layer}.weight"] = (width, width, k, k)
      shapes[f"decoder.{block}.net.{layer}.bias"] = (width,)
  for i in range(4):  # ConvTranspose2d weights are [in, out, kh, kw].
    c_in, c_out = width >> max(i - 1, 0), width >> i
    shapes[f"decoder.{4 + 2 * i}.weight"] = (c_in, c_out, 4, 4)
    shapes[f"decoder.{4 + 2 * i}.bias"] = (c_out,)
  shapes["decoder.12.weight"] = (1, width >> 3, 1, 1)
  shapes["decoder.12.bias"] = (1,)
  return shapes


def convert_vae(weights: Mapping) -> dict:
  """PyTorch-layout VAE arrays (names as in vae-oid.npz) -> MaskDecoder params.

  Raises InputError naming every missing or misshapen tensor. Conv weights [out, in, kh, kw]
  and ConvTranspose weights [in, out, kh, kw] both become [kh, kw, ., .] by the same
  transposition (2, 3, 1, 0): Flax's Conv wants [kh, kw, in, out] and its ConvTranspose
  with transpose_kernel=True wants [kh, kw, out, in].
  """
  emb = weights.get("_vq_vae._embedding")
  code_dim = emb.shape[1] if emb is not None and np.ndim(emb) == 2 else 512
  expected = _expected_shapes(code_dim)
  missing = [k for k in expected if k not in weights]
  wrong = [f"{k} {tuple(np.shape(weights[k]))} (expected {v})" for k, v in expected.items()
           if k in weights and tuple(np.shape(weights[k])) != v]
  if missing or wrong:
    raise errors.InputError("VAE decoder weights do not match vae-oid.npz:"
                     + (f" missing {', '.join(missing)}." if missing else "")
                     + (f" wrong shape: {'; '.join(wrong)}." if wrong else ""))

  def conv(name):
    return {"kernel": np.transpose(np.asarray(weights[f"{name}.weight"], np.float32), (2, 3, 1, 0)),
            "bias": np.asarray(weights[f"{name}.bias"], np.float32)}

  def block(i):
    return {f"Conv_{j}": conv(f"decoder.{i}.net.{2 * j}") for j in range(3)}

  return {"codebook": np.asarray(emb, np.float32), "Conv_0": conv("decoder.0"),
          "ResBlock_0": block(2), "ResBlock_1": block(3),
          **{f"ConvTranspose_{i}": conv(f"decoder.{4 + 2 * i}") for i in range(4)},
          "Conv_1": conv("decoder.12")}


def load_vae_npz(path) -> dict:
  """Reads vae-oid.npz (path or file object) into MaskDecoder params; see `convert_vae`."""
  try:
    with np.load(path) as f:
      return convert_vae({k: f[k] for k in f.files})
  except errors.InputError as e:
    raise errors.InputError(f"{path}: {e}") from None
  except (ValueError, EOFError, zipfile.BadZipFile) as e:  # Not an .npz, or a truncated one.
    raise errors.InputError(f"{path}: not a readable .npz file ({e}).") from None


@jax.jit
def reconstruct_masks(vae_params: dict, codes):
  """[B, 16] int codes -> [B, 64, 64] float32 decoder output; > 0 is inside the object."""
  return MaskDecoder(code_dim=vae_params["codebook"].shape[1]).apply({"params": vae_params}, codes)


def pixel_box(locs, width: int, height: int):
  """(y1, x1, y2, x2) loc values -> integer (x1, y1, x2, y2), or None if empty.

  Truncates (value / 1023) * size with int(), as big_vision does before pasting.
  """
  y1, x1, y2, x2 = (v / (detection_format.NUM_LOC - 1) for v in locs)
  x1, y1, x2, y2 = int(x1 * width), int(y1 * height), int(x2 * width), int(y2 * height)
  return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def paste_mask(logits, box, width: int, height: int) -> np.ndarray:
  """64x64 decoder map -> [height, width] bool, the map resized into integer `box` (x1, y1, x2, y2)."""
  x1, y1, x2, y2 = box
  resized = Image.fromarray(np.asarray(logits, np.float32)).resize((x2 - x1, y2 - y1), Image.BILINEAR)
  mask = np.zeros((height, width), bool)
  mask[y1:y2, x1:x2] = np.asarray(resized) > 0.0
  return mask


class Segmentations(NamedTuple):
  """Objects read from one answer.

  boxes: float32 [N, 4], (x1, y1, x2, y2) pixels, as detection_format.parse_detections gives; the
    mask sits in this box truncated to whole pixels (`pixel_box`).
  labels: N strings ("" when the answer names none, as RefCOCO answers do).
  masks: bool [N, height, width] in the original image's resolution.
  skipped: malformed groups dropped: bad tokens, or a box empty once truncated to whole pixels
    (big_vision rejects both as invalid).
  """
  boxes: np.ndarray
  labels: list
  masks: np.ndarray
  skipped: int


def decode_masks(text: str, width: int, height: int, vae_params: dict) -> Segmentations:
  """Parses a `segment ...` answer and decodes every object's mask at the image's full size."""
  boxes, labels, codes, pixel_boxes, skipped = [], [], [], [], 0
  for group in detection_format.split_objects(text):
    parsed = detection_format.parse_object(group, seg_tokens=SEG_TOKENS_PER_OBJECT)
    if parsed is None:
      skipped += 1
      continue
    locs, segs, label = parsed
    box = pixel_box(locs, width, height)  # None also when y2 <= y1 or x2 <= x1.
    if box is None:
      skipped += 1
      continue
    boxes.append(detection_format.locs_to_box(locs, width, height))
    labels.append(label)
    codes.append(segs)
    pixel_boxes.append(box)
  masks = np.zeros((len(codes), height, width), bool)
  if codes:
    # Padded to a power of two objects: one compile per size class, not per object count.
    padded = np.zeros((batching.bucketed(len(codes)), SEG_TOKENS_PER_OBJECT), np.int32)
    padded[:len(codes)] = codes
    logits = np.asarray(reconstruct_masks(vae_params, jnp.asarray(padded)))
    for i, (m, box) in enumerate(zip(logits, pixel_boxes)):
      masks[i] = paste_mask(m, box, width, height)
  return Segmentations(np.asarray(boxes, np.float32).reshape(-1, 4), labels, masks, skipped)


def draw_masks(image: Image.Image, segmentations, alpha: float = 0.5) -> Image.Image:
  """A copy of `image` with each mask tinted in its label's colour, and the boxes drawn."""
  out = np.asarray(image.convert("RGB"), np.float32)
  for mask, label in zip(segmentations.masks, segmentations.labels):
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(detection_format.color_for(label), np.float32)
  return detection_format.draw_boxes(Image.fromarray(out.round().astype(np.uint8)), segmentations)


def rle_encode(mask) -> dict:
  """COCO's uncompressed RLE of a bool [h, w] mask: {"size": [h, w], "counts": run lengths},
  runs taken down the columns (Fortran order), alternately 0s and 1s, starting with 0s."""
  mask = np.asarray(mask, bool)
  flat = mask.ravel(order="F")
  edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
  return {"size": list(mask.shape), "counts": ([0] if flat.size and flat[0] else []) + counts}


def rle_decode(rle: dict) -> np.ndarray:
  """The bool [h, w] mask of `rle_encode`'s output (pycocotools reads it too)."""
  height, width = rle["size"]
  flat = np.repeat(np.arange(len(rle["counts"])) % 2 == 1, rle["counts"])
  return flat.reshape(width, height).T
