"""Answering many examples into result lines: the library part of `python -m paligemma_jax.generate`.

  input lines (files.read_jsonl) -> Example or the line's error -> Predictor.predict (in order)
  -> task fields (tasks.get(...).fields: boxes, masks) and drawings -> one result line per input

Results are appended to OUTPUT.partial as they finish, with the run's settings beside it; a rerun
of the same command continues after the last complete line (a line cut short by a kill is
dropped, a run with other settings is refused) and the file is renamed to OUTPUT once every input
has its line, its settings kept in OUTPUT.run.json. So a killed 100,000-image job loses at most
one batch, and OUTPUT is complete and in input order whenever it exists. A rerun on a finished
OUTPUT gives its results again without loading the model, or with other settings is refused.
"""

import dataclasses
import os

from absl import logging

from paligemma_jax import errors
from paligemma_jax import files
from paligemma_jax import multihost
from paligemma_jax.decoding import inference
from paligemma_jax.preprocess import image_fields
from paligemma_jax.preprocess import processor
from paligemma_jax.tasks import base


# What a result line holds: dropped from an input line (an earlier run's output fed back in to
# retry its errors), so that a stale `error` or `text` cannot pass for this run's.
RESULT_FIELDS = ("line", "error", "text", "tokens", "logprobs", "stop_reason", "image_size",
                 "image_sizes", "score", "boxes", "labels", "skipped", "masks", "drawing")


def read_examples(path: str) -> list:
  """One item per non-empty line of `path`: an inference.Example, or for an unusable line a
  result dict {"line": n, "error": "path:n: bad input line: ..."}. A line names one image
  (`image`) or several (`images`, see image_fields). Other fields are carried through to the
  result line, except RESULT_FIELDS."""
  items = []
  for line in files.read_jsonl(path):
    try:
      if line.error is not None:
        raise errors.InputError(line.error)
      record = line.value
      if not isinstance(record, dict):
        raise errors.InputError("expected a JSON object")
      image_fields.paths(record)
      if "prompt" not in record:
        raise errors.InputError("missing field 'prompt'")
      if not isinstance(record["prompt"], str):
        raise errors.InputError("'prompt' must be a string")
    except errors.InputError as e:
      items.append({"line": line.number, "error": f"{path}:{line.number}: bad input line: {e}"})
      continue
    record = {k: v for k, v in line.value.items() if k not in RESULT_FIELDS}
    items.append(inference.Example(record.pop("image", None), record.pop("prompt"), extra=record,
                                   images=record.pop("images", None)))
  return items


@dataclasses.dataclass
class Outputs:
  """What to add to each answer: a task's objects as fields, and drawings of them."""
  task: base.Task | None = None
  draw_dir: str | None = None

  def add(self, index: int, result: dict) -> dict:
    """`result` with the task's fields (and `drawing`) added; errors pass unchanged."""
    if self.task is None or "error" in result:
      return result
    objects = self.task.parse(result["text"], *result["image_size"])  # Of the first image.
    fields = self.task.fields(objects)
    if self.draw_dir and multihost.is_writer():
      first = image_fields.paths(result)[0]
      stem = os.path.splitext(os.path.basename(first))[0]
      fields["drawing"] = os.path.join(self.draw_dir, f"{index:05d}_{stem}.png")
      drawn = self.task.draw(processor.load_image(first), objects)
      with files.atomic_writer(fields["drawing"], binary=True, clean=False) as f:  # Swept once.
        drawn.save(f, format="PNG")
    return {**result, **fields}


def _same_example(result: dict, item) -> bool:
  if isinstance(item, dict):
    return result.get("line") == item["line"] and "error" in result
  return image_fields.given(result) == item.given() and result.get("prompt") == item.prompt


def _check_same_examples(done: list, items: list, path: str, finished: bool):
  """Every result in `path` must be of its input line; a finished file holds one per input."""
  if (len(done) != len(items) if finished else len(done) > len(items)) or not all(
      map(_same_example, done, items)):
    raise errors.InputError(f"{path} does not match the input file (it changed?); delete it to "
                            "start over.")


def answer(predictor, items: list, *, output: str | None, settings: dict,
           outputs: Outputs = Outputs(), progress: bool = False, **predict_args):
  """Yields (index, result line) for every item, in order, and writes them to `output`.

  predictor: an inference.Predictor, or a function that makes one (loads the model), called only
  when some example has to run. Results already in OUTPUT.partial from an interrupted run of the
  same settings are yielded again without running the model; so are those of a finished OUTPUT
  (nothing is rewritten), while a finished OUTPUT of other settings is refused as a partial one
  is (files.Resumable), not replaced. `predict_args` go to `Predictor.predict` (max_new_tokens,
  sampler: a sampling.Sampler or a beam_search.BeamSearch, seed).
  """
  partial = None
  if output is not None:  # Every host reads what is done (they must run the same batches).
    finished = files.Resumable(output, settings, write=False).done  # Of a finished run, if any.
    if finished:
      _check_same_examples(finished, items, output, finished=True)
      logging.info("%s already holds the %d results of these settings.", output, len(finished))
      yield from enumerate(finished)
      return
    partial = files.Resumable(output + ".partial", settings, write=multihost.is_writer())
  try:
    done = partial.done if partial else []
    _check_same_examples(done, items, f"{output}.partial", finished=False)
    if done:
      logging.info("Resuming: %d of %d results are already in %s.partial.", len(done), len(items),
                   output)
    yield from enumerate(done)
    todo = items[len(done):]
    examples = [x for x in todo if not isinstance(x, dict)]
    first_index = sum(not isinstance(x, dict) for x in items[:len(done)])  # Same keys as one run.
    if examples and callable(predictor):  # A function that loads the model.
      predictor = predictor()
    predictions = iter(predictor.predict(examples, first_index=first_index, progress=progress,
                                         total=len(examples), **predict_args) if examples else ())
    for index, item in enumerate(todo, len(done)):
      result = item if isinstance(item, dict) else outputs.add(index, next(predictions))
      if partial:
        partial.append(result)
      yield index, result
    if partial:
      partial.finish(output if multihost.is_writer() else None)
      partial = None
  finally:
    if partial:
      partial.close()
