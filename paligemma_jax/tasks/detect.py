"""Detection: answers `<loc>`x4 label ; ... become pixel boxes; mAP against reference boxes.

Dataset lines: {"image", "prompt": "detect cat ; dog", "boxes": [[x1, y1, x2, y2], ...] (pixels
of the original image), "labels": [str, ...]}. Outputs: boxes, labels, skipped (malformed objects).
"""

import numpy as np

from paligemma_jax.tasks import base
from paligemma_jax.tasks import detection_format
from paligemma_jax.tasks import metrics


class Detect(base.Task):
  name = "detect"
  max_new_tokens = 256

  def check(self, record, resolve):
    base.require(record, "boxes", "labels")
    boxes, labels = record["boxes"], record["labels"]
    if not isinstance(boxes, list) or not all(
        isinstance(b, list) and len(b) == 4 and all(map(base.is_number, b)) for b in boxes):
      raise base.Invalid("invalid 'boxes'", "'boxes' must be a list of [x1, y1, x2, y2] pixel boxes")
    if not isinstance(labels, list) or not all(isinstance(s, str) for s in labels):
      raise base.Invalid("invalid 'labels'", "'labels' must be a list of strings")
    if len(boxes) != len(labels):
      raise base.Invalid("invalid 'labels'", f"{len(boxes)} boxes but {len(labels)} labels")

  def parse(self, text, width, height):
    return detection_format.parse_detections(text, width, height)

  def fields(self, objects):
    return {"boxes": base.rounded_boxes(objects.boxes), "labels": objects.labels,
            "skipped": objects.skipped}

  def draw(self, image, objects):
    return detection_format.draw_boxes(image, objects)

  def metrics(self, lines):
    predicted = [list(zip(p["labels"], p["boxes"])) for p in lines]
    truth = [list(zip(p["reference"]["labels"], p["reference"]["boxes"])) for p in lines]
    map50, per_label = metrics.mean_average_precision(predicted, truth, 0.5)
    coco = [metrics.mean_average_precision(predicted, truth, t)[0]
            for t in np.arange(0.5, 0.951, 0.05)]
    return {"map50": map50, "map50_95": base.mean(coco), "ap50": per_label}


TASKS = (Detect,)
