"""One process of a 2-process CPU job (4 devices each, Gloo collectives), as on a 2-host pod.

  PALIGEMMA_DISTRIBUTED=1 JAX_COORDINATOR_ADDRESS=localhost:PORT JAX_NUM_PROCESSES=2 \\
  JAX_PROCESS_ID=i python tests/multihost_check.py CHECKPOINT_DIR OUT_DIR

Each process restores the checkpoint onto the global data:2,fsdp:2,tensor:2 mesh, generates for
the same global batch, and trains one step on its own half of the batch (`host_slice`). The
writer (process 0) compares the results with one local device's and writes OUT_DIR/result.json;
the other process computes no reference (its comparisons were never read).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sharded_check  # noqa: E402  (no jax import before the device flags)

sharded_check.use_cpu_devices(4)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from paligemma_jax import multihost
from paligemma_jax import sharding
from paligemma_jax.checkpoints import checkpoint  # noqa: E402
from paligemma_jax.decoding import sampling

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(ckpt, out_dir):
  distributed = multihost.initialize_distributed()
  r = dict(distributed=distributed, process_count=jax.process_count(), device_count=jax.device_count(),
           local_device_count=jax.local_device_count())
  params, config = checkpoint.load(ckpt)  # One local device: the reference.
  batch = sharded_check.inputs(config, 0)
  if multihost.is_writer():  # Only the writer's comparisons are kept: the others skip the reference.
    reference = sharded_check.generate(config, params, batch, sampling.Sampler())[0]
    ref_loss, ref_params = sharded_check.train_step(config, params, batch, "all")

  mesh = sharding.mesh_from_string("data:2,fsdp:2,tensor:2")
  sharded = sharded_check.restore(ckpt, mesh)
  split = [x for x in jax.tree.leaves(sharded) if not x.sharding.is_fully_replicated]
  r["split_across_processes"] = bool(split) and not any(x.is_fully_addressable for x in split)
  out = sharded_check.generate(config, sharded, batch, sampling.Sampler())[0]  # Same batch everywhere.
  if multihost.is_writer():
    r["tokens_equal"] = bool(np.array_equal(out.tokens, reference.tokens))
    r["logprob_diff"] = float(np.max(np.abs(out.logprobs - reference.logprobs)))

  rows = multihost.host_slice(range(len(batch["tokens"])))  # This process's rows.
  local = {k: v[np.asarray(rows)] for k, v in batch.items()}
  loss, new_params = sharded_check.train_step(config, params, local, "all", mesh, process_local=True)
  new_params = multihost_utils.process_allgather(new_params, tiled=True)
  r["writer"] = jax.process_index()
  if multihost.is_writer():
    r["train"] = dict(loss=loss, ref_loss=ref_loss, rows=len(rows),
                      params_diff=sharded_check.max_diff(new_params, ref_params))
    with open(os.path.join(out_dir, "result.json"), "w") as f:
      json.dump(r, f)
  print(f"process {jax.process_index()} done", flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
