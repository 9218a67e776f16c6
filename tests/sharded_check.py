"""Sharded vs one-device runs of a tiny PaliGemma on 8 simulated CPU devices; prints JSON.

Run as a subprocess (tests/test_sharding.py): the device count is fixed when jax starts, so
XLA_FLAGS must be set before the import, and the rest of the test session keeps one device.
tests/multihost_check.py reuses the helpers.

  python tests/sharded_check.py [MESH ...]
"""

import os
import sys


def use_cpu_devices(count):
  """Before jax is imported: `count` CPU devices; less LLVM optimisation halves the compile
  time, which dominates these runs."""
  os.environ["XLA_FLAGS"] = " ".join([
      os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={count}",
      "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"])
  os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
  use_cpu_devices(8)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import functools  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import finetune as finetune_config  # noqa: E402
from configs.paligemma import get_config  # noqa: E402
from paligemma_jax import sharding  # noqa: E402
from paligemma_jax.checkpoints import checkpoint  # noqa: E402
from paligemma_jax.decoding import autoregressive
from paligemma_jax.decoding import core
from paligemma_jax.decoding import sampling
from paligemma_jax.decoding import scoring
from paligemma_jax.model import paligemma
from paligemma_jax.training import objective

MESHES = ("data:8", "fsdp:4,tensor:2", "data:2,fsdp:2,tensor:2")
BATCH, PROMPT, SUFFIX, NEW_TOKENS = 8, 6, 5, 6


def inputs(config, rng):
  """A right-padded batch of image + prompt (+ suffix for training) rows of different lengths."""
  n = paligemma.num_image_tokens(config)
  r = np.random.default_rng(rng)
  t = n + 1 + PROMPT + SUFFIX
  tokens = r.integers(5, config.image_token_id, (BATCH, t)).astype(np.int32)
  tokens[:, :n], tokens[:, n] = config.image_token_id, 2
  lengths = t - r.integers(0, 3, BATCH)  # Some rows are shorter: padding must stay per row.
  input_mask = np.arange(t)[None] < lengths[:, None]
  prefix_mask = np.broadcast_to(np.arange(t) < n + 1 + PROMPT, (BATCH, t)) & input_mask
  s = config.vision.image_size
  images = r.uniform(-1, 1, (BATCH, s, s, 3)).astype(np.float32)
  return dict(tokens=tokens * input_mask, images=images, input_mask=input_mask, prefix_mask=prefix_mask)


def prompt_inputs(config, batch):
  """(tokens, images, input_mask, prefix_mask) of the prompts alone (no suffix columns)."""
  n = paligemma.num_image_tokens(config) + 1 + PROMPT
  return (batch["tokens"][:, :n], batch["images"], batch["input_mask"][:, :n],
          batch["prefix_mask"][:, :n])


def generate(config, params, batch, sampler, mesh=None, scan_layers=None, generator=None,
             cache_dtype=None):
  """(Generation, the generator): a new one unless `generator` is given."""
  generator = generator or autoregressive.Generator(
      params, config, mesh=mesh, scan_layers=scan_layers, cache_dtype=cache_dtype)
  out = generator.generate(*prompt_inputs(config, batch), max_new_tokens=NEW_TOKENS,
                           sampler=sampler, rng=jax.random.PRNGKey(7))
  return out, generator


def restore(directory, mesh):
  """The converted checkpoint's parameters, each device restoring only its own slices."""
  shapes = paligemma.param_shapes(checkpoint.load_config(directory))
  return checkpoint.load(directory, shardings=sharding.param_shardings(shapes, mesh))[0]


def cache_spec(generator, config, batch, field="k"):
  """The PartitionSpecs the compiled prefill gives the KV cache's `field` (k, or an int8 cache's
  k_scale) and the generated tokens."""
  prefill, _ = generator.compiled(NEW_TOKENS)
  args = sharding.shard_batch(prompt_inputs(config, batch), generator.mesh)
  keys = core.row_keys(jax.random.PRNGKey(0), range(args[0].shape[0]))
  # Placed as Generator.generate places them: the prefill it compiled runs, none compiles anew.
  keys, settings = jax.device_put((keys, sampling.Sampler().as_arrays()),
                                  sharding.replicated(generator.mesh))
  state = prefill(generator.params, *args, keys, settings, image_index=None)
  return str(getattr(state.rows.cache, field).sharding.spec), str(state.tokens.sharding.spec)


def remesh(config, params, batch, reference):
  """One generator whose parameters move from a data:8 mesh to fsdp:4,tensor:2 (fine-tuning's
  evaluation sets new parameters): it follows them, compiled for the new mesh."""
  first, second = (sharding.mesh_from_string(s) for s in ("data:8", "fsdp:4,tensor:2"))
  out, generator = generate(config, sharding.shard_params(params, first), batch, SAMPLERS["greedy"])
  equal = [bool(np.array_equal(out.tokens, reference.tokens))]
  generator.params = sharding.shard_params(params, second)
  out, _ = generate(config, None, batch, SAMPLERS["greedy"], generator=generator)
  equal.append(bool(np.array_equal(out.tokens, reference.tokens)))
  return dict(tokens_equal=equal, mesh_followed=generator.mesh is second,
              cache_spec=cache_spec(generator, config, batch)[0])


def score(config, params, batch, mesh=None):
  """Suffix log-probs of the batch's rows, two rows per prompt (4 prompts, 8 rows), and the
  PartitionSpecs of the placed scoring batch."""
  rows = []
  for i, n in enumerate(batch["input_mask"].sum(1)):
    prefix_mask = batch["prefix_mask"][i, :n]
    rows.append((batch["tokens"][i, :n], prefix_mask, int(n - prefix_mask.sum()),
                 [batch["images"][i // 2]], i // 2))
  scorer = scoring.Scorer(params, config, None, batch_size=BATCH, mesh=mesh)
  placed = [x for x in scorer.batch(rows) if x is not None]  # image_index: None, one per row.
  specs = [str(x.sharding.spec) for x in placed] if scorer.mesh else None
  return scorer.logprobs(rows), specs, scorer.mesh


def train_step(config, params, batch, preset, mesh=None, process_local=False):
  """One `objective.train_step` (finetune preset `preset`); with a mesh, the train state, the
  frozen parameters and the batch (this process's rows if `process_local`) are sharded
  explicitly and the new state keeps its shardings."""
  cfg = finetune_config.get_config(preset)
  # eps: Adam's first step is lr * g / (|g| + eps); the default 1e-8 would turn float noise in
  # near-zero gradients into full-size updates of either sign.
  cfg.schedule, cfg.warmup_percent, cfg.lr, cfg.eps = "constant", 0.0, 0.05, 1e-3
  parametrization, trainable, frozen = objective.init_trainable(cfg, params, jax.random.PRNGKey(1),
                                                               jnp.float32)
  tx, schedule = objective.make_optimizer(cfg)
  state = objective.init_state(trainable, tx, jax.random.PRNGKey(2))
  batch = dict(batch, loss_mask=batch["input_mask"] & ~batch["prefix_mask"])
  step = functools.partial(objective.train_step, model=paligemma.PaliGemma(config),
                           parametrization=parametrization, tx=tx, schedule=schedule)
  if mesh is None:
    state, metrics = jax.jit(step)(state, frozen, batch)
  else:
    shardings = sharding.state_shardings(state, mesh)
    # From host copies: device_put may reuse `params`' buffers, and the state is donated.
    state = jax.device_put(jax.tree.map(np.asarray, state), shardings)
    frozen = sharding.shard_params(jax.tree.map(np.asarray, frozen), mesh)
    state, metrics = jax.jit(step, out_shardings=(shardings, sharding.replicated(mesh)),
                             donate_argnums=0)(state, frozen, sharding.shard_batch(batch, mesh, process_local))
    assert all(x.sharding == s for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))
  return float(metrics["loss"]), parametrization.full(state["params"], frozen)


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def model_params(config):
  """Random parameters with a smaller embedding table, so that the next-token distributions
  are spread out (sampling has choices, log-probabilities are far from 0)."""
  # Jitted: op by op, the initializers compile one small program each (4 s a model).
  params = jax.jit(lambda rng: paligemma.init_params(config, rng))(jax.random.PRNGKey(0))
  table = params["llm"]["embedder"]["input_embedding"]
  return {**params, "llm": {**params["llm"], "embedder": {"input_embedding": table * 0.1}}}


SAMPLERS = dict(greedy=sampling.Sampler(), top_k=sampling.Sampler("top_k", top_k=20))


def main(meshes):
  """Per (variant, mesh): restore, generation and training results next to one device's."""
  assert jax.device_count() == 8, jax.devices()
  results = {}
  for variant, variant_meshes in (("tiny-pg2", meshes), ("tiny-pg1", meshes[-1:])):
    config = get_config(variant)  # tiny-pg1 has one kv head: the cache cannot split over tensor.
    params, batch = model_params(config), inputs(config, 0)
    last = variant_meshes[-1]
    samplers = {k: v for k, v in SAMPLERS.items() if k == "greedy" or variant == "tiny-pg2"}
    presets = ("all", "lora") if variant == "tiny-pg2" else ()
    reference, generator = {}, None
    for name, sampler in samplers.items():
      reference[name], generator = generate(config, params, batch, sampler, generator=generator)
    ref_train = {p: train_step(config, params, batch, p) for p in presets}
    with tempfile.TemporaryDirectory() as tmp:
      checkpoint.save(os.path.join(tmp, "ckpt"), params, config)
      for spec in variant_meshes:
        mesh = sharding.mesh_from_string(spec)
        sharded = restore(os.path.join(tmp, "ckpt"), mesh)
        expected = jax.tree.leaves(sharding.param_shardings(params, mesh))
        r = dict(restored_as_specified=all(x.sharding == s for x, s in zip(jax.tree.leaves(sharded), expected)),
                 restore_diff=max_diff(sharded, params),
                 split_leaves=sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded)),
                 generate={}, train={})
        # Greedy on every mesh; on the last, every sampler and the stacked-layer weight layout
        # (the GPU/TPU default) too.
        runs = [(name, sampler, None) for name, sampler in samplers.items()
                if name == "greedy" or spec == last]
        runs += [("greedy_stacked_layers", SAMPLERS["greedy"], True)] if spec == last else []
        generators = {}  # By weight layout: the samplers share one (their settings are traced).
        for name, sampler, scan_layers in runs:
          # Mesh taken from the params.
          out, generator = generate(config, sharded, batch, sampler, scan_layers=scan_layers,
                                    generator=generators.get(scan_layers))
          generators[scan_layers] = generator
          ref = reference[name.removesuffix("_stacked_layers")]
          r["generate"][name] = dict(
              tokens_equal=bool(np.array_equal(out.tokens, ref.tokens)), tokens=out.tokens.tolist(),
              logprob_diff=float(np.max(np.abs(out.logprobs - ref.logprobs))))
        r["mesh_detected"] = generator.mesh is mesh
        r["cache_spec"], r["out_spec"] = cache_spec(generator, config, batch)
        if spec == last and variant == "tiny-pg2":  # An int8 cache: its scales split as the keys.
          ref, _ = generate(config, params, batch, SAMPLERS["greedy"], cache_dtype="int8")
          out, generator = generate(config, sharded, batch, SAMPLERS["greedy"], cache_dtype="int8")
          r["generate"]["greedy_int8_cache"] = dict(
              tokens_equal=bool(np.array_equal(out.tokens, ref.tokens)), tokens=out.tokens.tolist(),
              logprob_diff=float(np.max(np.abs(out.logprobs - ref.logprobs))))
          r["int8_cache_specs"] = [cache_spec(generator, config, batch, field)[0]
                                   for field in ("k", "k_scale")]
        if spec == last:  # Scoring, its mesh taken from the params.
          ref_score = score(config, params, batch)[0]
          logprobs, specs, score_mesh = score(config, sharded, batch)
          r["score"] = dict(mesh_detected=score_mesh is mesh, batch_specs=specs,
                            diff=max_diff(logprobs, ref_score))
        for preset in presets:
          if preset != "all" and spec != last:
            continue
          loss, new_params = train_step(config, params, batch, preset, mesh)
          ref_loss, ref_params = ref_train[preset]
          r["train"][preset] = dict(loss=loss, ref_loss=ref_loss, params_diff=max_diff(new_params, ref_params),
                                    update_size=max_diff(ref_params, params))
        results[f"{variant} {spec}"] = r
    if variant == "tiny-pg2":
      results["remesh"] = remesh(config, params, batch, reference["greedy"])
  print(json.dumps(results))


if __name__ == "__main__":
  main(tuple(sys.argv[1:]) or MESHES)
