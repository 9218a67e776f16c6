"""Files in and out, so that no input line stops a run and no output is left half-written.

  read_jsonl      every line of a JSONL file, each parsed or with the reason it is unusable
                  (invalid UTF-8, invalid JSON, a lone surrogate), named `path:line`;
  atomic_writer   a file that appears at its path only once complete (written aside, renamed);
  Resumable       an append-only JSONL that a rerun of the same command continues after its last
                  complete line, refusing to mix runs of different settings (finished or not);
  check_readable, check_writable   a --flag's input or output file, checked before any work.

Temporary names carry this host and process (`.NAME.tmp-HOST.PID.RANDOM`), so a later run can tell
what a killed run left (its process is gone) from a live one's, and remove it
(`remove_stale_temps`). New files get the usual permissions (0666 less the umask).
"""

import codecs
import contextlib
import json
import os
import re
import shutil
import socket
import uuid

from absl import logging

from paligemma_jax import errors


_HOST = socket.gethostname()
_TEMP = re.compile(r"\.tmp-(?P<host>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}")
_writing = set()  # The temporaries this process is writing now.


def _left_by_killed_writer(path: str, host: str, pid: int) -> bool:
  """Whether the process that wrote temporary `path` (on `host`, as `pid`) is gone."""
  if host != _HOST:
    return False  # Another machine's processes cannot be seen from here.
  if pid == os.getpid():
    return path not in _writing  # An earlier process with this pid (a rerun container's, say).
  try:
    os.kill(pid, 0)
  except (ProcessLookupError, OverflowError):
    return True
  except PermissionError:
    pass  # Another user's live process.
  return False


def remove_stale_temps(path: str) -> list[str]:
  """Removes the temporaries of `path` that killed writers on this host left; returns them.
  Those of live processes and of other hosts (a shared filesystem) are kept."""
  directory, name = os.path.split(os.path.abspath(path))
  return remove_stale_temps_in(directory, name)


def remove_stale_temps_in(directory: str, name: str | None = None) -> list[str]:
  """`remove_stale_temps` for every file of `directory` (or only `name`'s)."""
  removed = []
  for entry in os.listdir(directory) if os.path.isdir(directory) else []:
    target, _, suffix = entry[1:].rpartition(".tmp-")
    match = (_TEMP.fullmatch(".tmp-" + suffix) if entry.startswith(".") and target
             and name in (None, target) else None)
    full = os.path.join(directory, entry)
    if match and _left_by_killed_writer(full, match["host"], int(match["pid"])):
      logging.info("Removing %s, left by a killed run.", full)
      if os.path.isdir(full) and not os.path.islink(full):
        shutil.rmtree(full, ignore_errors=True)
      else:
        with contextlib.suppress(FileNotFoundError):
          os.remove(full)
      removed.append(full)
  return removed


@contextlib.contextmanager
def writing_aside(path: str, clean: bool = True):
  """A temporary sibling name for writing `path` aside (`.NAME.tmp-HOST.PID.RANDOM`), owned by
  this process while the block runs. What killed writers of `path` left is removed first, unless
  `clean` is False (many files into one directory: sweep it once, `remove_stale_temps_in`)."""
  if clean:
    remove_stale_temps(path)
  directory, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(directory, f".{name}.tmp-{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
  _writing.add(tmp)
  try:
    yield tmp
  finally:
    _writing.discard(tmp)


@contextlib.contextmanager
def directory_aside(path: str, *, writer: bool = True, shared: bool = False):
  """A new directory to fill in the block, renamed to `path` when the block ends: `path` appears
  only complete, and an error (or a kill: the next run sweeps it) leaves nothing there.

  writer: this process creates, renames and cleans up; the others of a multi-host job only write
  into it (the caller syncs them after the creation and before the rename, at the block's end).
  shared: every process of a job must agree on the name without talking: `.NAME.tmp-shared`,
  replaced if a killed job left one."""
  path = os.path.abspath(path)
  parent, name = os.path.split(path)
  aside = (contextlib.nullcontext(os.path.join(parent, f".{name}.tmp-shared")) if shared
           else writing_aside(path))
  with aside as tmp:
    try:
      if writer:
        os.makedirs(parent, exist_ok=True)
        if shared:
          shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp)
      yield tmp
      if writer:
        os.rename(tmp, path)
    except BaseException:
      if writer:
        shutil.rmtree(tmp, ignore_errors=True)
      raise


def open_for_writing(path: str, mode: str = "w"):
  """A file created with the umask's permissions; in text modes UTF-8, where lone surrogates
  (from undecodable input) are written as JSON-compatible `\\udcff` escapes, not an error."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC),
               0o666)
  if "b" in mode:
    return os.fdopen(fd, mode)
  return os.fdopen(fd, mode, encoding="utf-8", errors="backslashreplace")


@contextlib.contextmanager
def atomic_writer(path: str, binary: bool = False, clean: bool = True):
  """A file that appears at `path` only once complete; on failure nothing is left behind, and
  the temporary of an earlier killed run is removed (see `writing_aside`)."""
  with writing_aside(path, clean) as tmp:
    try:
      with open_for_writing(tmp, "wb" if binary else "w") as f:
        yield f
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)


def write_atomically(path: str, text: str):
  with atomic_writer(path) as f:
    f.write(text)


def check_readable(flag: str, path: str | None):
  """A --flag naming an input file: it must be a readable file."""
  if path is None:
    return
  if not os.path.isfile(path):
    raise errors.InputError(f"--{flag}={path}: no such file.")
  if not os.access(path, os.R_OK):
    raise errors.InputError(f"--{flag}={path}: not readable.")


def check_writable(flag: str, path: str | None):
  """A --flag naming an output file: its directory must exist; it must not be a directory."""
  if path is None:
    return
  directory = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise errors.InputError(f"--{flag}={path} is a directory; give a file name.")
  if not os.path.isdir(directory):
    raise errors.InputError(f"--{flag}={path}: directory {directory} does not exist.")
  if not os.access(directory, os.W_OK):
    raise errors.InputError(f"--{flag}={path}: directory {directory} is not writable.")


def _has_lone_surrogate(value) -> bool:
  if isinstance(value, str):
    try:
      value.encode("utf-8")
    except UnicodeEncodeError:
      return True
    return False
  if isinstance(value, dict):
    return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
  if isinstance(value, list):
    return any(map(_has_lone_surrogate, value))
  return False


def parse_json_line(raw: bytes):
  """One JSONL line -> its value; raises InputError with the reason (UTF-8, JSON, Unicode)."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise errors.InputError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})",
                            reason="invalid UTF-8") from None
  try:
    value = json.loads(text)
    bad_unicode = _has_lone_surrogate(value)
  except json.JSONDecodeError as e:
    raise errors.InputError(f"invalid JSON: {e}", reason="invalid JSON") from None
  except RecursionError:
    raise errors.InputError("invalid JSON: nested too deeply", reason="invalid JSON") from None
  if bad_unicode:
    raise errors.InputError("a string is not valid Unicode (a lone surrogate such as \\ud83d)",
                            reason="invalid Unicode")
  return value


class Line:
  """One non-empty line of a JSONL file: `value` parsed, or `error` saying why it is unusable."""
  __slots__ = ("number", "value", "error")

  def __init__(self, number: int, value=None, error: str | None = None):
    self.number, self.value, self.error = number, value, error


def read_jsonl(path: str):
  """Yields a `Line` for each non-empty line of `path` (1-based numbers); never raises for a bad
  line. A missing or unreadable file raises OSError naming it. A UTF-8 byte-order mark at the
  start of the file (what Windows editors write) is not part of the first line."""
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      if number == 1:
        raw = raw.removeprefix(codecs.BOM_UTF8)
      if not raw.strip():
        continue
      try:
        yield Line(number, parse_json_line(raw))
      except errors.InputError as e:
        yield Line(number, error=errors.message(e))


def _difference(before: dict, now: dict) -> str:
  keys = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
  return "; ".join(f"{k}: {before.get(k)!r} then, {now.get(k)!r} now" for k in keys)


class Resumable:
  """An append-only JSONL file of results that a rerun continues.

  `settings` (what produced the results: checkpoint identity, decoding settings, ...) are kept in
  PATH.run.json. Opening a file whose lines came from other settings raises InputError naming
  the difference. A line cut short by a kill is dropped. `done` holds the complete lines.
  `finish(FINAL)` renames the file and keeps its record beside it (FINAL.run.json), so that
  `Resumable(FINAL, settings, write=False)` refuses a finished file of other settings too.
  """

  def __init__(self, path: str, settings: dict, *, write: bool = True):
    settings = json.loads(json.dumps(settings))  # As stored: tuples become lists.
    self.path, self.settings_path, self.settings = path, path + ".run.json", settings
    self.done = self._read(cut=write)
    if self.done:
      stored = self._stored_settings()
      if stored != settings:
        why = ("it has no record of its settings (" + os.path.basename(self.settings_path) + ")"
               if stored is None else "they differ: " + _difference(stored, settings))
        raise errors.InputError(f"{path} holds {len(self.done)} results of another run and {why}; "
                                f"pass a new output file to start over, or delete it.")
    self._file = None
    if write:
      self._record(self.settings_path)
      self._file = open_for_writing(path, "a")

  def _record(self, path: str):
    write_atomically(path, json.dumps(self.settings, indent=2, sort_keys=True) + "\n")

  def _stored_settings(self):
    try:
      with open(self.settings_path, encoding="utf-8") as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (ValueError, UnicodeDecodeError):
      raise errors.InputError(f"{self.settings_path} is not valid JSON; delete it and {self.path} "
                              "to start over.") from None

  def _read(self, cut: bool) -> list:
    """The complete lines; a truncated last line (a killed run) is cut off the file if `cut`."""
    if not os.path.exists(self.path):
      return []
    with open(self.path, "rb") as f:
      raw = f.read()
    end = raw.rfind(b"\n") + 1
    done = []
    for number, line in enumerate(raw[:end].split(b"\n")[:-1], 1):
      try:
        done.append(json.loads(line))
      except ValueError:
        raise errors.InputError(f"{self.path}:{number}: not a result line of this tool; pass a new "
                                "output file to start over.") from None
    if end < len(raw) and cut:
      os.truncate(self.path, end)
    return done

  def append(self, record: dict):
    """Adds one line (flushed: a kill loses nothing written); a no-op where write=False."""
    if self._file is None:
      return
    self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
    self._file.flush()

  def close(self):
    if self._file is not None:
      self._file.close()
      self._file = None

  def finish(self, final_path: str | None = None):
    """Closes the file; with `final_path`, renames it there, its settings record to
    FINAL.run.json. The record is written first: a kill at any point leaves either this file
    with its record (the rerun continues it) or the final one with its own."""
    self.close()
    if final_path is not None:
      self._record(final_path + ".run.json")
      os.replace(self.path, final_path)
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.settings_path)
