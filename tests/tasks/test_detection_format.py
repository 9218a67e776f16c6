"""Detection answers: parsing, encoding and drawing boxes."""

import numpy as np
import pytest
from PIL import Image

from paligemma_jax.tasks import detection_format


def test_parse_maps_locs_to_original_pixels_xyxy():
  text = "<loc0123><loc0456><loc0789><loc1000> cat ; <loc0000><loc0000><loc1023><loc1023> dog"
  det = detection_format.parse_detections(text, width=640, height=480)
  assert det.labels == ["cat", "dog"] and det.skipped == 0
  # y1 x1 y2 x2 in the text; value / 1023 of the original size; returned as x1 y1 x2 y2.
  np.testing.assert_allclose(det.boxes[0], [456 / 1023 * 640, 123 / 1023 * 480,
                                            1000 / 1023 * 640, 789 / 1023 * 480], rtol=1e-6)
  np.testing.assert_allclose(det.boxes[1], [0, 0, 640, 480])
  assert det.boxes.dtype == np.float32 and det.boxes.shape == (2, 4)


@pytest.mark.parametrize("group", [
    "<loc0001><loc0002><loc0003> three locs",
    "<loc0001><loc0002><loc0003><loc0004><loc0005> five locs",
    "<loc0001><loc0002><loc0003><loc1024> out of range",
    "<loc001><loc0002><loc0003><loc0004> three digits",
    "<loc0500><loc0002><loc0400><loc0004> y2 above y1",
    "<loc0001><loc0500><loc0003><loc0400> x2 left of x1",
    "label first <loc0001><loc0002><loc0003><loc0004>",
    "<loc0001><loc0002><loc0003><loc0004> cat <loc0001><loc0002><loc0003><loc0004> dog",
    "<loc0001><loc0002><seg001><loc0003><loc0004> seg inside",
    "just words",
])
def test_malformed_groups_are_skipped_and_counted(group):
  det = detection_format.parse_detections(f"<loc0010><loc0020><loc0030><loc0040> ok ; {group}", 100, 100)
  assert det.labels == ["ok"] and det.skipped == 1 and det.boxes.shape == (1, 4)


def test_empty_answer_and_tolerated_spacing():
  det = detection_format.parse_detections("", 10, 10)
  assert det.boxes.shape == (0, 4) and det.labels == [] and det.skipped == 0
  det = detection_format.parse_detections(" <loc0010> <loc0020><loc0030><loc0040>  two words ;", 1023, 1023)
  assert det.labels == ["two words"] and det.skipped == 0
  np.testing.assert_allclose(det.boxes[0], [20, 10, 40, 30], rtol=1e-6)


def test_degenerate_box_and_missing_label_are_kept():
  det = detection_format.parse_detections("<loc0005><loc0005><loc0005><loc0005>", 1023, 1023)
  assert det.labels == [""] and det.skipped == 0
  np.testing.assert_allclose(det.boxes[0], [5, 5, 5, 5], rtol=1e-6)


def test_encode_is_the_inverse_of_parse():
  boxes = [[10.0, 20.0, 300.0, 200.0], [0.0, 0.0, 640.0, 480.0]]
  text = detection_format.encode_boxes(boxes, ["cat", "big dog"], width=640, height=480)
  # round(20 / 480 * 1023) = round(42.6) = 43, round(10 / 640 * 1023) = round(15.98) = 16, ...
  assert text == "<loc0043><loc0016><loc0426><loc0480> cat ; <loc0000><loc0000><loc1023><loc1023> big dog"
  det = detection_format.parse_detections(text, 640, 480)
  assert det.labels == ["cat", "big dog"]
  # One loc step is 1/1023 of the side: the round trip is within half a step.
  np.testing.assert_allclose(det.boxes, boxes, atol=0.5 * 640 / 1023)


def test_encode_clips_and_rounds_half_to_even():
  # 0.5 / 1023 of the side rounds to 0 (half to even, like tf.round); outside the image clips.
  text = detection_format.encode_boxes([[-5.0, 0.5, 2000.0, 2.5]], ["x"], width=1023, height=1023)
  assert text == "<loc0000><loc0000><loc0002><loc1023> x"
  with pytest.raises(ValueError, match="2 boxes but 1 labels"):
    detection_format.encode_boxes([[0, 0, 1, 1]] * 2, ["x"], 10, 10)


def test_draw_boxes_outlines_box_and_writes_label():
  image = Image.new("RGB", (120, 80), (0, 0, 0))
  det = detection_format.Detections(np.array([[20, 30, 100, 70]], np.float32), ["cat"], 0)
  out = np.asarray(detection_format.draw_boxes(image, det))
  color = detection_format.color_for("cat")
  assert tuple(out[50, 20]) == color and tuple(out[50, 100]) == color  # Left and right edges.
  assert tuple(out[50, 60]) == (0, 0, 0)  # Inside stays untouched.
  above = out[:30, 20:60]
  assert (above == color).all(-1).any()  # The label's tab sits above the box...
  assert above[..., 0].max() > 200  # ...with light text on it (the tab and background have no red).
  assert np.asarray(image).max() == 0  # Input image unchanged.
