"""Writing output files so that a reader never sees half of one: write aside, then rename."""

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_writer(path: str):
  """A text file that appears at `path` only once complete; on failure nothing is left behind."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      yield f
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_atomically(path: str, text: str):
  with atomic_writer(path) as f:
    f.write(text)
