"""Evaluation metrics for PaliGemma's tasks, in pure Python/NumPy.

Each metric names the standard it follows. Per-example functions return a float in [0, 1];
average them over a split. CIDEr and mAP are corpus-level and take the whole split at once.
"""

import collections
import math
import re
import string
from typing import Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------
# VQA accuracy: the official VQAv2 script (GT-Vision-Lab/VQA, vqaEval.py).

_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
              "`", ",", "?", "!")
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = {"a", "an", "the"}
# As in the official map, including its oddities ("somebody'd" -> "somebodyd"; capitalised keys
# that never match lower-cased text).
_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've"}
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # What the official "(?!<=\d)(\.)(?!\d)" matches in effect.


def _vqa_strip(text: str) -> str:
  return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_punctuation(text: str) -> str:
  """Official `processPunctuation`: a mark next to a space (or any mark, once the text has a
  digit,digit comma) is deleted, otherwise replaced by a space; full stops not followed by a
  digit are deleted, so "3.5" survives."""
  delete = _DIGIT_COMMA.search(text) is not None
  out = text
  for p in _VQA_PUNCT:
    out = out.replace(p, "" if delete or p + " " in text or " " + p in text else " ")
  return _PERIOD.sub("", out)


def vqa_digits_articles(text: str) -> str:
  """Official `processDigitArticle`: lower-case, number words to digits ("two" -> "2"),
  drop a/an/the, restore contractions ("dont" -> "don't")."""
  words = [_VQA_NUMBERS.get(w, w) for w in text.lower().split()]
  return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES)


def vqa_normalize(text: str) -> str:
  """The full official normalisation applied to a predicted answer."""
  return vqa_digits_articles(vqa_punctuation(_vqa_strip(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """VQAv2 accuracy of one answer against the human answers (usually 10).

  As the official script: the prediction is fully normalised; the human answers only get
  whitespace and, when they disagree, punctuation processing (the released annotations are
  already normalised). The score is min(#matching humans / 3, 1) averaged over the leave-one-
  out subsets of the humans (10 choose 9), so 3 matching humans out of 10 score 0.9, not 1.
  big_vision's VQAv2 evaluator instead normalises both sides fully, and only when humans disagree.
  """
  if not answers:
    raise ValueError("vqa_accuracy needs at least one human answer")
  pred = vqa_normalize(prediction)
  gts = [_vqa_strip(a) for a in answers]
  if len(set(gts)) > 1:
    gts = [vqa_punctuation(a) for a in gts]
  matches = np.array([g == pred for g in gts])
  total = matches.sum()
  return float(np.mean([min((total - m) / 3.0, 1.0) for m in matches]))


# ----------------------------------------------------------------------------------------------
# Exact match, ANLS, relaxed accuracy.

_PUNCTUATION = frozenset(string.punctuation)


def squad_normalize(text: str) -> str:
  """SQuAD v1.1 `normalize_answer`: lower-case, drop punctuation and a/an/the, squash spaces."""
  text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
  return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _as_list(references) -> list:
  return [references] if isinstance(references, str) else list(references)


def exact_match(prediction: str, references, normalize: bool = False) -> float:
  """1.0 if the prediction equals any reference; `normalize` applies SQuAD's normalisation
  to both sides first (otherwise only surrounding whitespace is ignored)."""
  norm = squad_normalize if normalize else str.strip
  return float(norm(prediction) in {norm(r) for r in _as_list(references)})


def levenshtein(a: str, b: str) -> int:
  """Edit distance with unit insert, delete and substitute costs."""
  if len(a) < len(b):
    a, b = b, a
  row = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    prev, row[0] = row[0], i
    for j, cb in enumerate(b, 1):
      prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
  return row[-1]


def anls(prediction: str, references, threshold: float = 0.5) -> float:
  """ANLS (Biten et al. 2019, ST-VQA / DocVQA): per reference 1 - NL, where NL is the edit
  distance over the longer length, or 0 when NL >= threshold; the best reference counts.
  Both sides are lower-cased and their whitespace squashed, as the official DocVQA scorer does."""
  norm = lambda s: " ".join(s.strip().lower().split())
  pred, best = norm(prediction), 0.0
  for ref in map(norm, _as_list(references)):
    nl = levenshtein(pred, ref) / max(len(pred), len(ref)) if pred or ref else 0.0
    best = max(best, 1.0 - nl if nl < threshold else 0.0)
  return best


def _to_float(text: str):
  try:
    return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
  except ValueError:
    return None


def relaxed_accuracy(prediction: str, target: str, max_relative_error: float = 0.05) -> float:
  """ChartQA relaxed accuracy (Masry et al. 2022, after Methani et al. 2020), as in big_vision
  and pix2struct: numbers (a trailing % divides by 100) may be off by 5% of the target;
  anything else, and a target of 0, needs an exact string match."""
  prediction, target = prediction.strip(), target.strip()
  p, t = _to_float(prediction), _to_float(target)
  if p is not None and t:
    return float(abs(p - t) / abs(t) <= max_relative_error)
  return float(prediction == target)


# ----------------------------------------------------------------------------------------------
# CIDEr-D, as pycocoevalcap's Cider (the COCO caption evaluation server).

_SPACE_PUNCTUATION = str.maketrans(string.punctuation, " " * len(string.punctuation))


def caption_tokens(text: str) -> list:
  """Lower-case words with punctuation replaced by spaces; a stand-in for the PTB tokenizer
  pycocoevalcap runs (which needs Java), so scores can differ slightly from the server's."""
  return text.lower().translate(_SPACE_PUNCTUATION).split()


def _ngrams(words: list, n: int) -> collections.Counter:
  return collections.Counter(tuple(words[i:i + k]) for k in range(1, n + 1)
                             for i in range(len(words) - k + 1))


def cider(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
          sigma: float = 6.0) -> tuple:
  """CIDEr-D (Vedantam et al. 2015) exactly as pycocoevalcap computes it -> (mean, per image).

  TF-IDF n-gram vectors (n = 1..4), document frequency counted over the references of the
  evaluated images (so one image alone scores 0), candidate counts clipped to the reference's,
  a Gaussian length penalty exp(-delta^2 / 2 sigma^2), the mean over n and over references,
  times 10. Like pycocoevalcap, "length" is the number of bigrams, i.e. words - 1.
  """
  if len(candidates) != len(references):
    raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
  if not candidates:
    return 0.0, np.zeros(0)
  tests = [_ngrams(caption_tokens(c), n) for c in candidates]
  refs = [[_ngrams(caption_tokens(r), n) for r in rs] for rs in references]
  df = collections.Counter(g for rs in refs for g in set().union(*rs))
  log_n = math.log(len(refs))

  def vec(counts):
    v = [{} for _ in range(n)]
    for g, tf in counts.items():
      v[len(g) - 1][g] = tf * (log_n - math.log(max(1.0, df[g])))
    norms = [math.sqrt(sum(w * w for w in d.values())) for d in v]
    return v, norms, sum(tf for g, tf in counts.items() if len(g) == 2)

  scores = []
  for test, rs in zip(tests, refs):
    if not rs:
      raise ValueError("every image needs at least one reference")
    v, nv, lv = vec(test)
    total = 0.0
    for r in rs:
      u, nu, lu = vec(r)
      penalty = math.exp(-((lv - lu) ** 2) / (2 * sigma ** 2))
      for k in range(n):
        dot = sum(min(w, u[k].get(g, 0.0)) * u[k].get(g, 0.0) for g, w in v[k].items())
        total += (dot / (nv[k] * nu[k]) if nv[k] and nu[k] else dot) * penalty
    scores.append(10.0 * total / n / len(rs))
  return float(np.mean(scores)), np.asarray(scores)


# ----------------------------------------------------------------------------------------------
# Detection: box IoU and mAP.

def box_iou(a, b) -> np.ndarray:
  """Pairwise IoU of (x1, y1, x2, y2) boxes [N, 4] x [M, 4] -> [N, M]; continuous coordinates
  (area = w * h, COCO style, no +1); empty boxes have IoU 0 with everything."""
  a = np.asarray(a, np.float64).reshape(-1, 4)
  b = np.asarray(b, np.float64).reshape(-1, 4)
  area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)
  lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = np.clip(hi - lo, 0, None)
  inter = wh[..., 0] * wh[..., 1]
  union = area(a)[:, None] + area(b)[None, :] - inter
  return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _objects(image, with_score: bool) -> list:
  """(label, box[, score]) tuples, or anything with `.labels` and `.boxes` (e.g. Detections)."""
  if hasattr(image, "boxes") and hasattr(image, "labels"):
    image = list(zip(image.labels, image.boxes))
  out = []
  for obj in image:
    score = float(obj[2]) if with_score and len(obj) > 2 else 1.0
    out.append((obj[0], np.asarray(obj[1], np.float64), score))
  return out


def average_precision(recall, precision) -> float:
  """Area under the precision envelope, all-point interpolation (PASCAL VOC 2010+)."""
  r = np.concatenate([[0.0], recall, [1.0]])
  p = np.concatenate([[0.0], precision, [0.0]])
  p = np.maximum.accumulate(p[::-1])[::-1]
  step = np.flatnonzero(r[1:] != r[:-1])
  return float(np.sum((r[step + 1] - r[step]) * p[step + 1]))


def mean_average_precision(predictions: Sequence, ground_truths: Sequence,
                           iou_threshold: float = 0.5) -> tuple:
  """mAP@iou_threshold over labels -> (mAP, {label: AP}), PASCAL VOC 2010+ style.

  `predictions` and `ground_truths` hold one entry per image: a list of (label, box[, score])
  with (x1, y1, x2, y2) boxes, or a Detections. Per label, predictions are taken by descending
  score and each claims the best-overlapping unclaimed ground truth of its image at
  IoU >= threshold; AP is the all-point interpolated area under precision/recall. PaliGemma
  gives no scores, so a missing score is 1.0; tied scores form a single operating point (as
  scikit-learn does), so the result does not depend on the order of images, and with no scores
  at all AP = precision * recall. Labels without ground truth anywhere are left out (their
  predictions count nowhere), as VOC and COCO do; with no ground truth at all mAP is NaN.
  """
  if len(predictions) != len(ground_truths):
    raise ValueError(f"{len(predictions)} prediction lists but {len(ground_truths)} ground truths")
  preds = [_objects(p, True) for p in predictions]
  gts = [_objects(g, False) for g in ground_truths]
  aps = {}
  for label in sorted({o[0] for g in gts for o in g}):
    gt_boxes = [np.array([o[1] for o in g if o[0] == label]).reshape(-1, 4) for g in gts]
    num_gt = sum(len(b) for b in gt_boxes)
    cands = [(s, i, box) for i, p in enumerate(preds) for (l, box, s) in p if l == label]
    cands.sort(key=lambda c: -c[0])  # Stable: ties keep image and output order.
    claimed = [np.zeros(len(b), bool) for b in gt_boxes]
    tp = np.zeros(len(cands))
    for k, (_, i, box) in enumerate(cands):
      if len(gt_boxes[i]):
        ious = np.where(claimed[i], -1.0, box_iou(box, gt_boxes[i])[0])
        j = int(np.argmax(ious))
        if ious[j] >= iou_threshold:
          claimed[i][j], tp[k] = True, 1.0
    if not cands:
      aps[label] = 0.0
      continue
    scores = np.array([c[0] for c in cands])
    last_of_tie = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])
    hits = np.cumsum(tp)[last_of_tie]
    aps[label] = average_precision(hits / num_gt, hits / (last_of_tie + 1))
  return (float(np.mean(list(aps.values()))) if aps else float("nan")), aps


# ----------------------------------------------------------------------------------------------
# Segmentation: mask IoU and mean IoU.

def mask_iou(prediction, target) -> float:
  """|P & T| / |P | T| of two boolean masks of one shape; 1.0 when both are empty."""
  p, t = np.asarray(prediction, bool), np.asarray(target, bool)
  if p.shape != t.shape:
    raise ValueError(f"mask shapes differ: {p.shape} vs {t.shape}")
  union = np.logical_or(p, t).sum()
  return float(np.logical_and(p, t).sum() / union) if union else 1.0


def mean_iou(predictions: Sequence, targets: Sequence) -> float:
  """Mean per-object mask IoU, big_vision's RefCOCO "miou"; a None prediction (nothing
  decoded) scores 0. This is the referring-segmentation mIoU, not the class-averaged one
  of semantic segmentation."""
  if len(predictions) != len(targets):
    raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
  if not targets:
    return float("nan")
  return float(np.mean([0.0 if p is None else mask_iou(p, t) for p, t in zip(predictions, targets)]))
