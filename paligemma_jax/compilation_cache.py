"""A persistent XLA compilation cache for the command-line tools, so a second run compiles nothing.

  default   $JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/paligemma_jax/xla
            (XDG_CACHE_HOME defaults to ~/.cache)
  --compilation_cache=PATH   another folder; --compilation_cache= (empty) turns it off

JAX only writes programs that took at least a second to compile by default; the decode loop of a
small model compiles faster than that but is compiled on every run, so every program is kept.
"""

import os

import jax

ENV = "JAX_COMPILATION_CACHE_DIR"


def default_dir() -> str:
  """$JAX_COMPILATION_CACHE_DIR, else the user's cache folder (XDG_CACHE_HOME or ~/.cache)."""
  if ENV in os.environ:
    return os.environ[ENV]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "paligemma_jax", "xla")


def enable(path: str | None):
  """Caches every compiled program under `path`; a false `path` (or
  JAX_ENABLE_COMPILATION_CACHE=false) turns the cache off."""
  if not path or os.environ.get("JAX_ENABLE_COMPILATION_CACHE", "").lower() in ("0", "false"):
    jax.config.update("jax_enable_compilation_cache", False)
    return
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
