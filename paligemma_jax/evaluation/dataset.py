"""Evaluation datasets: JSONL lines {"image", "prompt", ...references} -> rows, or why not.
A line may name several images instead, in prompt order: {"images": [left, right], "prompt", ...}
(NLVR2 pairs, video frames; see preprocess/image_fields.py).

Every non-empty line becomes a `Row` or a `Skip` with its line number and a short reason (counted
in the evaluation summary): not UTF-8, not JSON, not an object, a missing or mistyped field, or a
reference the task rejects (`Task.check`). Relative image and reference paths are resolved against
the image directory (default: the dataset file's directory).
"""

import dataclasses
import os

from paligemma_jax import errors
from paligemma_jax import files
from paligemma_jax.preprocess import image_fields
from paligemma_jax.tasks import base


@dataclasses.dataclass
class Row:
  line: int  # 1-based line number in the dataset file.
  record: dict  # The parsed line; reference lists normalised (a lone string becomes [string]).
  root: str  # Where relative paths are resolved.

  @property
  def images(self) -> list[str]:
    """Every image of the example, in prompt order, resolved."""
    return [self.resolve(p) for p in image_fields.paths(self.record)]

  def example_images(self) -> dict:
    """The images as an Example (or Candidates) takes them: image= or images=, resolved."""
    images = self.images
    return {"image": images[0]} if "image" in self.record else {"images": images}

  def path(self, key: str) -> str:
    """The path field `key`, resolved against the image directory."""
    return self.resolve(self.record[key])

  def resolve(self, path: str) -> str:
    return os.path.join(self.root, os.path.expanduser(path))

  @property
  def reference(self) -> dict:
    return {k: v for k, v in self.record.items() if k not in ("image", "images", "prompt")}


@dataclasses.dataclass
class Skip:
  line: int
  reason: str  # Short, counted in the summary: "invalid JSON", "missing 'answers'", ...
  message: str  # "path:line: detail", logged and listed.


def check_record(record, task: base.Task, resolve) -> dict:
  """One parsed line checked for `task`; returns it (lists normalised) or raises base.Invalid."""
  if not isinstance(record, dict):
    raise base.Invalid("not a JSON object")
  try:
    image_fields.paths(record)
  except errors.InputError as e:
    raise base.Invalid(e.reason, str(e)) from None
  if "prompt" not in record:
    raise base.Invalid("missing 'prompt'")
  if not isinstance(record["prompt"], str):
    raise base.Invalid("invalid 'prompt'", "'prompt' must be a string")
  task.check(record, resolve)
  return record


def read_dataset(path: str, task: base.Task, image_dir: str | None = None):
  """(rows, skips): the usable lines of `path` and, for the others, why not."""
  root = os.path.dirname(os.path.abspath(path)) if image_dir is None else image_dir
  resolve = lambda p: os.path.join(root, os.path.expanduser(p))
  rows, skips = [], []
  for line in files.read_jsonl(path):
    try:
      if line.error:
        raise base.Invalid(errors.reason(line.error), line.error)
      rows.append(Row(line.number, check_record(line.value, task, resolve), root))
    except base.Invalid as e:
      skips.append(Skip(line.number, e.reason, f"{path}:{line.number}: {e}"))
  return rows, skips
