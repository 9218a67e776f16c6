"""What a task is: the pieces generate and evaluate need, in one object per task.

A task knows
  max_new_tokens     its default answer length;
  check(record)      the reference fields a dataset line must have (normalised in place), or
                     `Invalid` with a short reason that the evaluation summary counts;
  parse, fields      how a generated answer becomes objects (boxes, masks) and those output
                     fields, for `generate --task` and evaluate alike; `draw` shows them;
  example_fields     the per-example result evaluate writes (a score, an IoU, ...);
  metrics(lines)     the corpus metric over prediction lines (so a resumed run counts all lines).
"""

import math

import numpy as np

from paligemma_jax import errors


class Invalid(errors.InputError):
  """An example that cannot be evaluated; `reason` is the short form counted in the summary."""

  def __init__(self, reason: str, detail: str | None = None):
    super().__init__(detail or reason, reason=reason)


class Task:
  """The defaults: a generated answer with no references and no extra fields."""
  name = ""
  max_new_tokens = 32
  scores_suffixes = False  # True: the model scores given suffixes instead of generating.
  needs_vae = False  # True: answers hold masks, decoded with the VQ-VAE (--vae_npz).

  def __init__(self, vae_params=None):
    self.vae_params = vae_params

  def check_resources(self):
    """Raises InputError if answers cannot be read with what this task was given."""
    if self.needs_vae and self.vae_params is None:
      raise errors.InputError(f"--task={self.name} needs the mask decoder weights: pass --vae_npz "
                              "(big_vision's vae-oid.npz).")

  def check(self, record: dict, resolve) -> None:
    """Validates the line's reference fields (`resolve(path)`: a path field as the dataset means
    it); normalises them in place; raises Invalid."""

  def parse(self, text: str, width: int, height: int):
    """The objects an answer describes, in pixels of the (width, height) image; None: no objects."""
    return None

  def fields(self, objects) -> dict:
    """Output-line fields of `parse`'s objects."""
    return {}

  def draw(self, image, objects):
    """`image` (Pillow) with the objects drawn on it."""
    raise errors.InputError(f"--task={self.name} has nothing to draw.")

  def answer_fields(self, text: str, width: int, height: int) -> dict:
    return self.fields(self.parse(text, width, height))

  def example_fields(self, row, result: dict) -> dict:
    """evaluate's per-example fields for one model result (generated or scored) of `row` (a
    dataset.Row: the line's record, and `row.path(key)` for a path field resolved)."""
    return {"text": result["text"], "stop_reason": result["stop_reason"],
            **self.answer_fields(result["text"], *result["image_size"])}

  def metrics(self, lines: list) -> dict:
    return {}


def strings(record: dict, key: str):
  """Checks `key` is a string or a non-empty list of strings; a lone string becomes [string]."""
  if key not in record:
    raise Invalid(f"missing '{key}'")
  value = [record[key]] if isinstance(record[key], str) else record[key]
  if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
    raise Invalid(f"invalid '{key}'", f"'{key}' must be a string or a non-empty list of strings")
  record[key] = value


def require(record: dict, *keys):
  for key in keys:
    if key not in record:
      raise Invalid(f"missing '{key}'")


def is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def mean(values) -> float:
  values = list(values)
  return float(np.mean(values)) if values else float("nan")


def rounded_boxes(boxes) -> list:
  """[N, 4] pixel boxes as JSON lists, to 1/100 pixel."""
  return np.round(np.asarray(boxes, np.float64), 2).reshape(-1, 4).tolist()
