"""Metrics against hand-computed values, including the awkward cases."""

import math

import numpy as np
import pytest

from paligemma_jax.tasks import metrics
from paligemma_jax.tasks.detection_format import Detections


# VQA accuracy (official VQAv2 script).

@pytest.mark.parametrize("text, want", [
    ("Two.", "2"),  # Full stop dropped, number word to digit.
    ("A dog!", "dog"),  # "!" becomes a space, article dropped, lower-cased.
    ("the  red, car", "red car"),  # ", " deletes the comma; whitespace squashed.
    ("1,000", "1000"),  # A digit,digit comma deletes every mark instead of spacing it.
    ("3.5", "3.5"),  # A full stop before a digit stays.
    ("dont", "don't"),  # Contractions restored.
    ("t-shirt", "t shirt"),  # A mark with no space beside it becomes a space.
    ("none\tof\nthem ", "0 of them"),
])
def test_vqa_normalize(text, want):
  assert metrics.vqa_normalize(text) == want


def test_vqa_accuracy_averages_over_leave_one_out_subsets():
  assert metrics.vqa_accuracy("Two.", ["2"] * 10) == 1.0
  # 3 of 10 humans agree: leaving out one of them leaves 2 (2/3), leaving out any other leaves 3 (1).
  assert metrics.vqa_accuracy("the dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
  # 2 agree: (2 * 1/3 + 8 * 2/3) / 10 = 0.6; 1 agrees: 9 * 1/3 / 10 = 0.3; none: 0.
  assert metrics.vqa_accuracy("dog", ["dog"] * 2 + ["cat"] * 8) == pytest.approx(0.6)
  assert metrics.vqa_accuracy("dog", ["dog"] + ["cat"] * 9) == pytest.approx(0.3)
  assert metrics.vqa_accuracy("", ["cat"] * 10) == 0.0
  assert metrics.vqa_accuracy("yes", ["yes"] * 4) == 1.0  # Fewer than 10 answers work too.


def test_vqa_accuracy_processes_disagreeing_answers_only():
  # Humans disagree: their punctuation is processed too, so "t-shirt" meets "T-shirt" as "t shirt".
  assert metrics.vqa_accuracy("T-shirt", ["t-shirt"] * 2 + ["shirt"] * 8) == pytest.approx(0.6)
  # Humans agree: the official script leaves their answers as they are.
  assert metrics.vqa_accuracy("T-shirt", ["t-shirt"] * 10) == 0.0
  assert metrics.vqa_accuracy("dont", ["don't"] * 10) == 1.0
  with pytest.raises(ValueError):
    metrics.vqa_accuracy("yes", [])


# Exact match, ANLS, relaxed accuracy.

def test_exact_match():
  assert metrics.exact_match(" cat ", "cat") == 1.0
  assert metrics.exact_match("The Cat.", "cat") == 0.0
  assert metrics.exact_match("The Cat.", "cat", normalize=True) == 1.0
  assert metrics.exact_match("an  apple", ["pear", "Apple!"], normalize=True) == 1.0
  assert metrics.exact_match("", ["pear", "apple"]) == 0.0
  assert metrics.exact_match("", [""]) == 1.0


def test_levenshtein():
  assert metrics.levenshtein("kitten", "sitting") == 3
  assert metrics.levenshtein("sitting", "kitten") == 3
  assert metrics.levenshtein("", "abc") == 3 and metrics.levenshtein("abc", "abc") == 0


def test_anls():
  assert metrics.anls("Hello ", "hello") == 1.0  # Case and outer whitespace ignored.
  assert metrics.anls("helo", "hello") == pytest.approx(1 - 1 / 5)  # One edit over the longer 5.
  assert metrics.anls("ab", "abcd") == 0.0  # NL = 2 / 4 is not below the 0.5 threshold.
  assert metrics.anls("abc", "abcd") == pytest.approx(0.75)
  assert metrics.anls("hello", ["xyz", "helo", "jello!"]) == pytest.approx(0.8)  # Best reference.
  assert metrics.anls("", "abc") == 0.0 and metrics.anls("", "") == 1.0


def test_relaxed_accuracy():
  assert metrics.relaxed_accuracy("10.4", "10") == 1.0  # 4% off.
  assert metrics.relaxed_accuracy("10.6", "10") == 0.0  # 6% off.
  assert metrics.relaxed_accuracy("-10.4", "-10") == 1.0
  assert metrics.relaxed_accuracy("5%", "0.05") == 1.0  # Percentages divide by 100.
  assert metrics.relaxed_accuracy("0.0", "0") == 0.0  # A zero target needs the exact string.
  assert metrics.relaxed_accuracy("0", "0") == 1.0
  assert metrics.relaxed_accuracy("Yes", "yes") == 0.0 and metrics.relaxed_accuracy("yes", "yes") == 1.0
  assert metrics.relaxed_accuracy("ten", "10") == 0.0


# CIDEr-D (pycocoevalcap).

def test_cider_hand_computed():
  # Two images, each n-gram in one image's references: idf weight w = log(2) - log(1) everywhere.
  # Image 1, cand "red car": vs "red car" unigram cosine 1, bigram 1; vs "blue car" unigram
  #   (w*w) / (sqrt(2) w * sqrt(2) w) = 0.5, bigram 0; no length difference.
  #   10 * ((1 + 1) + (0.5 + 0)) / 4 n-grams / 2 references = 3.125.
  # Image 2, cand "big dog runs" vs "big dog": unseen n-grams also weigh w ("runs": df 0 -> log 1);
  #   unigram 2 / (sqrt(3) sqrt(2)), bigram 1 / (sqrt(2) * 1); lengths (bigram counts) 2 vs 1:
  #   penalty exp(-1 / 72). 10 * (2 / sqrt(6) + 1 / sqrt(2)) * exp(-1 / 72) / 4.
  image2 = 2.5 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) * math.exp(-1 / 72)
  mean, per_image = metrics.cider(["Red car.", "big dog runs"], [["red car", "blue car"], ["big dog"]])
  np.testing.assert_allclose(per_image, [3.125, image2])
  assert mean == pytest.approx((3.125 + image2) / 2)
  assert mean == pytest.approx(3.4407355985150687)  # pycocoevalcap 1.2 on the same input.


def test_cider_clips_repeated_words_and_penalises_length():
  # "car car" vs "car": unigram weights 2w vs w, clipped min(2w, w) * w / (2w * w) = 0.5 (1.0 without
  # clipping); the bigram "car car" has no counterpart; lengths 1 vs 0 -> exp(-1 / 72).
  mean, per_image = metrics.cider(["car car", "dog"], [["car"], ["dog"]])
  np.testing.assert_allclose(per_image, [10 * 0.5 / 4 * math.exp(-1 / 72), 10 * 1 / 4])


def test_cider_invariants():
  # One image alone: every reference n-gram has df = N, idf log(1) - log(1) = 0.
  assert metrics.cider(["a cat"], [["a cat", "a cat"]])[0] == 0.0
  # Identical to every reference, n-grams unique to its image: each order with n-grams scores 1.
  _, scores = metrics.cider(["one two three four", "x"], [["one two three four"] * 3, ["y"]])
  assert scores[0] == pytest.approx(10.0) and scores[1] == 0.0
  assert metrics.cider([], []) == (0.0, pytest.approx(np.zeros(0)))
  with pytest.raises(ValueError):
    metrics.cider(["a"], [["a"], ["b"]])


# Detection.

def test_box_iou():
  iou = metrics.box_iou([[0, 0, 2, 2], [0, 0, 0, 0]], [[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]])
  np.testing.assert_allclose(iou, [[1 / 7, 1, 0], [0, 0, 0]])
  assert metrics.box_iou(np.zeros((0, 4)), [[0, 0, 1, 1]]).shape == (0, 1)


def test_map_without_scores():
  gt = [[("cat", [0, 0, 10, 10]), ("dog", [20, 20, 30, 30])]]
  pred = [[("cat", [0, 0, 10, 10]), ("cat", [50, 50, 60, 60]), ("dog", [21, 21, 30, 30]),
           ("bird", [0, 0, 5, 5])]]
  m, aps = metrics.mean_average_precision(pred, gt)
  # cat: one operating point, precision 1/2, recall 1 -> 0.5; dog: IoU 81/100 -> 1; bird: no ground truth.
  assert aps == {"cat": pytest.approx(0.5), "dog": pytest.approx(1.0)}
  assert m == pytest.approx(0.75)
  det = Detections(np.array([[0, 0, 10, 10], [50, 50, 60, 60], [21, 21, 30, 30]], np.float32),
                   ["cat", "cat", "dog"], 0)
  assert metrics.mean_average_precision([det], gt)[0] == pytest.approx(0.75)  # Detections work as is.


def test_map_with_scores_uses_the_precision_envelope():
  gt = [[("cat", [0, 0, 10, 10])], [("cat", [0, 0, 10, 10])]]
  pred = [[("cat", [50, 50, 60, 60], 0.9), ("cat", [0, 0, 10, 10], 0.8)], [("cat", [0, 0, 10, 10], 0.7)]]
  # Ranked FP, TP, TP: precision 0, 1/2, 2/3 at recall 0, 1/2, 1; the envelope is 2/3 throughout.
  assert metrics.mean_average_precision(pred, gt)[0] == pytest.approx(2 / 3)


def test_map_ties_do_not_depend_on_image_order():
  gt = [[("cat", [0, 0, 10, 10])], [("cat", [0, 0, 10, 10])]]
  pred = [[("cat", [0, 0, 10, 10])], [("cat", [40, 40, 50, 50])]]
  # One operating point: precision 1/2, recall 1/2 -> 0.25, whichever image comes first.
  assert metrics.mean_average_precision(pred, gt)[0] == pytest.approx(0.25)
  assert metrics.mean_average_precision(pred[::-1], gt[::-1])[0] == pytest.approx(0.25)


def test_map_awkward_cases():
  box = [0, 0, 10, 10]
  # A second box on a claimed object is a false positive.
  _, aps = metrics.mean_average_precision([[("cat", box, 0.9), ("cat", box, 0.8)]], [[("cat", box)]])
  assert aps["cat"] == pytest.approx(1.0)  # Recall 1 reached at precision 1 first.
  _, aps = metrics.mean_average_precision([[("cat", box), ("cat", box)]], [[("cat", box)]])
  assert aps["cat"] == pytest.approx(0.5)
  # IoU exactly at the threshold counts: [0, 0, 10, 5] covers half of `box`.
  assert metrics.mean_average_precision([[("cat", [0, 0, 10, 5])]], [[("cat", box)]])[0] == 1.0
  # A label never predicted scores 0; no predictions at all, 0.
  assert metrics.mean_average_precision([[]], [[("cat", box)]]) == (0.0, {"cat": 0.0})
  # A wrong label does not match.
  assert metrics.mean_average_precision([[("dog", box)]], [[("cat", box)]])[0] == 0.0
  # No ground truth anywhere: undefined.
  m, aps = metrics.mean_average_precision([[("cat", box)], []], [[], []])
  assert math.isnan(m) and aps == {}
  with pytest.raises(ValueError):
    metrics.mean_average_precision([[]], [[], []])


# Segmentation.

def test_mask_iou_and_mean_iou():
  a = np.zeros((4, 6), bool)
  a[:2, :3] = True  # 6 pixels
  b = np.zeros((4, 6), bool)
  b[1:3, :3] = True  # 6 pixels, 3 shared
  assert metrics.mask_iou(a, b) == pytest.approx(3 / 9)
  assert metrics.mask_iou(a, a) == 1.0
  assert metrics.mask_iou(np.zeros_like(a), a) == 0.0
  assert metrics.mask_iou(np.zeros_like(a), np.zeros_like(a)) == 1.0  # Both empty agree.
  assert metrics.mean_iou([a, None], [b, b]) == pytest.approx((3 / 9 + 0) / 2)  # None: nothing decoded.
  assert math.isnan(metrics.mean_iou([], []))
  with pytest.raises(ValueError):
    metrics.mask_iou(a, a.T)
