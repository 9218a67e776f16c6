"""Referring segmentation: answers of loc + seg tokens become full-size masks; IoU with a mask.

Dataset lines: {"image", "prompt": "segment cat", "mask": "path/to/mask.png"} (a binary PNG of the
image's size, non-zero = the object). Outputs: boxes, labels, skipped and masks (COCO uncompressed
RLE, `segmentation_format.rle_encode`); evaluate adds the first object's IoU. As big_vision's RefCOCO
evaluator: only the first object counts, and a first object that does not parse (or whose box is
empty in whole pixels) scores IoU 0 and is counted as invalid. Metrics: mIoU, cIoU.
"""

import os

import numpy as np
from PIL import Image

from paligemma_jax.tasks import base
from paligemma_jax.tasks import detection_format
from paligemma_jax.tasks import metrics
from paligemma_jax.tasks import segmentation_format


def load_mask(path: str) -> np.ndarray:
  """A binary PNG (or any image Pillow reads) -> bool [h, w]; non-zero pixels are the object."""
  try:
    with Image.open(path) as image:
      if image.mode not in ("1", "L", "P", "I", "I;16", "F"):
        image = image.convert("L")
      return np.asarray(image) > 0
  except (OSError, ValueError) as e:
    raise base.Invalid("unreadable mask", f"cannot read mask {path}: {e}") from None


class Segment(base.Task):
  name = "segment"
  max_new_tokens = 64
  needs_vae = True

  def check(self, record, resolve):
    base.require(record, "mask")
    if not isinstance(record["mask"], str):
      raise base.Invalid("invalid 'mask'", "'mask' must be a path to a PNG")
    if not os.path.isfile(resolve(record["mask"])):
      raise base.Invalid("mask not found", f"mask not found: {resolve(record['mask'])}")

  def parse(self, text, width, height):
    self.check_resources()
    return segmentation_format.decode_masks(text, width, height, self.vae_params)

  def fields(self, objects):
    return {"boxes": base.rounded_boxes(objects.boxes), "labels": objects.labels,
            "skipped": objects.skipped, "masks": [segmentation_format.rle_encode(m) for m in objects.masks]}

  def draw(self, image, objects):
    return segmentation_format.draw_masks(image, objects)

  def example_fields(self, row, result):
    text, (width, height) = result["text"], result["image_size"]
    target = load_mask(row.path("mask"))
    if target.shape != (height, width):
      raise base.Invalid("mask size differs", f"mask {row.record['mask']} is {target.shape[1]}x"
                                              f"{target.shape[0]} but the image is {width}x{height}")
    objects = self.parse(text, width, height)
    groups = detection_format.split_objects(text)
    first = (detection_format.parse_object(groups[0], seg_tokens=segmentation_format.SEG_TOKENS_PER_OBJECT)
             if groups else None)
    valid = first is not None and segmentation_format.pixel_box(first[0], width, height) is not None
    predicted = objects.masks[0] if valid else np.zeros_like(target)
    return {"text": text, "stop_reason": result["stop_reason"], **self.fields(objects),
            "valid": valid, "iou": metrics.mask_iou(predicted, target) if valid else 0.0,
            "intersection": int(np.logical_and(predicted, target).sum()),
            "union": int(np.logical_or(predicted, target).sum())}

  def metrics(self, lines):
    union = sum(p["union"] for p in lines)
    return {"miou": base.mean(p["iou"] for p in lines),
            "ciou": sum(p["intersection"] for p in lines) / union if union else float("nan"),
            "invalid": sum(not p["valid"] for p in lines)}


TASKS = (Segment,)
