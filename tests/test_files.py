"""The shared file mechanisms: one JSONL line reader, atomic and resumable writers, stale temps."""

import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from paligemma_jax import errors
from paligemma_jax import files


def test_read_jsonl_gives_every_bad_line_its_own_error_and_carries_on(tmp_path):
  path = tmp_path / "in.jsonl"
  path.write_bytes(b'{"a": 1}\n'
                   b'{"a": "caf\xe9"}\n'  # Latin-1, not UTF-8: stopped whole runs before.
                   b'\n'
                   b'{"a": "\\ud83d"}\n'  # A lone surrogate: SentencePiece could not take it.
                   b'{"a": \n'
                   b'{"b": [1, {"c": "\\udcff"}]}\n'
                   + b"[" * 100000 + b"\n"  # Deeper than Python's recursion limit.
                   b'[2]')
  lines = list(files.read_jsonl(str(path)))
  assert [line.number for line in lines] == [1, 2, 4, 5, 6, 7, 8]
  assert lines[0].value == {"a": 1} and lines[0].error is None
  assert lines[1].error == "not valid UTF-8 (byte 0xe9 at column 11)"
  assert "lone surrogate" in lines[2].error and "lone surrogate" in lines[4].error
  assert lines[3].error.startswith("invalid JSON")
  assert lines[5].error == "invalid JSON: nested too deeply"
  assert lines[6].value == [2]


def test_a_byte_order_mark_starts_the_file_not_its_first_line(tmp_path):
  """Windows editors write a UTF-8 byte-order mark; the first line is still JSON. Elsewhere it is
  a character of the line, as in any text (here making the line invalid JSON)."""
  path = tmp_path / "in.jsonl"
  path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\xef\xbb\xbf{"b": 2}\n')
  first, second = files.read_jsonl(str(path))
  assert (first.number, first.value, first.error) == (1, {"a": 1}, None)
  assert second.number == 2 and second.error.startswith("invalid JSON")
  path.write_bytes(b'\xef\xbb\xbf\n{"a": 1}\n')  # A mark alone: an empty first line.
  assert [(line.number, line.value) for line in files.read_jsonl(str(path))] == [(2, {"a": 1})]


def test_atomic_writer_respects_the_umask_and_leaves_nothing_on_failure(tmp_path):
  old = os.umask(0o022)
  try:
    files.write_atomically(str(tmp_path / "a.json"), "{}\n")
  finally:
    os.umask(old)
  # mkstemp made every output 0600 whatever the umask.
  assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o644
  with pytest.raises(RuntimeError):
    with files.atomic_writer(str(tmp_path / "b.json")) as f:
      f.write("half")
      raise RuntimeError
  assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_surrogates_are_written_as_json_escapes(tmp_path):
  """An undecodable command-line byte (surrogateescape) must not fail the write of its error."""
  path = str(tmp_path / "out.jsonl")
  with files.atomic_writer(path) as f:
    f.write(json.dumps({"prompt": "x\udcff"}, ensure_ascii=False) + "\n")
  assert json.loads(open(path, encoding="utf-8").read()) == {"prompt": "x\udcff"}


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
  target = str(tmp_path / "out.jsonl")
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  host = socket.gethostname()
  stale = tmp_path / f".out.jsonl.tmp-{host}.{dead}.abcd1234"
  stale.mkdir()
  (stale / "data").write_text("x" * 1000)
  mine_earlier = tmp_path / f".out.jsonl.tmp-{host}.{os.getpid()}.abcd1234"  # A reused pid's.
  mine_earlier.write_text("old")
  live = tmp_path / f".out.jsonl.tmp-{host}.{os.getppid()}.abcd1234"  # A running process's.
  live.write_text("busy")
  other_host = tmp_path / f".out.jsonl.tmp-otherhost.{dead}.abcd1234"  # Can't tell: keep.
  other_host.write_text("?")
  unrelated = tmp_path / f".other.jsonl.tmp-{host}.{dead}.abcd1234"
  unrelated.write_text("")
  with files.writing_aside(target) as tmp:
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other_host.name, unrelated.name])
    open(tmp, "w").close()
    assert files.remove_stale_temps(target) == []  # Ours, being written now.
  assert files.remove_stale_temps(target) == [tmp]  # This process no longer writes it.


def test_a_directory_aside_appears_whole_or_not_at_all(tmp_path):
  """Checkpoint saving and the export share it: renamed when the block ends, removed on an error;
  a shared name (multi-host jobs) left by a killed job is replaced."""
  target = tmp_path / "deep" / "out"
  with files.directory_aside(str(target)) as tmp:
    assert os.path.isdir(tmp) and not target.exists()
    (tmp_path / "deep" / os.path.basename(tmp) / "weights").write_text("w")
  assert os.listdir(target) == ["weights"] and os.listdir(tmp_path / "deep") == ["out"]
  with pytest.raises(RuntimeError, match="disk full"):
    with files.directory_aside(str(tmp_path / "failed")) as tmp:
      raise RuntimeError("disk full")
  assert sorted(os.listdir(tmp_path)) == ["deep"]
  left = tmp_path / ".shared.tmp-shared"
  left.mkdir()
  (left / "stale").write_text("")
  with files.directory_aside(str(tmp_path / "shared"), shared=True) as tmp:
    assert tmp == str(left) and os.listdir(tmp) == []
  assert os.listdir(tmp_path / "shared") == [] and not left.exists()
  with files.directory_aside(str(tmp_path / "not_mine"), writer=False) as tmp:
    assert not os.path.exists(tmp)  # Another process of the job creates and renames it.
  assert not (tmp_path / "not_mine").exists()


def test_resumable_continues_drops_a_cut_line_and_refuses_other_settings(tmp_path):
  path = str(tmp_path / "p.jsonl")
  out = files.Resumable(path, {"model": "a", "n": 3})
  out.append({"line": 1})
  out.append({"line": 2})
  out.close()
  with open(path, "a") as f:
    f.write('{"line": 3, "cu')  # A kill mid-line.
  again = files.Resumable(path, {"model": "a", "n": 3})
  assert again.done == [{"line": 1}, {"line": 2}]
  again.append({"line": 3})
  again.finish()
  assert [json.loads(x) for x in open(path)] == [{"line": 1}, {"line": 2}, {"line": 3}]

  with pytest.raises(errors.InputError, match="n: 3 then, 4 now"):
    files.Resumable(path, {"model": "a", "n": 4})
  os.remove(path + ".run.json")
  with pytest.raises(errors.InputError, match="no record of its settings"):
    files.Resumable(path, {"model": "a", "n": 3})

  final = str(tmp_path / "final.jsonl")
  done = files.Resumable(str(tmp_path / "final.jsonl.partial"), {})
  done.append({"x": 1})
  done.finish(final)
  assert os.listdir(tmp_path).count("final.jsonl") == 1
  assert [n for n in os.listdir(tmp_path) if n.startswith("final.jsonl.")] == [
      "final.jsonl.run.json"]


def test_a_finished_file_keeps_its_settings_and_refuses_others(tmp_path):
  """A rerun on a finished file must be refused as one on a partial file is, not replace it."""
  final = str(tmp_path / "out.jsonl")
  out = files.Resumable(final + ".partial", {"sampler": "greedy"})
  out.append({"x": 1})
  out.finish(final)
  assert files.Resumable(final, {"sampler": "greedy"}, write=False).done == [{"x": 1}]
  with pytest.raises(errors.InputError, match="sampler: 'greedy' then, 'top_k' now"):
    files.Resumable(final, {"sampler": "top_k"}, write=False)
  assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "out.jsonl.run.json"]  # Nothing written.


def test_resumable_refuses_a_file_it_did_not_write(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text('{"line": 1}\nnot json\n')
  with pytest.raises(errors.InputError, match="p.jsonl:2: not a result line"):
    files.Resumable(str(path), {})


def test_resumable_settings_compare_as_stored(tmp_path):
  """A --config override holds tuples (text.layer_types); JSON stores lists: still the same run."""
  path = str(tmp_path / "p.jsonl")
  out = files.Resumable(path, {"config": {"layer_types": ("full", "sliding")}})
  out.append({"x": 1})
  out.close()
  again = files.Resumable(path, {"config": {"layer_types": ("full", "sliding")}})
  assert again.done == [{"x": 1}]
  again.close()


def test_a_directory_of_outputs_is_swept_once(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  host = socket.gethostname()
  for name in ("00001_a.png", "00002_b.png"):
    (tmp_path / f".{name}.tmp-{host}.{dead}.abcd1234").write_bytes(b"half a drawing")
  (tmp_path / "00000_c.png").write_bytes(b"done")
  assert len(files.remove_stale_temps_in(str(tmp_path))) == 2
  assert os.listdir(tmp_path) == ["00000_c.png"]
