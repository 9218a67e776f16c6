"""The persistent compilation cache: where it lives, and that a second run of a program compiles
nothing (one pair of small processes through cli.run)."""

import json
import os
import subprocess
import sys

import jax

from paligemma_jax import compilation_cache
from helpers import ROOT


# A cli.run program that compiles two small functions (each well under JAX's default 1 s
# threshold) and prints what the compilation cache saw.
_PROGRAM = """
import json, jax, jax.numpy as jnp
from paligemma_jax import cli
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
def main(argv):
  jax.block_until_ready(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))))
  jax.block_until_ready(jax.jit(lambda x: jnp.cumsum(x) * 3)(jnp.arange(5)))
  print(json.dumps({k: events.count("/jax/compilation_cache/" + k)
                    for k in ("compile_requests_use_cache", "cache_hits", "cache_misses")}))
cli.run(main)
"""


def test_default_dir_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.delenv(compilation_cache.ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compilation_cache.default_dir() == str(tmp_path / "paligemma_jax" / "xla")
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert compilation_cache.default_dir() == str(tmp_path / "home" / ".cache" / "paligemma_jax" / "xla")
  monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "env"))
  assert compilation_cache.default_dir() == str(tmp_path / "env")


def test_empty_path_turns_it_off():
  before = {k: getattr(jax.config, k) for k in ("jax_enable_compilation_cache",
                                                 "jax_compilation_cache_dir")}
  try:
    compilation_cache.enable("")
    assert not jax.config.jax_enable_compilation_cache
  finally:
    for k, v in before.items():
      jax.config.update(k, v)


def _run(cache_dir, *flags):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop(compilation_cache.ENV, None)  # The flag alone decides.
  env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
  done = subprocess.run([sys.executable, "-c", _PROGRAM, f"--compilation_cache={cache_dir}",
                         *flags], env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_run_compiles_nothing(tmp_path):
  cache = tmp_path / "xla"
  first = _run(cache)
  assert first["compile_requests_use_cache"] >= 2 and first["cache_hits"] == 0, first
  assert len(os.listdir(cache)) >= 2  # Even sub-second compiles are kept.
  second = _run(cache)
  assert second["cache_hits"] == second["compile_requests_use_cache"] >= 2, second
  assert second["cache_misses"] == 0, second
