"""PaliGemma's tasks, one module each, registered by name; generate and evaluate take them from here.

  answer.py   vqa, exact_match, anls, relaxed: a short answer against reference answers
  caption.py  caption: CIDEr
  detect.py   detect: boxes, mAP
  segment.py  segment: boxes and masks, mIoU / cIoU
  score.py    score: log-likelihood of given suffixes, multiple-choice accuracy, perplexity

`detection_format.py` and `segmentation_format.py` are the answer formats (loc/seg tokens <-> pixel boxes and
masks) that the tasks read. Adding a task means adding one module with a `TASKS` tuple of
`base.Task` subclasses and naming it in `_MODULES`.
"""

import importlib

from paligemma_jax import errors

_MODULES = ("answer", "caption", "detect", "segment", "score")


def _registry() -> dict:
  found = {}
  for module in _MODULES:
    for task in importlib.import_module(f"paligemma_jax.tasks.{module}").TASKS:
      found[task.name] = task
  return found


REGISTRY = _registry()
NAMES = tuple(REGISTRY)
# Tasks whose answers become objects (boxes, masks) that `generate --task` adds and draws.
OBJECT_TASKS = ("detect", "segment")


def get(name: str, vae_params=None):
  """The task named `name`, ready to use (segment needs the mask decoder weights)."""
  if name not in REGISTRY:
    raise errors.InputError(f"Unknown task {name!r}; choose one of {', '.join(NAMES)}.")
  return REGISTRY[name](vae_params)
