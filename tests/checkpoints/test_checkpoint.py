"""The checkpoint format: what config.json holds, corrupt checkpoints, failed saves, file modes."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.paligemma import get_config
from paligemma_jax import errors
from paligemma_jax.checkpoints import checkpoint
from paligemma_jax.checkpoints import mapped
from paligemma_jax.model import paligemma


@pytest.fixture(scope="module")
def tiny():
  """(params, config): noise in a tiny PaliGemma 1's parameter tree (no model init to compile)."""
  config = get_config("tiny-pg1")
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype),
                      paligemma.param_shapes(config)), config


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory, spm_model_path):
  """A saved checkpoint of `tiny`, with the test tokenizer; copy it before changing it."""
  directory = str(tmp_path_factory.mktemp("saved") / "ckpt")
  checkpoint.save(directory, *tiny, spm_model_path)
  return directory


def _stored(directory):
  with open(os.path.join(directory, checkpoint.CONFIG)) as f:
    return json.load(f)


def test_runtime_choices_are_not_stored(tiny, tmp_path):
  params, config = tiny
  config = config.copy_and_resolve_references()
  config.dtype, config.remat, config.param_dtype = "bfloat16", True, "float32"
  before = config.to_dict()
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  checkpoint.save(str(tmp_path / "ckpt"), params16, config)
  assert config.to_dict() == before  # The caller's config is untouched.
  stored = _stored(tmp_path / "ckpt")
  assert sorted(stored) == ["image_token_id", "param_dtype", "text", "variant", "vision"]
  assert stored["param_dtype"] == "bfloat16"  # The weights' dtype, whatever the config said.
  loaded = checkpoint.load_config(str(tmp_path / "ckpt"))
  assert (loaded.dtype, loaded.remat, loaded.scan_layers) == ("float32", False, True)
  assert loaded.text.to_dict() == config.text.to_dict()


def test_older_checkpoints_with_runtime_fields_load(saved, tmp_path):
  """Checkpoints written before stored dtype, remat and scan_layers: those fields are ignored."""
  directory = str(tmp_path / "old")
  shutil.copytree(saved, directory)
  stored = dict(_stored(directory), dtype="bfloat16", remat=True, scan_layers=False)
  with open(os.path.join(directory, checkpoint.CONFIG), "w") as f:
    json.dump(stored, f)
  params, config = checkpoint.load(directory)
  assert (config.dtype, config.remat, config.scan_layers) == ("float32", False, True)
  model, inputs = paligemma.PaliGemma(config), paligemma.dummy_inputs(config)
  logits = jax.eval_shape(lambda p: model.apply({"params": p}, *inputs), params)  # Shapes match.
  assert logits.shape[-1] == config.text.vocab_size


def test_save_takes_the_stacked_layout(tiny, tmp_path):
  params, config = tiny
  unstacked = config.copy_and_resolve_references()
  unstacked.scan_layers = False
  with pytest.raises(ValueError, match="stacked"):
    checkpoint.save(str(tmp_path / "ckpt"), paligemma.decoding_layout(params), unstacked)
  assert os.listdir(tmp_path) == []


def test_failed_save_leaves_nothing(tiny, tmp_path, monkeypatch):
  params, config = tiny
  (tmp_path / "tok").write_bytes(b"x")

  def fail(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(checkpoint.shutil, "copyfile", fail)
  with pytest.raises(OSError, match="disk full"):
    checkpoint.save(str(tmp_path / "out"), params, config, str(tmp_path / "tok"))
  assert sorted(os.listdir(tmp_path)) == ["tok"]
  with pytest.raises(FileNotFoundError, match="missing-tokenizer"):
    checkpoint.save(str(tmp_path / "out"), params, config, str(tmp_path / "missing-tokenizer"))
  assert sorted(os.listdir(tmp_path)) == ["tok"]


def test_save_respects_the_umask(tiny, tmp_path):
  old = os.umask(0o002)
  try:
    checkpoint.save(str(tmp_path / "ckpt"), *tiny)
  finally:
    os.umask(old)
  modes = {}
  for root, dirs, files in os.walk(tmp_path / "ckpt"):
    for name in dirs + files:
      path = os.path.join(root, name)
      modes.setdefault(os.path.isdir(path), set()).add(os.stat(path).st_mode & 0o777)
  assert modes == {True: {0o775}, False: {0o664}}


def _write_config(text):
  def damage(directory):
    with open(os.path.join(directory, checkpoint.CONFIG), "w") as f:
      f.write(text)
  return damage


def _edit_config(**fields):
  def damage(directory):
    stored = _stored(directory)
    stored["text"].update(fields)
    _write_config(json.dumps(stored))(directory)
  return damage


def _chunk_files(directory):
  """The files holding the arrays' bytes (`params/<key.path>/c/0/..`)."""
  params = os.path.join(directory, checkpoint.PARAMS)
  return [os.path.join(d, n) for d, _, names in os.walk(params) for n in names
          if os.sep + "c" + os.sep in os.path.relpath(os.path.join(d, n), params) + os.sep]


def _truncate_data(directory):
  for path in _chunk_files(directory):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _remove_data(directory):
  for path in _chunk_files(directory):
    os.remove(path)


def _overwrite_index(directory):
  """The array bytes intact, the shard index at their end naming another size."""
  for path in _chunk_files(directory):
    with open(path, "r+b") as f:
      f.seek(-20, os.SEEK_END)
      f.write(b"\xff" * 16)


def _remove(*parts):
  def damage(directory):
    path = os.path.join(directory, *parts)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  return damage


_NOT_A_CONFIG = r"config\.json: not a PaliGemma model config"
_CORRUPT = {  # How a checkpoint is damaged, what the InputError (naming the directory) says.
    "config not JSON": (_write_config("{"), r"config\.json: not valid JSON"),
    "config a list": (_write_config("[]"), _NOT_A_CONFIG),
    "config lacks text": (_write_config('{"vision": {}}'), _NOT_A_CONFIG),
    "config of another model": (_edit_config(depth=3), r"config\.json does not describe the param"),
    "no config": (_remove(checkpoint.CONFIG), r"not a complete converted checkpoint: config\.json"),
    "no params": (_remove(checkpoint.PARAMS), r"not a complete converted checkpoint: params is"),
    "no parameter tree": (_remove(checkpoint.PARAMS, "_METADATA"), r"no parameter metadata"),
    "no array data": (_remove_data, r"Incomplete or corrupt"),
    "truncated array data": (_truncate_data, r"Incomplete or corrupt .*params"),
    "damaged shard index": (_overwrite_index, r"Incomplete or corrupt .*params"),
    "an array missing": (_remove(checkpoint.PARAMS, "llm.final_norm.scale"),
                         r"does not describe the param.*\['final_norm'\]\['scale'\]: stored None"),
}


@pytest.mark.parametrize("case", sorted(_CORRUPT))
def test_corrupt_checkpoint(saved, tmp_path, case):
  directory = str(tmp_path / "ckpt")
  shutil.copytree(saved, directory)
  damage, message = _CORRUPT[case]
  damage(directory)
  with pytest.raises(errors.InputError, match=message) as raised:
    checkpoint.load(directory)
  assert directory in str(raised.value)


def test_missing_checkpoint_parts(saved, tmp_path):
  with pytest.raises(errors.InputError, match="nothing: no such converted checkpoint"):
    checkpoint.load(str(tmp_path / "nothing"))
  directory = str(tmp_path / "ckpt")
  shutil.copytree(saved, directory)
  os.remove(os.path.join(directory, checkpoint.TOKENIZER))
  with pytest.raises(errors.InputError, match=f"{directory} .*tokenizer.model is missing"):
    checkpoint.tokenizer_path(directory)


def _bytes_under(directory):
  return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(directory)
             for n in names)


def test_arrays_are_stored_raw(tiny, tmp_path):
  """Uncompressed (restores decode nothing): even all-zero weights take their full size."""
  params, config = tiny
  zeros = jax.tree.map(np.zeros_like, params)
  checkpoint.save(str(tmp_path / "ckpt"), zeros, config)
  raw = sum(x.nbytes for x in jax.tree.leaves(zeros))
  assert _bytes_under(tmp_path / "ckpt" / checkpoint.PARAMS) >= raw


_EARLIER_WRITERS = {  # Orbax handlers of earlier versions: their checkpoints load through Orbax.
    "zarr2 zstd (StandardCheckpointer)": ocp.PyTreeCheckpointHandler(),
    "raw zarr3 in OCDBT": ocp.PyTreeCheckpointHandler(use_compression=False, use_zarr3=True),
}


@pytest.mark.parametrize("writer", sorted(_EARLIER_WRITERS))
def test_checkpoints_of_the_earlier_writers_load(tiny, tmp_path, writer):
  params, config = tiny
  directory = tmp_path / "old"
  directory.mkdir()
  with ocp.Checkpointer(_EARLIER_WRITERS[writer]) as ckpt:
    ckpt.save(str(directory / checkpoint.PARAMS), params)
  (directory / checkpoint.CONFIG).write_text(checkpoint._stored_structure(params, config))
  assert mapped.read(str(directory / checkpoint.PARAMS)) is None
  for scan_layers in (True, False):
    loaded, loaded_config = checkpoint.load(str(directory), scan_layers=scan_layers)
    want = params if scan_layers else paligemma.decoding_layout(params)
    jax.tree.map(np.testing.assert_array_equal, loaded, want)
    assert loaded_config.scan_layers == scan_layers


def _mapped_ranges(path_part):
  """(start, end) of this process's memory mappings of files whose path contains `path_part`."""
  with open("/proc/self/maps") as f:
    return [tuple(int(a, 16) for a in line.split()[0].split("-")) for line in f
            if path_part in line]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux memory maps")
def test_restore_maps_the_files_instead_of_copying_them(tiny, saved):
  """On CPU the loaded weights are the checkpoint's file pages (no fresh memory to touch), and
  so are the layers taken apart; a 64-byte aligned slice of a mapped file is what JAX keeps."""
  params, _ = tiny
  assert mapped.read(os.path.join(saved, checkpoint.PARAMS)) is not None
  for scan_layers in (True, False):
    loaded, _ = checkpoint.load(saved, scan_layers=scan_layers)
    want = params if scan_layers else paligemma.decoding_layout(params)
    jax.tree.map(np.testing.assert_array_equal, loaded, want)
    llm = loaded["llm"]
    # Layers apart are views; the decoding layout's transposed MLP kernels are copies.
    layer = llm["layers"] if scan_layers else llm["layers_1"]
    for name, leaf in [("llm.embedder.input_embedding", llm["embedder"]["input_embedding"]),
                       ("llm.layers.attn.q.kernel", layer["attn"]["q"]["kernel"])]:
      pointer = leaf.unsafe_buffer_pointer()
      assert any(a <= pointer < b for a, b in _mapped_ranges(os.sep + name + os.sep)), name


def test_restore_never_writes_the_files(saved, tmp_path):
  """Mapped copy-on-write: whatever writes to the mapped pages changes memory, not the file."""
  directory = str(tmp_path / "ckpt")
  shutil.copytree(saved, directory)
  before = {p: open(p, "rb").read() for p in _chunk_files(directory)}
  host = mapped.read(os.path.join(directory, checkpoint.PARAMS))
  assert len(jax.tree.leaves(host)) == len(before)
  for leaf in jax.tree.leaves(host):
    leaf[...] = 7
  assert {p: open(p, "rb").read() for p in _chunk_files(directory)} == before


def test_a_filesystem_that_cannot_map_falls_back_to_orbax(tiny, saved, monkeypatch):
  def refuse(*args, **kwargs):
    raise OSError(19, "No such device")

  monkeypatch.setattr(mapped.mmap, "mmap", refuse)
  assert mapped.read(os.path.join(saved, checkpoint.PARAMS)) is None
  loaded, _ = checkpoint.load(saved)
  jax.tree.map(np.testing.assert_array_equal, loaded, tiny[0])


def test_restore_casts_to_the_dtype_asked(tiny, saved):
  params, _ = tiny
  loaded, config = checkpoint.load(saved, dtype="bfloat16")
  assert config.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(loaded)} == {jnp.dtype("bfloat16")}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b.astype(jnp.bfloat16)), loaded, params)
