"""Hugging Face -> Orbax conversion: exact weights for every naming, dtypes, configs and failures."""

import copy
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import hf_fixtures
from configs.paligemma import get_config
from checkpoints_convert import hf_to_orbax
from paligemma_jax import errors
from paligemma_jax.checkpoints import checkpoint
from paligemma_jax.checkpoints import hf
from paligemma_jax.checkpoints import hf_config as hf_config_lib
from paligemma_jax.model import paligemma
from helpers import ROOT, assert_expected_failure



@pytest.fixture
def convert(spm_model_path):
  """convert(hf_dir, out_dir, **kw): the converter in this process, with the test tokenizer unless
  `tokenizer` is given (None: the directory's own)."""
  def run(hf_dir, out_dir, **kw):
    kw.setdefault("tokenizer", spm_model_path)
    return hf_to_orbax.convert(str(hf_dir), str(out_dir), progress=False, **kw)
  return run


def _flat(tree):
  return {"/".join(k.key for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _numpy(t):
  """A torch tensor as numpy without copying, bfloat16 included."""
  t = t.detach()
  return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def _bits(x):
  return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def expected_params(model):
  """Our param tree, computed directly from the torch modules (independently of paligemma_jax.checkpoints.hf), as
  {path: zero-argument function} so that real-width trees are built one leaf at a time."""
  sd = model.state_dict()
  vc, tc = model.config.vision_config, model.config.text_config
  vh, vhd = vc.num_attention_heads, vc.hidden_size // vc.num_attention_heads
  th, tk, thd = tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim

  def get(name, fn=lambda x: x):
    return lambda: fn(_numpy(sd[name]))

  def stack(fmt, n, fn=lambda x: x):
    return lambda: np.stack([fn(_numpy(sd[fmt.format(i)])) for i in range(n)])

  v, t = "model.vision_tower.", "model.language_model."
  vl, tl, vn, tn = v + "encoder.layers.{}.", t + "layers.{}.", vc.num_hidden_layers, tc.num_hidden_layers
  img = {
      "embedding/kernel": get(v + "embeddings.patch_embedding.weight", lambda w: np.transpose(w, (2, 3, 1, 0))),
      "embedding/bias": get(v + "embeddings.patch_embedding.bias"),
      "pos_embedding": get(v + "embeddings.position_embedding.weight"),
      "norm/scale": get(v + "post_layernorm.weight"), "norm/bias": get(v + "post_layernorm.bias"),
      "layers/attn/o/kernel": stack(vl + "self_attn.out_proj.weight", vn, lambda w: w.T.reshape(vh, vhd, -1)),
      "layers/attn/o/bias": stack(vl + "self_attn.out_proj.bias", vn),
  }
  for n in "qkv":
    img[f"layers/attn/{n}/kernel"] = stack(vl + f"self_attn.{n}_proj.weight", vn,
                                          lambda w: w.T.reshape(-1, vh, vhd))
    img[f"layers/attn/{n}/bias"] = stack(vl + f"self_attn.{n}_proj.bias", vn, lambda b: b.reshape(vh, vhd))
  for i in "12":
    img[f"layers/norm{i}/scale"] = stack(vl + f"layer_norm{i}.weight", vn)
    img[f"layers/norm{i}/bias"] = stack(vl + f"layer_norm{i}.bias", vn)
    img[f"layers/mlp/fc{i}/kernel"] = stack(vl + f"mlp.fc{i}.weight", vn, np.transpose)
    img[f"layers/mlp/fc{i}/bias"] = stack(vl + f"mlp.fc{i}.bias", vn)
  llm = {
      "embedder/input_embedding": get(t + "embed_tokens.weight"),
      "final_norm/scale": get(t + "norm.weight"),
      "layers/pre_attention_norm/scale": stack(tl + "input_layernorm.weight", tn),
      "layers/attn/q/kernel": stack(tl + "self_attn.q_proj.weight", tn, lambda w: w.T.reshape(-1, th, thd)),
      "layers/attn/k/kernel": stack(tl + "self_attn.k_proj.weight", tn, lambda w: w.T.reshape(-1, tk, thd)),
      "layers/attn/v/kernel": stack(tl + "self_attn.v_proj.weight", tn, lambda w: w.T.reshape(-1, tk, thd)),
      "layers/attn/o/kernel": stack(tl + "self_attn.o_proj.weight", tn, lambda w: w.T.reshape(th, thd, -1)),
  }
  for n in ("gate", "up", "down"):
    llm[f"layers/mlp/{n}/kernel"] = stack(tl + f"mlp.{n}_proj.weight", tn, np.transpose)
  if tc.model_type == "gemma":
    llm["layers/pre_ffw_norm/scale"] = stack(tl + "post_attention_layernorm.weight", tn)
  else:
    llm["layers/pre_ffw_norm/scale"] = stack(tl + "pre_feedforward_layernorm.weight", tn)
    llm["layers/post_attention_norm/scale"] = stack(tl + "post_attention_layernorm.weight", tn)
    llm["layers/post_ffw_norm/scale"] = stack(tl + "post_feedforward_layernorm.weight", tn)
  m = "model.multi_modal_projector.linear."
  out = {"projector/kernel": get(m + "weight", np.transpose), "projector/bias": get(m + "bias")}
  out.update({"img/" + k: x for k, x in img.items()})
  out.update({"llm/" + k: x for k, x in llm.items()})
  return out


def assert_params_equal(params, model, dtype):
  """Same tree, `dtype` everywhere, and bit-equal values."""
  got, want = _flat(params), expected_params(model)
  assert sorted(got) == sorted(want)
  for path, x in got.items():
    x, expected = np.asarray(x), want[path]()
    assert x.dtype == np.dtype(dtype), path
    assert x.shape == expected.shape, path
    expected = expected.astype(x.dtype, copy=False)  # Only ever widens bfloat16 to float32: exact.
    if not np.array_equal(_bits(x), _bits(expected)):
      diff = np.abs(x.astype(np.float32) - expected.astype(np.float32)).max()
      raise AssertionError(f"{path}: converted values differ from torch's (max abs difference {diff})")


def _same_config_fields(cfg, preset):
  """Every field of the preset except dtypes and remat; layer_types compared after expansion."""
  def layer_types(text):
    if text.layer_types:
      return tuple(text.layer_types)
    sliding = text.family == "gemma2"
    return tuple("sliding_attention" if sliding and i % 2 == 0 else "full_attention" for i in range(text.depth))
  assert cfg.vision.to_dict() == preset.vision.to_dict()
  a, b = cfg.text.to_dict(), preset.text.to_dict()
  a.pop("layer_types"), b.pop("layer_types")
  assert a == b
  assert layer_types(cfg.text) == layer_types(preset.text)
  assert cfg.image_token_id == preset.image_token_id
  assert cfg.variant == preset.variant


@pytest.mark.parametrize("version,naming,sharded", [
    (1, "transformers5", False), (2, "transformers5", False), (1, "hub", True), (2, "hub", False),
    (2, "hub", True), (1, "in_memory", False), (2, "in_memory", True)])
def test_round_trip(tmp_path, spm_model_path, version, naming, sharded, convert):
  src = hf_fixtures.make_hf_paligemma(str(tmp_path / "hf"), version=version, naming=naming,
                                      sharded=sharded, tokenizer_model=spm_model_path)
  assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json") == sharded
  config = convert(src.path, tmp_path / "out", tokenizer=None)  # The directory's tokenizer.model.
  assert sorted(os.listdir(tmp_path)) == ["hf", "out"]  # No temporary leftovers.

  params, loaded = checkpoint.load(str(tmp_path / "out"))
  assert_params_equal(params, src.model, "float32")
  assert loaded.to_dict() == config.to_dict()
  _same_config_fields(loaded, get_config(f"tiny-pg{version}"))
  expected = paligemma.param_shapes(loaded)  # The model's own init tree, leaf for leaf.
  assert jax.tree.structure(params) == jax.tree.structure(expected)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(lambda x: (x.shape, x.dtype), expected)
  with open(checkpoint.tokenizer_path(str(tmp_path / "out")), "rb") as f:
    assert f.read() == open(spm_model_path, "rb").read()


def test_bfloat16_stays_bfloat16(tmp_path, convert):
  src = hf_fixtures.make_hf_paligemma(str(tmp_path / "hf"), version=2, naming="hub", dtype=torch.bfloat16)
  with open(tmp_path / "hf" / "config.json") as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  config = convert(src.path, tmp_path / "out")
  assert config.param_dtype == "bfloat16"
  params, loaded = checkpoint.load(str(tmp_path / "out"))
  assert loaded.param_dtype == "bfloat16"
  assert_params_equal(params, src.model, "bfloat16")  # bf16 -> f32 is exact, so this is bit equality.

  params32, loaded32 = checkpoint.load(str(tmp_path / "out"), dtype="float32")
  assert loaded32.param_dtype == "float32"
  assert_params_equal(params32, src.model, "float32")


def test_dtype_override(tmp_path, convert):
  src = hf_fixtures.make_hf_paligemma(str(tmp_path / "hf"), version=2, dtype=torch.bfloat16)
  assert convert(src.path, tmp_path / "out", dtype="float32").param_dtype == "float32"
  params, _ = checkpoint.load(str(tmp_path / "out"))
  assert_params_equal(params, src.model, "float32")
  with pytest.raises(ValueError, match="float64"):
    hf.load_hf(src.path, dtype="float64")


def test_load_with_shardings(tmp_path, convert):
  src = hf_fixtures.make_hf_paligemma(str(tmp_path / "hf"), version=1)
  convert(src.path, tmp_path / "out")
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",)),
                                        jax.sharding.PartitionSpec())
  params, _ = checkpoint.load(str(tmp_path / "out"), shardings=sharding)
  assert all(x.sharding == sharding for x in jax.tree.leaves(params))
  tree = jax.tree.map(lambda _: sharding, params)
  params, _ = checkpoint.load(str(tmp_path / "out"), dtype="bfloat16", shardings=tree)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jax.numpy.dtype("bfloat16")}


_SHARDED_LOAD = """
import sys, jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from paligemma_jax.checkpoints import checkpoint
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
split = lambda x: NamedSharding(mesh, P(*[None] * (len(x.shape) - 1), "model") if x.shape[-1] % 2 == 0 else P())
params, _ = checkpoint.load(sys.argv[1])
shardings = jax.tree.map(split, params)
sharded, _ = checkpoint.load(sys.argv[1], shardings=shardings)
assert all(x.sharding == s for x, s in zip(jax.tree.leaves(sharded), jax.tree.leaves(shardings)))
assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(params)))
print(sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded)), "leaves split")
"""


def test_load_onto_a_mesh(tmp_path, convert):
  """Each device restores only its slices (4 CPU devices, in a fresh process)."""
  src = hf_fixtures.make_hf_paligemma(str(tmp_path / "hf"), version=2)
  convert(src.path, tmp_path / "out")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _SHARDED_LOAD, str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert int(result.stdout.split()[0]) > 20


def test_canonical_names():
  hub = "language_model.model.layers.3.mlp.up_proj.weight"
  for name in (hub, "model.language_model.layers.3.mlp.up_proj.weight", "language_model.layers.3.mlp.up_proj.weight"):
    assert hf.canonical_name(name) == hub
  hub = "vision_tower.vision_model.encoder.layers.0.layer_norm1.bias"
  for name in (hub, "vision_tower.encoder.layers.0.layer_norm1.bias", "model.vision_tower.encoder.layers.0.layer_norm1.bias"):
    assert hf.canonical_name(name) == hub
  assert hf.canonical_name("model.multi_modal_projector.linear.bias") == "multi_modal_projector.linear.bias"
  assert hf.canonical_name("lm_head.weight") is None
  assert hf.canonical_name("language_model.lm_head.weight") is None
  with pytest.raises(ValueError, match="text_model.foo"):
    hf.canonical_name("text_model.foo")


# Failures: each names the problem and leaves no output directory behind.

def _edit_tensors(path, fn):
  file = os.path.join(path, "model.safetensors")
  tensors = safetensors.torch.load_file(file)
  fn(tensors)
  safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})


def _drop(name):
  return lambda t: t.pop(name)


def _reshape(name):
  def fn(t):
    t[name] = t[name][:-1]
  return fn


def _add(name):
  def fn(t):
    t[name] = torch.zeros(3)
  return fn


@pytest.mark.parametrize("edit,error", [
    (_drop("language_model.model.layers.1.mlp.up_proj.weight"),
     r"Missing tensor.*language_model\.model\.layers\.1\.mlp\.up_proj\.weight"),
    (_drop("vision_tower.post_layernorm.bias"), r"Missing tensor.*vision_model\.post_layernorm\.bias"),
    (_reshape("language_model.model.layers.0.self_attn.k_proj.weight"),
     r"'language_model\.model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(31, 64\), expected \(32, 64\)"),
    (_reshape("vision_tower.embeddings.position_embedding.weight"),
     r"position_embedding\.weight' has shape \(15, 32\), expected \(16, 32\)"),
    (_add("language_model.model.layers.3.input_layernorm.weight"),
     r"unexpected tensor 'language_model\.model\.layers\.3\.input_layernorm\.weight'"),
    (_add("text_model.extra"), r"Unexpected tensor 'text_model\.extra'"),
])
def test_bad_tensors(tmp_path, edit, error, convert):
  src = hf_fixtures.make_hf_paligemma(str(tmp_path / "hf"), version=2)
  _edit_tensors(src.path, edit)
  with pytest.raises(ValueError, match=error):
    convert(src.path, tmp_path / "out")
  assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_truncated_file(tmp_path, convert):
  src = hf_fixtures.make_hf_paligemma(str(tmp_path / "hf"), version=1, sharded=True)
  with open(tmp_path / "hf" / "model.safetensors.index.json") as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
  path = tmp_path / "hf" / shard
  path.write_bytes(path.read_bytes()[:-1000])
  with pytest.raises(ValueError, match=rf"{shard}.*truncated or corrupt"):
    convert(src.path, tmp_path / "out")
  path.unlink()
  with pytest.raises(FileNotFoundError, match=shard):
    convert(src.path, tmp_path / "out")
  assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_existing_output_dir(tmp_path, convert):
  src = hf_fixtures.make_hf_paligemma(str(tmp_path / "hf"), version=1)
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="already exists"):
    convert(src.path, tmp_path / "out")
  assert os.listdir(tmp_path / "out") == ["keep.txt"]
  assert sorted(os.listdir(tmp_path)) == ["hf", "out"]


def test_not_a_hf_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    hf.load_hf(str(tmp_path))
  src = hf_fixtures.make_hf_paligemma(str(tmp_path / "hf"), version=1)
  os.remove(tmp_path / "hf" / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
    hf.load_hf(src.path)


def test_unknown_config_value(tmp_path, convert):
  src = hf_fixtures.make_hf_paligemma(str(tmp_path / "hf"), version=2)
  path = tmp_path / "hf" / "config.json"
  config = json.loads(path.read_text())
  config["text_config"]["model_type"] = "gemma3_text"
  path.write_text(json.dumps(config))
  with pytest.raises(ValueError, match="text_config.model_type='gemma3_text'"):
    convert(src.path, tmp_path / "out")
  assert sorted(os.listdir(tmp_path)) == ["hf"]


# The command line: one line naming the problem for every expected failure, nothing left behind.

def _run(*args, timeout=300):
  cmd = [sys.executable, "-m", "checkpoints_convert.hf_to_orbax", *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _temp_dirs(parent):
  return [n for n in os.listdir(parent) if ".tmp-" in n]


def test_cli(tmp_path, spm_model_path):
  src = hf_fixtures.make_hf_paligemma(str(tmp_path / "hf"), version=2,
                                      tokenizer_model=spm_model_path)
  args = [f"--hf_dir={src.path}", f"--output_dir={tmp_path / 'out'}", "--dtype=bfloat16"]
  result = _run(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Converting" in result.stderr  # The tqdm bar.
  # One log line of ours at the end, not Orbax's twenty per save (naming its temporary directory).
  ours = [line for line in result.stderr.splitlines() if "hf_to_orbax.py:" in line]
  assert len(ours) == 1 and "Wrote" in ours[0] and "tiny-pg2" in ours[0], result.stderr[-3000:]
  assert "orbax-checkpoint-tmp" not in result.stderr
  params, config = checkpoint.load(str(tmp_path / "out"))
  assert config.param_dtype == "bfloat16" and config.text.family == "gemma2"
  assert_params_equal(params, src.model.to(torch.bfloat16), "bfloat16")


@pytest.fixture(scope="module")
def pristine_hf_dir(tmp_path_factory, spm_model_path):
  """A tiny PaliGemma 2 directory with a tokenizer, to copy and break."""
  return hf_fixtures.make_hf_paligemma(str(tmp_path_factory.mktemp("pristine") / "hf"), version=2,
                                       tokenizer_model=spm_model_path).path


def _write(name, text):
  return lambda hf_dir: pathlib.Path(hf_dir, name).write_text(text)


def _edit_config(hf_dir):
  path = pathlib.Path(hf_dir, "config.json")
  config = json.loads(path.read_text())
  config["text_config"]["num_hidden_layers"] = "three"
  path.write_text(json.dumps(config))


def _truncate(hf_dir):
  path = pathlib.Path(hf_dir, "model.safetensors")
  path.write_bytes(path.read_bytes()[:-1000])


# How to break the copy HF, more flags, what the one line says (HF and OUT stand for the paths).
_BAD_INPUTS = {
    "config not JSON": (_write("config.json", "{not json"), [], r"HF/config\.json: not valid JSON"),
    "config a list": (_write("config.json", "[1, 2]"), [],
                      r"HF/config\.json: expected a JSON object, not a list"),
    "config value": (_edit_config, [],
                     r"HF/config\.json: .*text_config\.num_hidden_layers='three'"),
    "no safetensors": (lambda d: os.remove(os.path.join(d, "model.safetensors")), [],
                       r"HF has neither model\.safetensors"),
    "truncated safetensors": (_truncate, [], r"HF/model\.safetensors: .*truncated or corrupt"),
    "existing output": (lambda d: os.mkdir(os.path.join(os.path.dirname(d), "out")), [],
                        r"OUT already exists"),
    "no HF directory": (shutil.rmtree, [], r"HF: no such Hugging Face model directory"),
    "no tokenizer": (lambda d: os.remove(os.path.join(d, "tokenizer.model")), [],
                     r"HF/tokenizer\.model.*--tokenizer=PATH"),
    "corrupt tokenizer": (_write("tokenizer.model", "not sentencepiece"), [],
                          r"Not a valid SentencePiece model: 'HF/tokenizer\.model'.*--tokenizer"),
    "--tokenizer missing": (lambda d: None, ["--tokenizer=HF/none.model"],
                            r"HF/none\.model.*--tokenizer"),
}


@pytest.mark.parametrize("case", sorted(_BAD_INPUTS))
def test_cli_bad_input(tmp_path, pristine_hf_dir, case):
  """Exit 1 with one line naming the problem, no traceback, no output and no temporary directory."""
  hf_dir, out_dir = str(tmp_path / "hf"), str(tmp_path / "out")
  shutil.copytree(pristine_hf_dir, hf_dir)
  damage, flags, message = _BAD_INPUTS[case]
  damage(hf_dir)
  before = sorted(os.listdir(tmp_path))
  flags = [f.replace("HF", hf_dir) for f in flags]
  result = _run(f"--hf_dir={hf_dir}", f"--output_dir={out_dir}", *flags)
  assert_expected_failure(result)
  lines = [line for line in result.stderr.splitlines() if "error:" in line]
  assert len(lines) == 1 and lines[0].startswith("hf_to_orbax.py: error: "), result.stderr[-3000:]
  assert re.search(message.replace("HF", re.escape(hf_dir)).replace("OUT", re.escape(out_dir)),
                   lines[0]), lines[0]
  assert sorted(os.listdir(tmp_path)) == before  # Nothing written.


def test_rerun_removes_what_killed_runs_left(tmp_path, pristine_hf_dir, convert):
  """A killed run's temporary directory (its process gone, on this host) is removed; a live
  process's, another host's, and other outputs' are kept."""
  finished = subprocess.Popen(["true"])
  finished.wait()
  alive = subprocess.Popen(["sleep", "600"])
  host = socket.gethostname()
  names = {
      "dead": f".out.tmp-{host}.{finished.pid}.0123abcd",
      "earlier process with our pid": f".out.tmp-{host}.{os.getpid()}.4567cdef",
      "live": f".out.tmp-{host}.{alive.pid}.89abcdef",
      "other host": f".out.tmp-elsewhere.{finished.pid}.0123abcd",
      "other output": f".other.tmp-{host}.{finished.pid}.0123abcd",
  }
  try:
    for name in names.values():
      os.makedirs(tmp_path / name / "params")
      (tmp_path / name / "params" / "data").write_bytes(b"partial")
    convert(pristine_hf_dir, tmp_path / "out")
  finally:
    alive.kill()
    alive.wait()
  kept = {names[k] for k in ("live", "other host", "other output")}
  assert set(os.listdir(tmp_path)) == kept | {"out"}
  checkpoint.load(str(tmp_path / "out"))


_HANG_WHILE_SAVING = """
import sys, time
from checkpoints_convert import hf_to_orbax
from paligemma_jax import cli
from paligemma_jax.checkpoints import checkpoint
checkpoint.shutil.copyfile = lambda *args, **kwargs: time.sleep(600)  # The parameters are written.
sys.argv = ["hf_to_orbax.py", *sys.argv[1:]]
cli.run(hf_to_orbax.main, hf_to_orbax.define_flags)
"""


def test_rerun_after_kill_9(tmp_path, pristine_hf_dir):
  """kill -9 during the save leaves its temporary directory; the same command run again removes
  it and writes a complete checkpoint."""
  args = [f"--hf_dir={pristine_hf_dir}", f"--output_dir={tmp_path / 'out'}"]
  killed = subprocess.Popen([sys.executable, "-c", _HANG_WHILE_SAVING, *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while not any(os.path.exists(tmp_path / d / "params") for d in _temp_dirs(tmp_path)):
      assert killed.poll() is None and time.time() < deadline, "the converter stopped early"
      time.sleep(0.05)
  finally:
    killed.send_signal(signal.SIGKILL)
    killed.wait()
  assert len(_temp_dirs(tmp_path)) == 1 and not os.path.exists(tmp_path / "out")
  result = _run(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.listdir(tmp_path) == ["out"]
  checkpoint.load(str(tmp_path / "out"))
  with open(checkpoint.tokenizer_path(str(tmp_path / "out")), "rb") as f:
    assert f.read() == open(os.path.join(pristine_hf_dir, "tokenizer.model"), "rb").read()


def test_tokenizer_is_checked_before_the_weights(tmp_path, pristine_hf_dir, spm_model_path,
                                                 convert):
  hf_dir = tmp_path / "hf"
  shutil.copytree(pristine_hf_dir, hf_dir)
  (hf_dir / "tokenizer.model").write_bytes(b"not sentencepiece")
  _truncate(hf_dir)
  with pytest.raises(errors.InputError, match="tokenizer.model.*--tokenizer"):
    convert(hf_dir, tmp_path / "out", tokenizer=None)
  _write("config.json", "[]")(hf_dir)
  with pytest.raises(errors.InputError, match="config.json"):  # The config comes first.
    convert(hf_dir, tmp_path / "out", tokenizer=None)
  shutil.copy(os.path.join(pristine_hf_dir, "config.json"), hf_dir)
  shutil.copy(os.path.join(pristine_hf_dir, "model.safetensors"), hf_dir)
  convert(hf_dir, tmp_path / "out", tokenizer=spm_model_path)  # --tokenizer: not the corrupt one.
  with open(checkpoint.tokenizer_path(str(tmp_path / "out")), "rb") as f:
    assert f.read() == open(spm_model_path, "rb").read()


_IMPORT_ENTRY_POINTS = """
import importlib
from absl import flags
for name in ("checkpoints_convert.hf_to_orbax", "paligemma_jax.generate", "paligemma_jax.evaluate",
             "paligemma_jax.finetune"):
  importlib.import_module(name)
benchmark = importlib.import_module("paligemma_jax.benchmark")  # Last: the others define no flag.
exempt = () if hasattr(benchmark, "define_flags") else ("paligemma_jax.benchmark",)  # Being fixed.
ours = sorted(m for m in flags.FLAGS.flags_by_module_dict()
              if m.startswith(("paligemma_jax", "checkpoints")) and m not in exempt)
assert not ours, f"flags defined at import by {ours}"
"""


def test_entry_points_import_together():
  """Importing every command-line module in one process defines no flag (so none clash)."""
  result = subprocess.run([sys.executable, "-c", _IMPORT_ENTRY_POINTS], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]


def test_fixture_softcaps_matter(tmp_path):
  """The tiny Gemma 2 weights are large enough that both softcaps change the logits clearly."""
  model = hf_fixtures.make_hf_paligemma(str(tmp_path / "hf"), version=2).model
  inputs = hf_fixtures.random_inputs(model, prompt_len=12)
  text_config = model.config.get_text_config()
  attention = [m for m in model.modules() if hasattr(m, "attn_logit_softcapping")]
  assert len(attention) == 3
  with torch.no_grad():
    capped = model(**inputs).logits
    text_config.final_logit_softcapping = None
    raw = model(**inputs).logits
    for m in attention:
      m.attn_logit_softcapping = None
    no_caps = model(**inputs).logits
  assert capped.abs().max() < 30 < raw.abs().max() - 20  # Final softcap 30 bites on the largest logits.
  assert (raw - no_caps).abs().max() > 1.0  # So does the attention softcap 50.
  assert (raw - no_caps).abs().mean() > 0.05


def test_fixture_namings_load_in_transformers(tmp_path):
  """Every naming is one transformers itself reads back to the same model."""
  for naming in hf_fixtures.NAMINGS:
    src = hf_fixtures.make_hf_paligemma(str(tmp_path / naming), version=2, naming=naming, sharded=True)
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(src.path).eval()
    inputs = hf_fixtures.random_inputs(model)
    with torch.no_grad():
      np.testing.assert_array_equal(model(**inputs).logits.numpy(), src.model(**inputs).logits.numpy())


# config.json files of released checkpoints: they omit the fields left at transformers' defaults.

PG1_3B_224 = {
    "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1,
    "hidden_size": 2048, "ignore_index": -100, "image_token_index": 257152, "model_type": "paligemma",
    "pad_token_id": 0, "projection_dim": 2048, "torch_dtype": "float32", "transformers_version": "4.41.0.dev0",
    "text_config": {"hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma",
                    "num_attention_heads": 8, "num_hidden_layers": 18, "num_image_tokens": 256,
                    "num_key_value_heads": 1, "torch_dtype": "float32", "vocab_size": 257216},
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256,
                      "patch_size": 14, "projection_dim": 2048, "projector_hidden_act": "gelu_fast",
                      "vision_use_head": False},
}


def _pg2(text, image_size, dim):
  n = (image_size // 14) ** 2
  return {
      "_vocab_size": 257152, "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2,
      "eos_token_id": 1, "hidden_size": 2048, "image_token_index": 257152, "model_type": "paligemma",
      "pad_token_id": 0, "projection_dim": dim, "torch_dtype": "bfloat16", "transformers_version": "4.47.0.dev0",
      "text_config": {"architectures": ["Gemma2ForCausalLM"], "attn_logit_softcapping": 50.0,
                      "cache_implementation": "hybrid", "eos_token_id": [1, 107], "final_logit_softcapping": 30.0,
                      "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
                      "hidden_size": dim, "model_type": "gemma2", "num_image_tokens": n, "sliding_window": 4096,
                      "torch_dtype": "bfloat16", "vocab_size": 257216, **text},
      "vision_config": {"hidden_size": 1152, "image_size": image_size, "intermediate_size": 4304,
                        "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                        "num_image_tokens": n, "num_positions": n, "patch_size": 14, "projection_dim": dim,
                        "torch_dtype": "bfloat16", "vision_use_head": False},
  }


PG2_3B = dict(intermediate_size=9216, num_attention_heads=8, num_hidden_layers=26, num_key_value_heads=4,
              query_pre_attn_scalar=256)
PG2_10B = dict(intermediate_size=14336, num_attention_heads=16, num_hidden_layers=42, num_key_value_heads=8,
               query_pre_attn_scalar=256)
PG2_28B = dict(head_dim=128, intermediate_size=36864, num_attention_heads=32, num_hidden_layers=46,
               num_key_value_heads=16, query_pre_attn_scalar=144)
PG1_3B_896 = copy.deepcopy(PG1_3B_224)
PG1_3B_896["vision_config"].update(image_size=896, num_image_tokens=4096)
PG1_3B_896["text_config"]["num_image_tokens"] = 4096

REAL_CONFIGS = {
    "pg1-3b": (PG1_3B_224, "float32"), "pg1-3b-896": (PG1_3B_896, "float32"),
    "pg2-3b-448": (_pg2(PG2_3B, 448, 2304), "bfloat16"), "pg2-10b-224": (_pg2(PG2_10B, 224, 3584), "bfloat16"),
    "pg2-28b-896": (_pg2(PG2_28B, 896, 4608), "bfloat16"),
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_config_from_real_hub_files(name):
  hf_config, param_dtype = REAL_CONFIGS[name]
  cfg = hf_config_lib.config_from_hf(copy.deepcopy(hf_config))
  _same_config_fields(cfg, get_config(name))
  assert cfg.param_dtype == param_dtype
  # transformers reads the same file to the same architecture (its defaults fill the gaps alike).
  ref = transformers.PaliGemmaConfig(**copy.deepcopy(hf_config))
  t, v = ref.text_config, ref.vision_config
  assert (cfg.text.head_dim, cfg.text.norm_eps, cfg.text.rope_base) == (
      t.head_dim, t.rms_norm_eps, t.rope_parameters["rope_theta"])
  assert (cfg.vision.image_size, cfg.vision.norm_eps, v.vision_use_head) == (v.image_size, v.layer_norm_eps, False)
  if cfg.text.family == "gemma2":
    assert tuple(cfg.text.layer_types) == tuple(t.layer_types)
    assert cfg.text.query_pre_attn_scalar == t.query_pre_attn_scalar
  assert cfg.image_token_id == ref.image_token_id


def _set(path, value):
  def fn(c):
    *parents, leaf = path.split(".")
    node = c
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return fn


@pytest.mark.parametrize("edit,error", [
    (_set("model_type", "llava"), "model_type='llava'"),
    (_set("text_config.model_type", "llama"), "text_config.model_type='llama'"),
    (_set("vision_config.vision_use_head", True), "vision_config.vision_use_head=True"),
    (_set("text_config.rope_scaling", {"rope_type": "linear", "factor": 2.0}), "text_config.rope_scaling="),
    (_set("text_config.rope_parameters", {"rope_type": "yarn", "factor": 2.0}), "text_config.rope_parameters.rope_type='yarn'"),
    (_set("text_config.hidden_activation", "relu"), "text_config.hidden_activation='relu'"),
    (_set("vision_config.hidden_act", "gelu"), "vision_config.hidden_act='gelu'"),
    (_set("text_config.attention_bias", True), "text_config.attention_bias=True"),
    (_set("torch_dtype", "int8"), "dtype='int8'"),
    (_set("tie_word_embeddings", False), "tie_word_embeddings=False"),
    (_set("projection_dim", 2048), "projection_dim=2048"),
    (_set("text_config.layer_types", ["full_attention"] * 3), "text_config.layer_types="),
    (lambda c: c["vision_config"].pop("vision_use_head"),
     "vision_config.vision_use_head=True (SigLIP's default when absent"),
])
def test_unsupported_configs(edit, error):
  hf_config = copy.deepcopy(REAL_CONFIGS["pg2-3b-448"][0])
  edit(hf_config)
  with pytest.raises(ValueError, match="Unsupported Hugging Face PaliGemma config: " + re.escape(error)):
    hf_config_lib.config_from_hf(hf_config)


@pytest.mark.parametrize("model_type", sorted(hf_config_lib._CLASS_DEFAULTS))
def test_defaults_are_transformers_defaults(model_type):
  ref = transformers.AutoConfig.for_model(model_type)
  for field, value in hf_config_lib._CLASS_DEFAULTS[model_type].items():
    if field != "layer_types":  # Gemma 2 fills it in from num_hidden_layers.
      assert getattr(ref, field) == value, field
  spec = transformers.PaliGemmaConfig.sub_configs_defaults
  for key, defaults in hf_config_lib._MISSING_SUBCONFIG.items():
    ref = {"model_type": spec[key].model_type, **spec[key].init_kwargs}
    assert {k: ref[k] for k in defaults} == defaults


def test_gemma_legacy_gelu_means_tanh():
  hf_config = copy.deepcopy(PG1_3B_224)
  hf_config["text_config"]["hidden_act"] = "gelu"  # transformers maps it to gelu_pytorch_tanh.
  _same_config_fields(hf_config_lib.config_from_hf(hf_config), get_config("pg1-3b"))


def test_missing_subconfigs_use_paligemma_defaults():
  """Without sub-configs transformers builds paligemma-3b's architecture (and its default vocabulary)."""
  cfg = hf_config_lib.config_from_hf({"model_type": "paligemma"})
  ref = transformers.PaliGemmaConfig()
  assert (cfg.text.family, cfg.text.width, cfg.text.depth, cfg.text.num_kv_heads, cfg.text.vocab_size) == (
      "gemma", ref.text_config.hidden_size, 18, 1, ref.text_config.vocab_size)
  assert (cfg.vision.mlp_dim, cfg.vision.width, cfg.image_token_id) == (
      ref.vision_config.intermediate_size, 1152, ref.image_token_index)


@pytest.mark.skipif(not os.environ.get("PALIGEMMA_SLOW_TESTS"), reason="set PALIGEMMA_SLOW_TESTS=1 (about a minute)")
@pytest.mark.parametrize("version", [1, 2])
def test_real_widths_round_trip(tmp_path, version, convert):
  src = hf_fixtures.make_hf_paligemma(str(tmp_path / "hf"), version=version, real_widths=True,
                                      dtype=torch.bfloat16)
  config = convert(src.path, tmp_path / "out")
  assert config.variant == "custom" and config.text.vocab_size == 257216 and config.image_token_id == 257152
  params, _ = checkpoint.load(str(tmp_path / "out"))
  assert_params_equal(params, src.model, "bfloat16")
