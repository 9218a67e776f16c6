"""What a fine-tuning run keeps in its workdir, so that running the same command again resumes it.

  WORKDIR/config.json    the training config of the first run; a resumed run with another one
                         gets a warning (it will not match an uninterrupted run)
  WORKDIR/metrics.jsonl  one JSON line per step, plus evaluation lines; on resume, trimmed to the
                         restored step so the file reads as one run
  WORKDIR/checkpoints/   Orbax checkpoints of the training state and the data position

Whole files are written aside and renamed (`files.write_atomically`, which also removes what a
killed earlier write left), and Orbax removes the temporary directory of a killed save when the
next run opens the checkpoints: after `kill -9` at any moment, a rerun leaves no debris.
"""

import json
import os

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp

from paligemma_jax import files

CONFIG, METRICS, CHECKPOINTS = "config.json", "metrics.jsonl", "checkpoints"


def record_config(workdir: str, config: ml_collections.ConfigDict):
  """Keeps the first run's config in the workdir; a resumed run with another one is flagged."""
  path = os.path.join(workdir, CONFIG)
  text = config.to_json(indent=2, sort_keys=True)
  if not os.path.exists(path):
    files.write_atomically(path, text)
    return
  with open(path, encoding="utf-8") as f:
    if f.read() != text:
      logging.warning("The config differs from the one %s was started with (%s); the resumed "
                      "run will not match an uninterrupted one.", workdir, path)


def _step_of(line: str):
  try:
    return json.loads(line)["step"]
  except (json.JSONDecodeError, KeyError, TypeError):
    return None  # A line cut short by a kill.


class MetricWriter:
  """Appends one JSON line per record to `path`, first dropping the lines past `start_step`
  (left by a run that died after its last checkpoint), so a resumed file reads as one run."""

  def __init__(self, path: str, start_step: int):
    kept = []
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        kept = [line.rstrip("\n") + "\n" for line in f
                if (step := _step_of(line)) is not None and step <= start_step]
    files.write_atomically(path, "".join(kept))
    self._file = open(path, "a", encoding="utf-8")

  def write(self, step: int, **values):
    self._file.write(json.dumps({"step": step, **values}) + "\n")
    self._file.flush()

  def close(self):
    self._file.close()


def read_metrics(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """The workdir's training-state checkpoints; opening it removes a killed save's temporaries."""
  return ocp.CheckpointManager(
      os.path.join(workdir, CHECKPOINTS),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True))


def save_state(manager: ocp.CheckpointManager, state: dict, data_record: dict):
  """Saves `state` at its step, with `data_record` (the data position and what it depends on)."""
  manager.save(int(state["step"]), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_record)))


def restore_state(manager: ocp.CheckpointManager, state: dict) -> tuple[dict, dict]:
  """(state, data record) from the latest checkpoint; `state` gives the structure and dtypes."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
  return restored.state, restored.data
