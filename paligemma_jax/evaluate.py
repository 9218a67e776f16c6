r"""Evaluates a checkpoint on a JSONL dataset: predictions, per-example scores, task metrics.

  python -m paligemma_jax.evaluate --checkpoint=/ckpt/pg2-3b-224 --dataset=vqav2_val.jsonl \
      --task=vqa --predictions=vqa_preds.jsonl --metrics=vqa_metrics.json --batch_size=8

Each dataset line is {"image": path, "prompt": str, ...references}; see docs/evaluation.md for
every task's fields and output formats. Images are decoded in background threads, one batch
ahead of the model; batches have fixed shapes (prompt lengths bucketed, the last batch padded),
so nothing compiles twice.

Every prediction is appended to --predictions as its batch finishes, with its dataset line
number. Running the same command again after an interruption skips the lines already there (a
truncated last line is dropped) and the metrics cover every example. Lines that are not valid
JSON, lack a field or name a missing file are reported with their line number and skipped; the
metrics JSON counts them by reason.

The module defines its flags only when run as a program, so the library part (`Evaluator`,
`read_dataset`, `compute_metrics`) can be imported next to other command-line modules.
"""

import collections
import contextlib
import dataclasses
import functools
import json
import math
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np
from PIL import Image
import tqdm

from paligemma_jax import checkpoint
from paligemma_jax import files
from paligemma_jax import inference
from paligemma_jax import metrics as metrics_lib
from paligemma_jax import scoring
from paligemma_jax import sharding
from paligemma_jax.tasks import detection
from paligemma_jax.tasks import segmentation

TEXT_TASKS = ("vqa", "exact_match", "anls", "relaxed")  # One generated answer vs `answers`.
TASKS = TEXT_TASKS + ("caption", "detect", "segment", "score")
MAX_NEW_TOKENS = dict(vqa=32, exact_match=32, anls=32, relaxed=32, caption=64, detect=256, segment=64)
MAX_SKIPPED_LINES = 100  # Skipped lines listed by number in the metrics file; all are counted.
_TEXT_SCORES = {
    "vqa": ("vqa_accuracy", metrics_lib.vqa_accuracy),
    "exact_match": ("exact_match", metrics_lib.exact_match),
    "anls": ("anls", metrics_lib.anls),
    "relaxed": ("relaxed_accuracy",
                lambda text, answers: max(metrics_lib.relaxed_accuracy(text, a) for a in answers)),
}

# ----------------------------------------------------------------------------------------------
# Reading the dataset.


class Invalid(ValueError):
  """An example that cannot be evaluated; `reason` is the short form counted in the summary."""

  def __init__(self, reason: str, detail: str | None = None):
    super().__init__(detail or reason)
    self.reason = reason


@dataclasses.dataclass
class Row:
  line: int  # 1-based line number in the dataset file.
  record: dict  # The parsed line; reference lists normalised (a lone string becomes [string]).
  image: str  # The image path, resolved against the image directory.
  mask: str | None = None  # segment: the reference mask's path, resolved likewise.

  @property
  def reference(self) -> dict:
    return {k: v for k, v in self.record.items() if k not in ("image", "prompt")}


@dataclasses.dataclass
class Skip:
  line: int
  reason: str
  message: str


def _strings(record: dict, key: str):
  if key not in record:
    raise Invalid(f"missing '{key}'")
  value = [record[key]] if isinstance(record[key], str) else record[key]
  if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
    raise Invalid(f"invalid '{key}'", f"'{key}' must be a string or a non-empty list of strings")
  record[key] = value


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate(record, task: str, resolve) -> dict:
  """Checks one parsed line for `task`; returns it with lists normalised or raises Invalid."""
  if not isinstance(record, dict):
    raise Invalid("not a JSON object")
  for key in ("image", "prompt"):
    if key not in record:
      raise Invalid(f"missing '{key}'")
    if not isinstance(record[key], str):
      raise Invalid(f"invalid '{key}'", f"'{key}' must be a string")
  if task in TEXT_TASKS:
    _strings(record, "answers")
  elif task == "caption":
    _strings(record, "captions")
  elif task == "detect":
    for key in ("boxes", "labels"):
      if key not in record:
        raise Invalid(f"missing '{key}'")
    boxes, labels = record["boxes"], record["labels"]
    if not isinstance(boxes, list) or not all(
        isinstance(b, list) and len(b) == 4 and all(map(_is_number, b)) for b in boxes):
      raise Invalid("invalid 'boxes'", "'boxes' must be a list of [x1, y1, x2, y2] pixel boxes")
    if not isinstance(labels, list) or not all(isinstance(s, str) for s in labels):
      raise Invalid("invalid 'labels'", "'labels' must be a list of strings")
    if len(boxes) != len(labels):
      raise Invalid("invalid 'labels'", f"{len(boxes)} boxes but {len(labels)} labels")
  elif task == "segment":
    if "mask" not in record:
      raise Invalid("missing 'mask'")
    if not isinstance(record["mask"], str):
      raise Invalid("invalid 'mask'", "'mask' must be a path to a PNG")
    if not os.path.isfile(resolve(record["mask"])):
      raise Invalid("mask not found", f"mask not found: {resolve(record['mask'])}")
  elif task == "score":
    _strings(record, "suffixes")
    answer = record.get("answer")
    if answer is not None and (not isinstance(answer, int) or isinstance(answer, bool)
                               or not 0 <= answer < len(record["suffixes"])):
      raise Invalid("invalid 'answer'", f"'answer' must be an index into the "
                                        f"{len(record['suffixes'])} suffixes")
  else:
    raise ValueError(f"Unknown task {task!r}; choose one of {TASKS}.")
  return record


def read_dataset(path: str, task: str, image_dir: str | None = None):
  """(rows, skips): the usable lines and, for the others, why not. Relative image and mask paths
  are resolved against `image_dir` (default: the dataset file's directory)."""
  root = os.path.dirname(os.path.abspath(path)) if image_dir is None else image_dir
  resolve = lambda p: os.path.join(root, os.path.expanduser(p))
  rows, skips = [], []
  with open(path, encoding="utf-8") as f:
    for number, text in enumerate(f, 1):
      if not text.strip():
        continue
      try:
        try:
          record = json.loads(text)
        except json.JSONDecodeError as e:
          raise Invalid("invalid JSON", f"invalid JSON: {e}") from None
        record = validate(record, task, resolve)
      except Invalid as e:
        skips.append(Skip(number, e.reason, f"{path}:{number}: {e}"))
        continue
      mask = resolve(record["mask"]) if task == "segment" else None
      rows.append(Row(number, record, resolve(record["image"]), mask))
  return rows, skips


def _reason(error: str) -> str:
  """The summary category of an inference error message."""
  for start, reason in (("Image not found", "image not found"), ("Not an image", "unreadable image"),
                        ("Cannot decode image", "unreadable image"), ("prompt", "too long")):
    if error.startswith(start):
      return reason
  return error


# ----------------------------------------------------------------------------------------------
# Per-example outputs: everything the metrics need goes into the prediction line.

def _boxes(boxes) -> list:
  return np.round(np.asarray(boxes, np.float64), 2).reshape(-1, 4).tolist()


def load_mask(path: str) -> np.ndarray:
  """A binary PNG (or any image Pillow reads) -> bool [h, w]; non-zero pixels are the object."""
  try:
    with Image.open(path) as image:
      if image.mode not in ("1", "L", "P", "I", "I;16", "F"):
        image = image.convert("L")
      return np.asarray(image) > 0
  except (OSError, ValueError) as e:
    raise Invalid("unreadable mask", f"cannot read mask {path}: {e}") from None


def segment_fields(text: str, width: int, height: int, vae_params, target: np.ndarray) -> dict:
  """Decoded objects, and the IoU of the first one's mask with `target`.

  As big_vision's RefCOCO evaluator: only the first object counts, and a first object that does
  not parse (or whose box is empty in whole pixels) scores IoU 0 and is counted as invalid.
  """
  seg = segmentation.decode_masks(text, width, height, vae_params)
  groups = detection.split_objects(text)
  first = detection.parse_object(groups[0], num_seg=segmentation.NUM_CODES) if groups else None
  valid = first is not None and segmentation.pixel_box(first[0], width, height) is not None
  predicted = seg.masks[0] if valid else np.zeros_like(target)
  intersection = int(np.logical_and(predicted, target).sum())
  union = int(np.logical_or(predicted, target).sum())
  iou = metrics_lib.mask_iou(predicted, target) if valid else 0.0
  return {"boxes": _boxes(seg.boxes), "labels": seg.labels, "skipped": seg.skipped, "valid": valid,
          "iou": iou, "intersection": intersection, "union": union}


def generation_fields(task: str, row: Row, result: dict, vae_params=None) -> dict:
  """The task's per-example outputs for one generated answer; raises Invalid for a bad mask."""
  text = result["text"]
  width, height = result["image_size"]
  if task in TEXT_TASKS:
    return {"score": _TEXT_SCORES[task][1](text, row.record["answers"])}
  if task == "detect":
    d = detection.parse_detections(text, width, height)
    return {"boxes": _boxes(d.boxes), "labels": d.labels, "skipped": d.skipped}
  if task == "segment":
    target = load_mask(row.mask)
    if target.shape != (height, width):
      raise Invalid("mask size differs", f"mask {row.record['mask']} is {target.shape[1]}x"
                                         f"{target.shape[0]} but the image is {width}x{height}")
    return segment_fields(text, width, height, vae_params, target)
  return {}  # caption: CIDEr is corpus-level.


def score_fields(row: Row, result: dict) -> dict:
  """Per-suffix log-likelihoods from the Scorer, and whether the likeliest is the answer."""
  out = {k: result[k] for k in ("logprob", "mean_logprob", "num_tokens", "choice")}
  answer = row.record.get("answer")
  if answer is not None:
    out["correct"] = out["choice"] == answer
    out["correct_normalized"] = int(np.argmax(out["mean_logprob"])) == answer
  return out


# ----------------------------------------------------------------------------------------------
# Metrics, from the prediction lines alone (so a resumed run counts the earlier lines too).

def _mean(values) -> float:
  values = list(values)
  return float(np.mean(values)) if values else float("nan")


def compute_metrics(task: str, lines: list) -> dict:
  """The task's corpus metrics over prediction lines (as written to --predictions)."""
  if task in TEXT_TASKS:
    return {_TEXT_SCORES[task][0]: _mean(p["score"] for p in lines)}
  if task == "caption":
    if not lines:
      return {"cider": float("nan")}
    return {"cider": metrics_lib.cider([p["text"] for p in lines],
                                       [p["reference"]["captions"] for p in lines])[0]}
  if task == "detect":
    preds = [list(zip(p["labels"], p["boxes"])) for p in lines]
    truth = [list(zip(p["reference"]["labels"], p["reference"]["boxes"])) for p in lines]
    map50, per_label = metrics_lib.mean_average_precision(preds, truth, 0.5)
    coco = [metrics_lib.mean_average_precision(preds, truth, t)[0] for t in np.arange(0.5, 0.951, 0.05)]
    return {"map50": map50, "map50_95": _mean(coco), "ap50": per_label}
  if task == "segment":
    union = sum(p["union"] for p in lines)
    return {"miou": _mean(p["iou"] for p in lines),
            "ciou": sum(p["intersection"] for p in lines) / union if union else float("nan"),
            "invalid": sum(not p["valid"] for p in lines)}
  if task == "score":
    sums = [s for p in lines for s in p["logprob"]]
    counts = [n for p in lines for n in p["num_tokens"]]
    out = {"mean_logprob": sum(sums) / sum(counts) if counts else float("nan"),
           "perplexity": scoring.perplexity(sums, counts)}
    answered = [p for p in lines if "correct" in p]
    if answered:
      right = [(p["logprob"][p["reference"]["answer"]], p["num_tokens"][p["reference"]["answer"]])
               for p in answered]
      out.update(accuracy=_mean(p["correct"] for p in answered),
                 accuracy_normalized=_mean(p["correct_normalized"] for p in answered),
                 answer_perplexity=scoring.perplexity(*zip(*right)), answered=len(answered))
    return out
  raise ValueError(f"Unknown task {task!r}; choose one of {TASKS}.")


def _json_safe(x):
  """NaN (a metric over nothing) becomes null, so the file is strict JSON."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  return x


# ----------------------------------------------------------------------------------------------
# The predictions file: append-only, resumable.

def read_predictions(path: str) -> dict:
  """{dataset line: prediction} of the complete lines of an earlier run.

  A line cut short by an interruption (or otherwise unreadable) is dropped, and the file is
  rewritten without it so that new lines append cleanly.
  """
  if not os.path.exists(path):
    return {}
  with open(path, "rb") as f:
    raw = f.read()
  done, kept, dropped = {}, [], 0
  for text in raw.split(b"\n"):
    if not text.strip():
      continue
    try:
      prediction = json.loads(text)
      if not isinstance(prediction, dict) or not isinstance(prediction.get("line"), int):
        raise ValueError("no line number")
    except ValueError:
      dropped += 1
      continue
    done[prediction["line"]] = prediction
    kept.append(text.decode("utf-8"))
  if (dropped or (raw and not raw.endswith(b"\n"))) and sharding.is_writer():
    logging.warning("%s: dropping %d incomplete or unreadable line(s) of an earlier run.", path, dropped)
    files.write_atomically(path, "".join(t + "\n" for t in kept))
  return done


def check_resumable(done: dict, rows: list, task: str, predictions: str, dataset: str):
  """Refuses to mix runs: every earlier prediction must be this task's, for the same example."""
  by_line = {r.line: r for r in rows}
  for line, p in done.items():
    row = by_line.get(line)
    if (p.get("task") != task or row is None or p.get("image") != row.record["image"]
        or p.get("prompt") != row.record["prompt"]):
      raise ValueError(f"{predictions} line for {dataset}:{line} is not a --task={task} prediction "
                       f"of that example; pass a new --predictions file to start over.")


# ----------------------------------------------------------------------------------------------
# The evaluation loop.

class Evaluator:
  """Runs datasets through one model. The model is loaded on first use (`load()` returns
  (params, config, tokenizer)), so a finished run's metrics are recomputed without it."""

  def __init__(self, load, *, batch_size: int = 1, vae_params=None):
    self._load, self.batch_size, self.vae_params = load, batch_size, vae_params

  @functools.cached_property
  def model(self):
    return self._load()

  @functools.cached_property
  def predictor(self) -> inference.Predictor:
    params, config, tokenizer = self.model
    return inference.Predictor(config, params, tokenizer, batch_size=self.batch_size)

  @functools.cached_property
  def scorer(self) -> scoring.Scorer:
    params, config, tokenizer = self.model
    return scoring.Scorer(config, params, tokenizer, batch_size=self.batch_size)

  def _results(self, task: str, rows: list, max_new_tokens: int):
    """Model outputs for `rows`, in order."""
    if task == "score":
      return self.scorer.score(scoring.Candidates(r.image, r.record["prompt"], r.record["suffixes"])
                               for r in rows)
    examples = (inference.Example(r.image, r.record["prompt"]) for r in rows)
    return self.predictor.predict(examples, max_new_tokens=max_new_tokens)

  def run(self, dataset: str, task: str, predictions: str, metrics_path: str | None = None, *,
          max_new_tokens: int | None = None, image_dir: str | None = None,
          progress: bool = True) -> dict:
    """Evaluates (or finishes evaluating) `dataset`; returns the metrics, also written to
    `metrics_path` if given."""
    if task not in TASKS:
      raise ValueError(f"Unknown task {task!r}; choose one of {TASKS}.")
    if task == "segment" and self.vae_params is None:
      raise ValueError("--task=segment needs the mask decoder weights (--vae_npz).")
    max_new_tokens = max_new_tokens or MAX_NEW_TOKENS.get(task, 1)
    rows, skips = read_dataset(dataset, task, image_dir)
    examples = len(rows) + len(skips)  # Non-empty dataset lines.
    done = read_predictions(predictions)
    check_resumable(done, rows, task, predictions, dataset)
    todo = [r for r in rows if r.line not in done]
    if done:
      logging.info("Resuming: %d of %d examples are already in %s.", len(done), len(rows), predictions)
    if todo:
      bar = tqdm.tqdm(total=len(rows), initial=len(rows) - len(todo), unit="ex", desc=task,
                      disable=not progress)
      writer = sharding.is_writer()  # On a multi-host job every host decodes, the first writes.
      with open(predictions, "a", encoding="utf-8") if writer else contextlib.nullcontext() as out:
        for row, result in zip(todo, self._results(task, todo, max_new_tokens)):
          bar.update(1)
          try:
            if "error" in result:
              raise Invalid(_reason(result["error"]), result["error"])
            if task == "score":
              fields = score_fields(row, result)
            else:
              fields = {"text": result["text"], "stop_reason": result["stop_reason"],
                        **generation_fields(task, row, result, self.vae_params)}
          except Invalid as e:
            skips.append(Skip(row.line, e.reason, f"{dataset}:{row.line}: {e}"))
            bar.set_postfix(skipped=len(skips))
            continue
          prediction = {"line": row.line, "task": task, "image": row.record["image"],
                        "prompt": row.record["prompt"], "image_size": list(result["image_size"]),
                        **fields, "reference": row.reference}
          if out:
            out.write(json.dumps(prediction, ensure_ascii=False) + "\n")
            out.flush()
          done[row.line] = prediction
      bar.close()
    skips.sort(key=lambda s: s.line)
    for s in skips:
      logging.warning("skipped %s", s.message)
    lines = [done[r.line] for r in rows if r.line in done]
    summary = {
        "task": task, "dataset": dataset, "examples": examples, "evaluated": len(lines),
        "skipped": {"count": len(skips), "reasons": dict(collections.Counter(s.reason for s in skips)),
                    "lines": [{"line": s.line, "error": s.message} for s in skips[:MAX_SKIPPED_LINES]]},
    }
    result = _json_safe({**summary, **compute_metrics(task, lines)})
    if metrics_path and sharding.is_writer():
      files.write_atomically(metrics_path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


# ----------------------------------------------------------------------------------------------
# Command line.

def define_flags():
  """The command-line flags; defined only when this module runs as a program (see above)."""
  flags.DEFINE_string("checkpoint", None, "Converted checkpoint directory, or a Hugging Face "
                      "PaliGemma directory.", required=True)
  config_flags.DEFINE_config_file(
      "config", None, "Optional model config overriding the checkpoint's, e.g. "
      "configs/paligemma.py:pg2-3b-448 --config.text.sliding_window=0. Shapes must match.",
      lock_config=False)
  flags.DEFINE_string("dataset", None, "JSONL dataset; see docs/evaluation.md.", required=True)
  flags.DEFINE_enum("task", None, TASKS, "Metric to compute (and reference fields to read).",
                    required=True)
  flags.DEFINE_string("predictions", None, "Predictions JSONL: appended to as batches finish; "
                      "rerun the same command to resume.", required=True)
  flags.DEFINE_string("metrics", None, "Write the metrics JSON here too (they are always printed).")
  flags.DEFINE_integer("batch_size", 1, "Examples per compiled batch (the last is padded).")
  flags.DEFINE_integer("max_new_tokens", None, "Most tokens to generate per example; default per "
                       f"task: {MAX_NEW_TOKENS}.")
  flags.DEFINE_string("vae_npz", None, "Mask decoder weights (big_vision's vae-oid.npz), for "
                      "--task=segment.")
  flags.DEFINE_string("image_dir", None, "Resolve relative image and mask paths here (default: "
                      "the dataset file's directory).")
  flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                    "Compute and parameter dtype; auto = float32 on CPU, bfloat16 on TPU/GPU.")
  sharding.define_flags()


def main(argv):
  del argv
  f = flags.FLAGS
  checkpoint.quiet_orbax_logs()
  mesh = sharding.mesh_from_flags()  # Before anything touches a device.
  if f.task == "segment" and not f.vae_npz:
    raise app.UsageError("--task=segment needs --vae_npz (big_vision's vae-oid.npz).")
  vae_params = segmentation.load_vae_npz(f.vae_npz) if f.task == "segment" else None
  dtype = None if f.dtype == "auto" else f.dtype
  load = lambda: inference.load_model(f.checkpoint, dtype, f.config, mesh)
  evaluator = Evaluator(load, batch_size=f.batch_size, vae_params=vae_params)
  result = evaluator.run(f.dataset, f.task, f.predictions, f.metrics,
                         max_new_tokens=f.max_new_tokens, image_dir=f.image_dir)
  print(json.dumps(result, indent=2, ensure_ascii=False))
  return 1 if not result["evaluated"] else 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
