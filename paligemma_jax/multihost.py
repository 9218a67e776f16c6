"""Multi-host jobs (TPU pod slices, several GPU hosts): every process runs the same program.

Call `initialize_distributed()` first, before anything touches a device; every process then
sees the global mesh. `host_slice` gives each process its share of a dataset, `is_writer` picks
the one process that writes outputs and logs, `fetch` reads results on every process and `sync`
is a barrier. With one process all of these are no-ops.
"""

import itertools
import os
from typing import Iterable, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np


def initialize_distributed(enabled: bool | None = None) -> bool:
  """Joins the processes of a multi-host job (call before anything touches a device).

  enabled=None reads $PALIGEMMA_DISTRIBUTED (1/true). `jax.distributed.initialize` finds the
  coordinator itself on Cloud TPU, SLURM, Open MPI and Kubernetes; elsewhere set
  $JAX_COORDINATOR_ADDRESS (host:port of process 0), $JAX_NUM_PROCESSES and $JAX_PROCESS_ID.
  Returns whether the job is distributed.
  """
  if enabled is None:
    enabled = os.environ.get("PALIGEMMA_DISTRIBUTED", "").lower() in ("1", "true", "yes")
  if enabled and not jax.distributed.is_initialized():
    env = lambda name: int(os.environ[name]) if os.environ.get(name) else None
    jax.distributed.initialize(num_processes=env("JAX_NUM_PROCESSES"),
                               process_id=env("JAX_PROCESS_ID"))
  return bool(enabled)


def host_slice(items: Iterable, index: int | None = None, count: int | None = None):
  """This process's share of `items`: every `count`-th item from `index` (a list for sequences,
  else a lazy iterator). Hosts must run the same number of steps: repeat or pad the data."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  if isinstance(items, Sequence):
    return list(items[index::count])
  return itertools.islice(items, index, None, count)


def is_writer() -> bool:
  """Whether this process writes outputs (files, logs): process 0."""
  return jax.process_index() == 0


def fetch(tree):
  """Host numpy copies of (possibly multi-host) arrays, on every process: a replicated array is
  read from a local device, a split one gathered from all processes."""
  def get(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(get, tree)


def sync(name: str):
  """A barrier across the processes of a multi-host job (nothing to wait for in one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
