"""Evaluating a model on a dataset: predictions appended as they finish, resumable, then metrics.

  rows (dataset.read_dataset) -> the model (Predictor.predict, or Scorer.score for --task=score)
  -> per-example fields (Task.example_fields) appended to the predictions file -> Task.metrics
  over every prediction line, earlier runs' included.

The predictions file is a `files.Resumable`: running the same evaluation again after an
interruption skips the lines already there (a line cut short is dropped); predictions made with
another model, task, dataset or answer length are refused, naming the difference. Examples that
cannot run (a bad line, a missing image, a prompt too long) are skipped and counted by reason.
"""

import collections
import dataclasses
import functools
import json
import math
import os

from absl import logging
import tqdm

from paligemma_jax import errors
from paligemma_jax import files
from paligemma_jax import multihost
from paligemma_jax import tasks
from paligemma_jax.decoding import beam_search
from paligemma_jax.decoding import inference
from paligemma_jax.decoding import scoring
from paligemma_jax.evaluation import dataset as dataset_lib
from paligemma_jax.preprocess import image_fields
from paligemma_jax.tasks import base

MAX_SKIPPED_LINES = 100  # Skipped lines listed by number in the metrics file; all are counted.


def json_safe(x):
  """NaN (a metric over nothing) becomes null, so the file is strict JSON."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v) for v in x]
  return x


def _check_same_examples(done: dict, rows: list, predictions: str, dataset: str):
  """Every earlier prediction must be of the same example (image and prompt) at its line."""
  by_line = {r.line: r for r in rows}
  for line, p in done.items():
    row = by_line.get(line)
    if row is None or image_fields.given(p) != image_fields.given(row.record) or (
        p.get("prompt") != row.record["prompt"]):
      raise errors.InputError(f"{predictions}: the prediction for {dataset}:{line} is not of that "
                              "example (the dataset changed?); pass a new --predictions file.")


class Evaluator:
  """Runs datasets through one model. The model is loaded on first use (`load()` returns
  (params, config, tokenizer)), so a finished run's metrics are recomputed without it.

  model_identity: what names the model in the predictions' settings (cli.model_settings: loading.checkpoint_identity and the dtype), so
  predictions of different models are never mixed.

  beams: answer with beam search (its best hypothesis) instead of greedy decoding.
  cache_dtype: the KV cache's, default the compute dtype; "int8" (core.Setup.create).
  """

  def __init__(self, load, *, batch_size: int = 1, vae_params=None, model_identity=None,
               beams: beam_search.BeamSearch | None = None, cache_dtype=None):
    self._load, self.batch_size, self.vae_params = load, batch_size, vae_params
    self.model_identity, self.beams, self.cache_dtype = model_identity, beams, cache_dtype

  @functools.cached_property
  def model(self):
    return self._load()

  @functools.cached_property
  def predictor(self) -> inference.Predictor:
    return inference.Predictor(*self.model, batch_size=self.batch_size,
                               cache_dtype=self.cache_dtype)

  @functools.cached_property
  def scorer(self) -> scoring.Scorer:
    return scoring.Scorer(*self.model, batch_size=self.batch_size, cache_dtype=self.cache_dtype)

  def _results(self, task: base.Task, rows: list, max_new_tokens: int):
    """Model outputs for `rows`, in order."""
    if task.scores_suffixes:
      return self.scorer.score(scoring.Candidates(prompt=r.record["prompt"],
                                                  suffixes=r.record["suffixes"],
                                                  **r.example_images()) for r in rows)
    examples = (inference.Example(prompt=r.record["prompt"], **r.example_images()) for r in rows)
    if self.beams is None:
      return self.predictor.predict(examples, max_new_tokens=max_new_tokens)
    return self.predictor.predict(examples, max_new_tokens=max_new_tokens, sampler=self.beams)

  def run(self, dataset: str, task: str, predictions: str, metrics_path: str | None = None, *,
          max_new_tokens: int | None = None, image_dir: str | None = None,
          progress: bool = True) -> dict:
    """Evaluates (or finishes evaluating) `dataset`; returns the metrics, also written to
    `metrics_path` if given."""
    task = tasks.get(task, self.vae_params)
    task.check_resources()
    if max_new_tokens is None:
      max_new_tokens = task.max_new_tokens
    if max_new_tokens < 1:
      raise errors.InputError(f"--max_new_tokens must be at least 1, got {max_new_tokens}.")
    rows, skips = dataset_lib.read_dataset(dataset, task, image_dir)
    examples = len(rows) + len(skips)  # Non-empty dataset lines.
    settings = {"task": task.name, "dataset": os.path.abspath(dataset), "model": self.model_identity,
                "max_new_tokens": None if task.scores_suffixes else max_new_tokens,
                "decoding": None if task.scores_suffixes else (
                    "greedy" if self.beams is None else
                    {"sampler": self.beams.method, **dataclasses.asdict(self.beams)})}
    writer = multihost.is_writer()  # On a multi-host job every host decodes, the first writes.
    out = files.Resumable(predictions, settings, write=writer)
    try:
      done = {}
      for p in out.done:
        if not isinstance(p, dict) or not isinstance(p.get("line"), int):
          raise errors.InputError(f"{predictions} holds a line that is not a prediction; pass a "
                                  "new --predictions file.")
        done[p["line"]] = p
      _check_same_examples(done, rows, predictions, dataset)
      todo = [r for r in rows if r.line not in done]
      if done:
        logging.info("Resuming: %d of %d examples are already in %s.", len(done), len(rows),
                     predictions)
      if todo:
        self._predict(task, todo, max_new_tokens, out, done, skips, dataset, progress,
                      total=len(rows))
    finally:
      out.close()
    skips.sort(key=lambda s: s.line)
    for s in skips:
      logging.warning("skipped %s", s.message)
    lines = [done[r.line] for r in rows if r.line in done]
    summary = {
        "task": task.name, "dataset": dataset, "examples": examples, "evaluated": len(lines),
        "skipped": {"count": len(skips), "reasons": dict(collections.Counter(s.reason for s in skips)),
                    "lines": [{"line": s.line, "error": s.message} for s in skips[:MAX_SKIPPED_LINES]]},
    }
    result = json_safe({**summary, **task.metrics(lines)})
    if metrics_path and writer:
      files.write_atomically(metrics_path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result

  def _predict(self, task, todo, max_new_tokens, out, done, skips, dataset, progress, total):
    """Runs `todo` through the model; appends each prediction to `out` and `done`, each failure
    to `skips`."""
    bar = tqdm.tqdm(total=total, initial=total - len(todo), unit="ex", desc=task.name,
                    disable=not progress)
    with bar:
      for row, result in zip(todo, self._results(task, todo, max_new_tokens)):
        bar.update(1)
        try:
          if "error" in result:
            raise base.Invalid(errors.reason(result["error"]), result["error"])
          fields = task.example_fields(row, result)
        except base.Invalid as e:
          skips.append(dataset_lib.Skip(row.line, e.reason, f"{dataset}:{row.line}: {e}"))
          bar.set_postfix(skipped=len(skips))
          continue
        sizes = {k: result[k] for k in ("image_size", "image_sizes") if k in result}
        prediction = {"line": row.line, "task": task.name, **image_fields.given(row.record),
                      "prompt": row.record["prompt"], **sizes, **fields,
                      "reference": row.reference}
        out.append(prediction)  # Only the writing process writes.
        done[row.line] = prediction
