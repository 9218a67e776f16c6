"""Mesh parsing, partition rules on every preset model (shapes only), and sharded runs against
one device: 8 CPU devices in one process (tests/sharded_check.py) and a 2-process job
(tests/multihost_check.py), both in subprocesses so that this session keeps its one device."""

import json
import math
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from configs.paligemma import get_config
from paligemma_jax import multihost
from paligemma_jax import sharding
from paligemma_jax.checkpoints import checkpoint
from paligemma_jax.model import kv_cache
from paligemma_jax.model import paligemma
from helpers import TESTS

# One xdist worker runs this module (the README's `--dist loadgroup`): its mesh subprocesses
# start once per run, not once per worker that happens to get one of its tests.
pytestmark = pytest.mark.xdist_group("mesh")

PRESETS = ("pg1-3b", "pg2-3b", "pg2-10b", "pg2-28b")


def mesh(data=1, fsdp=1, tensor=1):
  """A device-free mesh: specs can be computed for any size on one CPU."""
  return AbstractMesh((data, fsdp, tensor), sharding.AXES)


@pytest.fixture(scope="module")
def shapes():
  return {v: paligemma.param_shapes(get_config(v)) for v in PRESETS}


def flat(tree):
  return {sharding.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, P))[0]}


@pytest.mark.parametrize("spec,n,expected", [
    ("data:2,fsdp:2,tensor:2", 8, (2, 2, 2)),
    ("fsdp:4,tensor:2", 8, (1, 4, 2)),
    ("data:8", 8, (8, 1, 1)),
    ("tensor:2", 8, (1, 4, 2)),  # fsdp, unnamed, takes the rest.
    ("data:-1,tensor:2", 8, (4, 1, 2)),
    ("fsdp:2, data", 8, (4, 2, 1)),  # A bare name is -1.
    ("", 4, (1, 4, 1)),
    (None, 1, (1, 1, 1)),
    ("data:2,fsdp:2,tensor:4", 16, (2, 2, 4)),
])
def test_parse_mesh(spec, n, expected):
  assert tuple(sharding.parse_mesh(spec, n).values()) == expected


@pytest.mark.parametrize("spec,n,message", [
    ("data:3", 8, "needs 3 devices"),
    ("data:2,fsdp:2,tensor:1", 8, "needs 4 devices, but there are 8"),
    ("data:4,fsdp:4", 8, "needs 16 devices"),
    ("model:2", 8, "Unknown mesh axis 'model'"),
    ("data:2,data:4", 8, "appears twice"),
    ("data:-1,fsdp:-1", 8, "At most one mesh axis may be -1"),
    ("data:two", 8, "not an integer"),
    ("data:0", 8, "positive size"),
])
def test_parse_mesh_errors(spec, n, message):
  with pytest.raises(ValueError, match=message):
    sharding.parse_mesh(spec, n)


def test_mesh_from_string_checks_the_device_count():
  m = sharding.mesh_from_string("")
  assert m.axis_names == sharding.AXES and m.devices.size == jax.device_count()
  with pytest.raises(ValueError, match=f"but there are {jax.device_count()}"):
    sharding.mesh_from_string(f"data:{jax.device_count() + 1},fsdp:1,tensor:1")


@pytest.mark.parametrize("sizes", [(1, 16, 1), (1, 4, 4), (2, 2, 2), (1, 1, 8), (4, 8, 8), (1, 3, 1)])
def test_every_preset_leaf_has_a_valid_spec(shapes, sizes):
  m = mesh(*sizes)
  for variant, tree in shapes.items():
    specs = flat(sharding.param_specs(tree, m))  # strict: raises if a leaf has no rule.
    for path, x in flat(tree).items():
      spec = specs[path]
      assert len(spec) <= x.ndim, (variant, path, spec)
      if "/layers/" in path:
        assert not spec or spec[0] is None, f"{variant} {path}: the layer axis is split: {spec}"
      used = [a for entry in spec for a in ((entry,) if isinstance(entry, str) else entry or ())]
      assert len(used) == len(set(used)), (path, spec)
      for dim, entry in zip(x.shape, spec):  # Every split divides its dimension.
        axes = (entry,) if isinstance(entry, str) else entry or ()
        assert dim % math.prod(m.shape[a] for a in axes) == 0, (variant, path, x.shape, spec)


def test_rules_cover_each_leaf_by_name(shapes):
  for variant, tree in shapes.items():
    for path, x in flat(tree).items():
      rule = sharding.rule_for(path)
      assert rule is not None and len(rule) == x.ndim, (variant, path, rule)


@pytest.mark.parametrize("sizes", [(1, 16, 1), (1, 4, 4), (1, 2, 8)])
def test_28b_is_split_16_ways(shapes, sizes):
  """Every big matrix is split over all 16 devices, so each holds ~1/16 of the model."""
  tree = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), shapes["pg2-28b"])
  m = mesh(*sizes)
  specs = flat(sharding.param_specs(tree, m))
  for path, x in flat(tree).items():
    if x.size >= 2**22:
      axes = [a for e in specs[path] for a in ((e,) if isinstance(e, str) else e or ())]
      assert math.prod(m.shape[a] for a in axes) == 16, (path, specs[path])
  total = sum(x.size * 2 for x in jax.tree.leaves(tree))
  per_device = sharding.bytes_per_device(tree, m)
  assert total / 16 <= per_device < total / 16 * 1.01
  assert per_device < 3.5e9  # 28B in bfloat16 is 55 GB; 3.5 GB a device.


def test_specs_of_the_big_matrices(shapes):
  specs = flat(sharding.param_specs(shapes["pg2-28b"], mesh(2, 2, 2)))
  assert specs["llm/layers/attn/q/kernel"] == P(None, "fsdp", "tensor")
  assert specs["llm/layers/attn/o/kernel"] == P(None, "tensor", None, "fsdp")
  assert specs["llm/layers/mlp/gate/kernel"] == P(None, "fsdp", "tensor")
  assert specs["llm/layers/mlp/down/kernel"] == P(None, "tensor", "fsdp")
  assert specs["llm/embedder/input_embedding"] == P("tensor", "fsdp")
  assert specs["img/layers/mlp/fc1/kernel"] == P(None, "fsdp", "tensor")
  assert specs["projector/kernel"] == P("fsdp", "tensor")
  assert specs["llm/layers/pre_attention_norm/scale"] == P()
  # data-only: everything replicated.
  assert set(flat(sharding.param_specs(shapes["pg2-28b"], mesh(8, 1, 1))).values()) == {P()}


def test_indivisible_dimensions_stay_whole(shapes):
  # PaliGemma 1 has one kv head: k/v split over fsdp only; pg2-3b's 4 kv heads on tensor:8 too.
  pg1 = flat(sharding.param_specs(shapes["pg1-3b"], mesh(1, 2, 2)))
  assert pg1["llm/layers/attn/k/kernel"] == P(None, "fsdp")
  assert pg1["llm/layers/attn/q/kernel"] == P(None, "fsdp", "tensor")
  pg2 = flat(sharding.param_specs(shapes["pg2-3b"], mesh(1, 1, 8)))
  assert pg2["llm/layers/attn/k/kernel"] == P()
  assert pg2["llm/layers/attn/q/kernel"] == P(None, None, "tensor")
  # fsdp:3 divides pg2-3b's widths (2304, 1152); fsdp:5 divides nothing: all replicated.
  odd = flat(sharding.param_specs(shapes["pg2-3b"], mesh(1, 3, 1)))
  assert odd["llm/layers/attn/q/kernel"] == P(None, "fsdp")
  assert odd["llm/embedder/input_embedding"] == P(None, "fsdp")
  five = flat(sharding.param_specs(shapes["pg2-3b"], mesh(1, 5, 1)))
  assert set(five.values()) == {P()}


def test_strict_mode_names_the_unknown_leaf():
  tree = {"llm": {"adapter": {"kernel": jnp.zeros((4, 4))}}, "count": jnp.zeros(())}
  with pytest.raises(ValueError, match="llm/adapter/kernel"):
    sharding.param_specs(tree, mesh(1, 2, 2))
  assert flat(sharding.param_specs(tree, mesh(1, 2, 2), strict=False)) == {
      "llm/adapter/kernel": P(), "count": P()}


def test_optimizer_state_follows_the_parameters(shapes):
  params = shapes["pg2-10b"]
  opt = jax.eval_shape(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4)).init, params)
  state = dict(params=params, opt_state=opt, step=jax.ShapeDtypeStruct((), jnp.int32),
               rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  m = mesh(2, 2, 2)
  specs = flat(jax.tree.map(lambda s: s.spec, sharding.state_shardings(state, m)))
  param_specs = flat(sharding.param_specs(params, m))
  mu = {k.split("/mu/", 1)[1]: v for k, v in specs.items() if "/mu/" in k}
  nu = {k.split("/nu/", 1)[1]: v for k, v in specs.items() if "/nu/" in k}
  assert mu == param_specs and nu == param_specs
  assert specs["step"] == P() and specs["rng"] == P()


@pytest.mark.parametrize("variant,batch,sizes,expected", [
    ("pg2-28b", 8, (2, 2, 2), P(None, ("data", "fsdp"), None, "tensor")),
    ("pg2-28b", 2, (2, 2, 2), P(None, "data", None, "tensor")),  # The batch falls back to data.
    ("pg2-28b", 1, (1, 4, 4), P(None, None, None, "tensor")),
    ("pg1-3b", 8, (2, 2, 2), P(None, ("data", "fsdp"))),  # One kv head: not split.
])
@pytest.mark.parametrize("dtype", [None, "int8"])
def test_cache_shardings(variant, batch, sizes, expected, dtype):
  config = get_config(variant)
  cache = jax.eval_shape(lambda: paligemma.init_cache(config, batch, 64, dtype))
  shardings = sharding.cache_shardings(cache, mesh(*sizes))
  assert isinstance(shardings, kv_cache.KVCache)
  assert shardings.k.spec == expected and shardings.v.spec == expected
  assert shardings.end.spec == (P() if expected[1] is None else P(expected[1]))
  if dtype is None:
    assert shardings.k_scale is None and shardings.v_scale is None
  else:  # [L, B, S, K]: split as the keys, the head dim aside.
    assert shardings.k_scale.spec == expected and shardings.v_scale.spec == expected


def test_batch_sharding():
  m = mesh(2, 2, 2)
  assert sharding.batch_sharding((8, 300), m).spec == P(("data", "fsdp"))
  assert sharding.batch_sharding((6, 300), m).spec == P("data")
  assert sharding.batch_sharding((3, 300), m).spec == P()
  assert sharding.batch_sharding((), m).spec == P()


def test_shard_params_and_batch_on_one_device():
  config = get_config("tiny-pg2")
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), paligemma.param_shapes(config))
  m = sharding.mesh_from_string("", devices=jax.devices()[:1])
  placed = sharding.shard_params(params, m)
  assert sharding.mesh_of(placed) is m and sharding.mesh_of(jax.device_put(params)) is None
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(params)))
  batch = sharding.shard_batch({"tokens": np.arange(6).reshape(2, 3), "n": np.int32(2)}, m)
  assert batch["tokens"].sharding.mesh is m and batch["tokens"].tolist() == [[0, 1, 2], [3, 4, 5]]
  assert "MiB" in sharding.describe(params, m)


def test_host_slice_and_writer():
  items = list(range(10))
  assert multihost.host_slice(items, 0, 3) == [0, 3, 6, 9]
  assert multihost.host_slice(items, 2, 3) == [2, 5, 8]
  assert sorted(sum((multihost.host_slice(items, i, 4) for i in range(4)), [])) == items
  assert list(multihost.host_slice(iter(items), 1, 2)) == [1, 3, 5, 7, 9]  # Streams stay lazy.
  assert multihost.host_slice(items) == items  # One process: everything.
  assert multihost.is_writer()


def test_initialize_distributed(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.delenv("PALIGEMMA_DISTRIBUTED", raising=False)
  assert not multihost.initialize_distributed() and not calls
  monkeypatch.setenv("PALIGEMMA_DISTRIBUTED", "1")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert multihost.initialize_distributed()
  assert calls == [dict(num_processes=4, process_id=3)]
  monkeypatch.delenv("JAX_NUM_PROCESSES")
  monkeypatch.delenv("JAX_PROCESS_ID")
  assert multihost.initialize_distributed(True)  # TPU pods: everything auto-detected.
  assert calls[-1] == dict(num_processes=None, process_id=None)


# Sharded runs in subprocesses, started together: one process with 8 CPU devices
# (tests/sharded_check.py), and a 2-process job of 4 devices each (tests/multihost_check.py).

def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The running subprocesses: {"single": Popen, "multi": [Popen, Popen]}, and the output dir."""
  tmp = tmp_path_factory.mktemp("multihost")
  config = get_config("tiny-pg2")
  params = jax.jit(lambda rng: paligemma.init_params(config, rng))(jax.random.PRNGKey(0))
  embedder = params["llm"]["embedder"]
  embedder["input_embedding"] = embedder["input_embedding"] * 0.1  # As sharded_check.model_params.
  checkpoint.save(str(tmp / "ckpt"), params, config)
  # The 8-device process keeps a compilation cache of its own (a rerun loads its programs); the
  # 2-process job none. They compile programs over the same global device ids: sharing one
  # cache, the 8-device process at times aborted in a collective rendezvous (its devices at
  # different collectives), as if it had loaded a program compiled for the 2-process job.
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false")
  own_cache = dict(JAX_ENABLE_COMPILATION_CACHE="true", JAX_COMPILATION_CACHE_DIR=os.path.join(
      os.environ.get("JAX_COMPILATION_CACHE_DIR", str(tmp)), "sharded_check"))  # Its own.
  run = lambda script, args=(), **extra: subprocess.Popen(
      [sys.executable, os.path.join(TESTS, script), *args], env=dict(env, **extra),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  coordinator = f"localhost:{_free_port()}"
  procs = dict(single=run("sharded_check.py", **own_cache), multi=[
      run("multihost_check.py", (str(tmp / "ckpt"), str(tmp)), PALIGEMMA_DISTRIBUTED="1",
          JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
      for i in range(2)])
  yield procs, tmp
  for p in [procs["single"], *procs["multi"]]:
    if p.poll() is None:
      p.kill()


def _wait(proc, timeout=1500):
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  assert proc.returncode == 0, err[-5000:]
  return out


@pytest.fixture(scope="module")
def sharded_results(runs):
  return json.loads(_wait(runs[0]["single"]).strip().splitlines()[-1])


@pytest.fixture(scope="module")
def multihost_results(runs):
  procs, tmp = runs
  outs = [_wait(p) for p in procs["multi"]]
  assert all(f"process {i} done" in out for i, out in enumerate(outs))
  assert sorted(os.listdir(tmp)) == ["ckpt", "result.json"]  # Only the writer wrote.
  with open(tmp / "result.json") as f:
    return json.load(f)


def test_two_process_job_matches_one_device(multihost_results):
  r = multihost_results
  assert r["distributed"] and r["process_count"] == 2 and r["writer"] == 0
  assert r["device_count"] == 8 and r["local_device_count"] == 4
  assert r["split_across_processes"]  # No process holds a whole split parameter.
  assert r["tokens_equal"] and r["logprob_diff"] < 1e-5
  t = r["train"]
  assert t["rows"] == 4  # Each process fed its own half of the batch.
  assert abs(t["loss"] - t["ref_loss"]) < 1e-5 * t["ref_loss"] and t["params_diff"] < 1e-5


RUNS = ("tiny-pg2 data:8", "tiny-pg2 fsdp:4,tensor:2", "tiny-pg2 data:2,fsdp:2,tensor:2",
        "tiny-pg1 data:2,fsdp:2,tensor:2")


@pytest.mark.parametrize("run", RUNS)
def test_sharded_restore(sharded_results, run):
  r = sharded_results[run]
  assert r["restored_as_specified"] and r["restore_diff"] == 0.0
  assert r["split_leaves"] == (0 if "data:8" in run else 21)


@pytest.mark.parametrize("run", RUNS)
def test_sharded_generate_matches_one_device(sharded_results, run):
  r = sharded_results[run]
  assert r["mesh_detected"] and r["out_spec"] == "P()"
  assert r["generate"]["greedy"]["tokens_equal"], r["generate"]
  if run.endswith("data:2,fsdp:2,tensor:2"):
    assert "greedy_stacked_layers" in r["generate"]
  if run == "tiny-pg2 data:2,fsdp:2,tensor:2":
    assert "greedy_int8_cache" in r["generate"]
    assert r["int8_cache_specs"] == ["P(None, ('data', 'fsdp'), None, 'tensor')"] * 2, r
  for name, g in r["generate"].items():
    assert g["tokens_equal"], (name, g)
    # int8 cache: a key or value the split computes 1e-7 apart may round to the next int8 step.
    assert g["logprob_diff"] < (1e-3 if name == "greedy_int8_cache" else 1e-5), (name, g)
  if run.endswith("data:2,fsdp:2,tensor:2") and "pg2" in run:
    tokens = np.array(r["generate"]["top_k"]["tokens"])
    assert len(np.unique(tokens)) > 10  # Sampling really samples: the check is not vacuous.


@pytest.mark.parametrize("run", RUNS[2:])
def test_sharded_score_splits_its_batch_and_matches_one_device(sharded_results, run):
  r = sharded_results[run]["score"]
  assert r["mesh_detected"] and r["diff"] < 1e-5, r
  # (prompt tokens, images, prompt mask, suffix tokens, suffix mask, source): 4 prompts and
  # 8 rows, each split over data x fsdp.
  assert r["batch_specs"] == ["P(('data', 'fsdp'),)"] * 6, r


def test_a_generator_follows_its_parameters_to_a_new_mesh(sharded_results):
  r = sharded_results["remesh"]
  assert r["tokens_equal"] == [True, True] and r["mesh_followed"], r
  assert r["cache_spec"] == "P(None, 'fsdp', None, 'tensor')", r


@pytest.mark.parametrize("run,expected", [
    ("tiny-pg2 data:8", "P(None, 'data')"),
    ("tiny-pg2 fsdp:4,tensor:2", "P(None, 'fsdp', None, 'tensor')"),
    ("tiny-pg2 data:2,fsdp:2,tensor:2", "P(None, ('data', 'fsdp'), None, 'tensor')"),
    ("tiny-pg1 data:2,fsdp:2,tensor:2", "P(None, ('data', 'fsdp'))"),
])
def test_sharded_cache_layout(sharded_results, run, expected):
  assert sharded_results[run]["cache_spec"] == expected


@pytest.mark.parametrize("run", RUNS[:3])
def test_sharded_train_step_matches_one_device(sharded_results, run):
  for preset, t in sharded_results[run]["train"].items():
    assert abs(t["loss"] - t["ref_loss"]) < 1e-5 * abs(t["ref_loss"]), (preset, t)
    assert t["params_diff"] < 1e-5, (preset, t)
    assert t["update_size"] > 1e-3, (preset, t)  # The step changed the parameters.
  assert set(sharded_results[run]["train"]) == ({"all", "lora"} if "data:2" in run else {"all"})
