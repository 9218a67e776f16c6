"""PaliGemma detection answers: `<locY1><locX1><locY2><locX2> label ; ...` <-> pixel boxes.

Coordinates follow big_vision: a normalised coordinate c in [0, 1] is written as
`<loc%04d>` % round(c * 1023) and read back as value / 1023. They are relative to the
image, so boxes map back to the original size whatever resolution the model saw. Boxes
in this package are (x1, y1, x2, y2) in pixels of the original image; only the token
text uses PaliGemma's y-first order.
"""

import re
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from paligemma_jax.preprocess.tokenizer import NUM_LOC, SEG_CODEBOOK_SIZE

_DIGITS = {"loc": 4, "seg": 3}
_TOKEN = re.compile(r"\s*<(loc|seg)([0-9]+)>")


class Detections(NamedTuple):
  """Objects read from one answer.

  boxes: float32 [N, 4], (x1, y1, x2, y2) in pixels of the original image.
  labels: N strings ("" when the answer names none, as RefCOCO-style answers do).
  skipped: malformed groups dropped while parsing; model output never raises.
  """
  boxes: np.ndarray
  labels: list
  skipped: int


def split_objects(text: str) -> list:
  """Per-object groups of an answer; PaliGemma separates objects with ` ; `."""
  return [g.strip() for g in text.split(";") if g.strip()]


def parse_object(group: str, seg_tokens: int = 0):
  """One group -> (4 loc values, `seg_tokens` seg values, label), or None if malformed.

  Malformed: another token count or order, a token with the wrong digit count or out of
  range, or stray loc/seg tokens inside the label (two objects missing their separator).
  """
  tokens, pos = [], 0
  while m := _TOKEN.match(group, pos):
    tokens.append((m[1], m[2]))
    pos = m.end()
  label = group[pos:].strip()
  if [k for k, _ in tokens] != ["loc"] * 4 + ["seg"] * seg_tokens or _TOKEN.search(label):
    return None
  if any(len(d) != _DIGITS[k] for k, d in tokens):
    return None
  values = [int(d) for _, d in tokens]
  locs, segs = values[:4], values[4:]
  if max(locs) >= NUM_LOC or any(s >= SEG_CODEBOOK_SIZE for s in segs):
    return None
  return locs, segs, label


def locs_to_box(locs, width: int, height: int) -> tuple:
  """(y1, x1, y2, x2) loc values -> (x1, y1, x2, y2) pixels, value / 1023 of the size."""
  y1, x1, y2, x2 = (v / (NUM_LOC - 1) for v in locs)
  return x1 * width, y1 * height, x2 * width, y2 * height


def parse_detections(text: str, width: int, height: int) -> Detections:
  """Reads every `<loc>`x4 + label group; boxes with y2 < y1 or x2 < x1 count as skipped."""
  boxes, labels, skipped = [], [], 0
  for group in split_objects(text):
    parsed = parse_object(group)
    if parsed is None or parsed[0][2] < parsed[0][0] or parsed[0][3] < parsed[0][1]:
      skipped += 1
      continue
    boxes.append(locs_to_box(parsed[0], width, height))
    labels.append(parsed[2])
  return Detections(np.asarray(boxes, np.float32).reshape(-1, 4), labels, skipped)


def box_to_locs(box, width: int, height: int) -> list:
  """(x1, y1, x2, y2) pixels -> [y1, x1, y2, x2] loc values: round(c * 1023), clipped."""
  x1, y1, x2, y2 = box
  coords = np.array([y1 / height, x1 / width, y2 / height, x2 / width], np.float64)
  return np.clip(np.round(coords * (NUM_LOC - 1)), 0, NUM_LOC - 1).astype(int).tolist()


def encode_boxes(boxes: Sequence, labels: Sequence[str], width: int, height: int) -> str:
  """Training target for `detect ...`: the inverse of `parse_detections`.

  np.round rounds half to even, like the tf.round big_vision uses.
  """
  if len(boxes) != len(labels):
    raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
  groups = []
  for box, label in zip(boxes, labels):
    locs = "".join(f"<loc{v:04d}>" for v in box_to_locs(box, width, height))
    groups.append(f"{locs} {label}".rstrip())
  return " ; ".join(groups)


PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))


def color_for(label: str) -> tuple:
  """A stable colour per label, so one class keeps one colour across images."""
  return PALETTE[sum(label.encode()) % len(PALETTE)]


def draw_boxes(image: Image.Image, detections) -> Image.Image:
  """A copy of `image` with each box outlined and its label written on a filled tab."""
  out = image.convert("RGB")
  draw = ImageDraw.Draw(out)
  font = ImageFont.load_default()
  line = max(1, round(min(out.size) / 200))
  for box, label in zip(np.asarray(detections.boxes).reshape(-1, 4), detections.labels):
    x1, y1, x2, y2 = (float(v) for v in box)
    color = color_for(label)
    draw.rectangle((x1, y1, x2, y2), outline=color, width=line)
    if label:
      l, t, r, b = draw.textbbox((x1, y1), label, font=font)
      top = y1 - (b - t) - 2 if y1 - (b - t) - 2 >= 0 else y1  # Above the box when it fits.
      l, t, r, b = draw.textbbox((x1 + 2, top), label, font=font)
      draw.rectangle((l - 2, t - 1, r + 2, b + 1), fill=color)
      draw.text((x1 + 2, top), label, fill=(255, 255, 255), font=font)
  return out
