"""Fine-tuning as one library call: `train(config, base=..., train_jsonl=..., workdir=...)`.

  validate     every argument and config value (`validate_config`), before anything loads
  _setup       the base model as frozen parameters, the data, what trains, the optimizer state,
               placed on one device or sharded over a mesh
  _resume      the latest checkpoint of the workdir, if there is one (see workdir.py)
  _run_steps   the step loop: metrics, logs, checkpoints, held-out evaluation (HeldOutEvaluator)
  _export      the trained model, LoRA merged, as a checkpoint `generate` loads, or (export_format
               "hf") as a Hugging Face directory transformers loads (hf_export.py)

Everything that decides the next step (trainable parameters, optimizer state, step, PRNG key,
data position) is checkpointed, and the data stream is a pure function of (seed, position), so
a resumed run continues exactly where an uninterrupted one would be. On a multi-host job every
process calls `train` with the same arguments; only `multihost.is_writer()` writes files and logs.
"""

import dataclasses
import os
import re
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax
import tqdm

from paligemma_jax import errors
from paligemma_jax import files
from paligemma_jax import multihost
from paligemma_jax import sharding
from paligemma_jax.checkpoints import checkpoint
from paligemma_jax.checkpoints import hf_config
from paligemma_jax.checkpoints import hf_export
from paligemma_jax.checkpoints import loading
from paligemma_jax.decoding import inference
from paligemma_jax.decoding import sampling
from paligemma_jax.model import paligemma
from paligemma_jax.model import quantize
from paligemma_jax.preprocess.tokenizer import Tokenizer
from paligemma_jax.training import data
from paligemma_jax.training import objective
from paligemma_jax.training import workdir as workdir_lib

# Numeric config fields (dotted paths) and their smallest usable values.
_MINIMUM = {"total_steps": 1, "batch_size": 1, "accum_steps": 1, "max_text_len": 1,
            "lora.rank": 1, "num_threads": 1, "log_every": 1, "checkpoint_every": 1,
            "keep_checkpoints": 1, "eval_every": 0, "eval_batch_size": 1,
            "eval_max_new_tokens": 1, "eval_num_generate": 0, "lr": 0, "eps": 0,
            "weight_decay": 0, "momentum": 0, "end_lr_factor": 0, "grad_clip": 0}
_MAXIMUM_INT = 2**31 - 1  # Steps, sizes and counts become int32 on the device (the schedule's).
_FRACTIONS = ("warmup_percent", "b1", "b2")
EXPORT_FORMATS = ("orbax", "hf")  # A converted checkpoint; a Hugging Face directory.


def _info(*args):
  """Logs on the writing process only (every host of a multi-host job runs the same steps)."""
  if multihost.is_writer():
    logging.info(*args)


def _field(config: ml_collections.ConfigDict, name: str):
  for key in name.split("."):
    config = config[key]
  return config


def validate_config(config: ml_collections.ConfigDict):
  """Raises InputError naming `--config.FIELD` for the first value a run could not use."""
  for name, low in _MINIMUM.items():
    value = _field(config, name)
    if not value >= low:  # `not >=` also rejects NaN.
      raise errors.InputError(f"--config.{name}={value}: must be at least {low}.")
    if isinstance(value, int) and value > _MAXIMUM_INT:
      raise errors.InputError(f"--config.{name}={value}: must be at most {_MAXIMUM_INT}.")
  if not sampling.SEED_RANGE[0] <= config.seed <= sampling.SEED_RANGE[1]:  # jax.random.PRNGKey's.
    raise errors.InputError(f"--config.seed={config.seed}: must be in [{sampling.SEED_RANGE[0]}, "
                            f"{sampling.SEED_RANGE[1]}] (an int64).")
  for name in _FRACTIONS:
    if not 0 <= _field(config, name) <= 1:
      raise errors.InputError(f"--config.{name}={_field(config, name)}: must be in [0, 1].")
  if config.batch_size % config.accum_steps:
    raise errors.InputError(f"--config.batch_size={config.batch_size} is not a multiple of "
                            f"--config.accum_steps={config.accum_steps}.")
  for name, choices in (("optimizer", objective.OPTIMIZERS), ("schedule", objective.SCHEDULES),
                        ("dtype", ("",) + hf_config.DTYPES),
                        ("param_dtype", ("",) + hf_config.DTYPES),
                        ("quantize", ("",) + tuple(quantize.QTYPES)),
                        ("export_quantize", ("",) + tuple(quantize.QTYPES))):
    if config[name] not in choices:
      raise errors.InputError(f"--config.{name}={config[name]!r}: choose one of "
                              f"{', '.join(map(repr, choices))}.")
  for name in ("trainable", "lora.targets"):  # Preset names are regular expressions too.
    try:
      re.compile(_field(config, name))
    except re.error as e:
      raise errors.InputError(f"--config.{name}={_field(config, name)!r} is not a preset or a "
                              f"regular expression: {e}.") from None
  if config.quantize and objective.trainable_regex(config.trainable) is not None:
    raise errors.InputError(f"--config.quantize={config.quantize}: a quantized base trains only "
                            "through LoRA adapters (--config=configs/finetune.py:qlora).")
  if config.image_root and not os.path.isdir(config.image_root):
    raise errors.InputError(f"--config.image_root={config.image_root}: no such directory.")


def validate(config: ml_collections.ConfigDict, *, base: str, train_jsonl: str, workdir: str,
             eval_jsonl: str | None = None, export_dir: str | None = None,
             max_steps_this_run: int | None = None, export_format: str = "orbax"):
  """Everything `train` is given, checked before it loads anything; InputError names the flag."""
  validate_config(config)
  if export_format not in EXPORT_FORMATS:
    raise errors.InputError(f"--export_format={export_format}: choose one of {EXPORT_FORMATS}.")
  loading.checkpoint_kind(base)
  files.check_readable("train_jsonl", train_jsonl)
  files.check_readable("eval_jsonl", eval_jsonl or None)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.InputError(f"--workdir={workdir} exists and is not a directory.")
  if config.export_quantize and export_format == "hf":
    raise errors.InputError(f"--config.export_quantize={config.export_quantize}: the Hugging Face "
                            "export is a float model; quantized exports are converted checkpoints.")
  if export_dir and os.path.exists(export_dir):
    raise errors.InputError(f"--export_dir={export_dir} already exists; refusing to overwrite it.")
  if export_dir:
    checkpoint.check_new(export_dir)  # Not under a file: found now, not after the training.
  if max_steps_this_run is not None and max_steps_this_run < 1:
    raise errors.InputError(f"--max_steps_this_run={max_steps_this_run}: must be at least 1.")


class HeldOutEvaluator:
  """Held-out loss over every usable example, and greedy exact match of the generated text
  against the suffix on the first `eval_num_generate` of them."""

  def __init__(self, records: list[data.Record], layout: data.Layout,
               config: ml_collections.ConfigDict, model: paligemma.PaliGemma,
               tokenizer: Tokenizer, parametrization: objective.Parametrization, mesh=None):
    self.records, self.layout, self.config, self.mesh = records, layout, config, mesh
    self.model, self.tokenizer, self.parametrization = model, tokenizer, parametrization
    self.loss_fn = jax.jit(lambda t, f, b: objective.eval_step(
        t, f, b, model=model, parametrization=parametrization, max_text_len=layout.max_text_len))
    self.predictor = None  # Built on first use, from the first parameters it sees.

  def __call__(self, trainable, frozen) -> dict:
    total, count = 0.0, 0.0
    for batch in data.eval_batches(self.records, self.layout, self.config.eval_batch_size,
                                   self.config.num_threads):
      if self.mesh is not None:
        batch = sharding.shard_batch(batch, self.mesh)
      loss_sum, n = multihost.fetch(self.loss_fn(trainable, frozen, batch))
      total, count = total + float(loss_sum), count + float(n)
    eval_loss = total / count if count else float("nan")  # NaN, not 0 (a perfect loss).
    if not self.config.eval_num_generate:  # No generation: no merged float model is built.
      return dict(eval_loss=eval_loss, eval_exact_match=float("nan"), eval_examples=0)
    # In the frozen weights' dtype, as exported: LoRA merged without float32 copies (the float
    # model, also over a quantized base: generation then holds the dequantized weights).
    params = self.parametrization.full(trainable, frozen,
                                       dtype=jnp.dtype(self.model.config.param_dtype))
    if self.predictor is None:
      self.predictor = inference.Predictor(params, paligemma.float_config(self.model.config),
                                           self.tokenizer,
                                           batch_size=self.config.eval_batch_size,
                                           num_threads=self.config.num_threads)
    self.predictor.generator.params = params  # Same shapes every time: compiled once.
    chosen = self.records[:self.config.eval_num_generate]
    examples = [inference.Example(prompt=r.prefix, images=r.images) for r in chosen]
    hits, scored = 0, 0
    for record, result in zip(chosen, self.predictor.predict(
        examples, max_new_tokens=self.config.eval_max_new_tokens)):
      if "error" in result:
        continue
      scored += 1
      hits += result["text"].strip() == record.suffix.strip()
      if scored <= 3:
        _info("eval %s: %r -> %r (target %r)", record.where, record.prefix, result["text"],
              record.suffix)
    return dict(eval_loss=eval_loss, eval_exact_match=hits / max(scored, 1), eval_examples=scored)


@dataclasses.dataclass
class _Run:
  """What the steps, the evaluation and the export need; built once by `_setup`."""
  model: paligemma.PaliGemma
  tokenizer: Tokenizer
  layout: data.Layout
  train_records: list[data.Record]
  eval_records: list[data.Record]
  parametrization: objective.Parametrization
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  frozen: dict
  state_shardings: dict | None  # None on one device.


def _read_examples(path: str, flag: str, config, tokenizer: Tokenizer, layout: data.Layout):
  records = data.read_jsonl(path, tokenizer, layout, config.image_root)
  if not records:
    raise errors.InputError(f"{flag}={path} has no usable example (the bad lines are listed "
                            "above).")
  return records


def _place(state, frozen, mesh):
  """(state, frozen, state shardings) committed where the step's outputs go, so the step
  compiles once: one device, or their shards over the mesh."""
  if mesh is None:
    state, frozen = jax.device_put((state, frozen), jax.local_devices()[0])
    return state, frozen, None
  state_shardings = sharding.state_shardings(state, mesh)
  state, frozen = jax.device_put(state, state_shardings), sharding.shard_params(frozen, mesh)
  _info("Sharded over %s: %.1f MiB of training state and frozen parameters per device.",
        dict(mesh.shape), (sharding.bytes_per_device(state, mesh, strict=False)
                           + sharding.bytes_per_device(frozen, mesh)) / 2**20)
  return state, frozen, state_shardings


def _setup(config, base: str, train_jsonl: str, eval_jsonl: str | None, mesh):
  """(_Run, initial state): the base loaded in the frozen dtype, the data read and tokenised,
  the trainable parameters split off (float32) and their optimizer state."""
  # As stored: trainable parameters become float32 from the checkpoint's values, not from a
  # bfloat16 rounding of them; the frozen ones are cast to param_dtype.
  param_dtype = config.param_dtype or loading.default_dtype()
  params, model_config, tokenizer = loading.load_model(
      base, dtype=config.dtype or loading.default_dtype(), param_dtype=loading.STORED, mesh=mesh,
      remat=config.remat, quantize=config.quantize or None)
  if quantize.enabled(model_config) and not objective.Parametrization.from_config(config).use_lora:
    raise errors.InputError(  # Quantized weights have no gradients: only adapters can train.
        f"{base} holds {quantize.qtype(model_config)} weights: over a quantized base only LoRA "
        "adapters train (--config=configs/finetune.py:qlora); fine-tune the float checkpoint "
        "it was converted from for the rest.")
  model_config.param_dtype = param_dtype  # A fresh copy: ours to set.
  layout = data.Layout(paligemma.num_image_tokens(model_config), model_config.image_token_id,
                       model_config.vision.image_size, config.max_text_len)
  train_records = _read_examples(train_jsonl, "--train_jsonl", config, tokenizer, layout)
  eval_records = (_read_examples(eval_jsonl, "--eval_jsonl", config, tokenizer, layout)
                  if eval_jsonl else [])
  layout = layout.for_records(train_records, eval_records)
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  parametrization, trainable, frozen = objective.init_trainable(config, params, init_rng,
                                                               jnp.dtype(param_dtype))
  del params
  tx, schedule = objective.make_optimizer(config)
  state, frozen, state_shardings = _place(objective.init_state(trainable, tx, state_rng), frozen,
                                          mesh)
  _info("Training %d parameters (%s), %d frozen; %d training examples, %d held out.",
        sum(x.size for x in jax.tree.leaves(trainable)), config.trainable,
        sum(x.size for x in jax.tree.leaves(frozen)), len(train_records), len(eval_records))
  return _Run(paligemma.PaliGemma(model_config), tokenizer, layout, train_records, eval_records,
              parametrization, tx, schedule, frozen, state_shardings), state


def _resume(manager, state, data_info: dict):
  """(state, data position) of the latest checkpoint; the initial state at 0 without one."""
  if manager.latest_step() is None:
    return state, 0
  state, saved = workdir_lib.restore_state(manager, state)
  if {k: saved.get(k) for k in data_info} != data_info and multihost.is_writer():
    logging.warning("The training data or seed changed since the checkpoint (%s, now %s): the "
                    "data order will differ.", saved, data_info)
  _info("Resumed from step %d (data position %d).", int(state["step"]), saved["position"])
  return state, saved["position"]


def _run_steps(config, run: _Run, state, position: int, *, stop: int, manager, data_info: dict,
               metrics_path: str, mesh):
  """Steps up to `stop`, with metrics, logs, checkpoints and held-out evaluations
  -> (state, the last evaluation's metrics)."""
  start = int(state["step"])
  out_shardings = None if mesh is None else (run.state_shardings, sharding.replicated(mesh))
  step_fn = jax.jit(lambda s, f, b: objective.train_step(
      s, f, b, model=run.model, parametrization=run.parametrization, tx=run.tx,
      schedule=run.schedule, accum_steps=config.accum_steps, max_text_len=run.layout.max_text_len),
                    out_shardings=out_shardings, donate_argnums=0)
  evaluator = HeldOutEvaluator(run.eval_records, run.layout, config, run.model, run.tokenizer,
                               run.parametrization, mesh) if run.eval_records else None
  writer = workdir_lib.MetricWriter(metrics_path, start) if multihost.is_writer() else None
  # The same seeded loader on every host: each copies its devices' rows of the global batch.
  loader = data.TrainLoader(run.train_records, run.layout, batch_size=config.batch_size,
                            seed=config.seed, position=position, num_threads=config.num_threads)
  bar = tqdm.tqdm(total=config.total_steps, initial=start, unit="step", desc="finetune",
                  disable=not multihost.is_writer())
  eval_metrics = {}
  try:
    for step in range(start + 1, stop + 1):
      t0 = time.perf_counter()
      batch, position = next(loader)
      if mesh is not None:
        batch = sharding.shard_batch(batch, mesh)
      state, metrics = step_fn(state, run.frozen, batch)
      metrics = {k: float(v) for k, v in multihost.fetch(metrics).items()}
      dt = time.perf_counter() - t0
      if writer:
        writer.write(step, loss=metrics["loss"], lr=metrics["lr"], grad_norm=metrics["grad_norm"],
                     examples_per_s=config.batch_size / dt, step_time_s=dt)
      bar.update()
      bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.3g}")
      if step % config.log_every == 0 or step == stop:
        _info("step %d/%d: loss %.4f, lr %.3g, grad norm %.3g, %.1f examples/s, %.3f s/step",
              step, config.total_steps, metrics["loss"], metrics["lr"], metrics["grad_norm"],
              config.batch_size / dt, dt)
      if step % config.checkpoint_every == 0 or step == stop:
        workdir_lib.save_state(manager, state, {"position": position, **data_info})
      if evaluator and (config.eval_every and step % config.eval_every == 0
                        or step == config.total_steps):
        eval_metrics = evaluator(state["params"], run.frozen)
        if writer:
          writer.write(step, **eval_metrics)
        _info("step %d: held-out loss %.4f, exact match %.3f on %d examples", step,
              eval_metrics["eval_loss"], eval_metrics["eval_exact_match"],
              eval_metrics["eval_examples"])
  finally:
    bar.close()
    loader.close()
    if writer:
      writer.close()
  return state, eval_metrics


def _export(run: _Run, state, export_dir: str, export_format: str = "orbax",
            export_quantize: str = ""):
  """The trained model, LoRA merged, in the frozen dtype (the checkpoint stores the model's
  structure, not runtime choices such as remat); every process writes its shards. Over a
  quantized base: the float model (dequantized base + adapters), quantized to `export_quantize`
  when it names a type."""
  dtype = jnp.dtype(run.model.config.param_dtype)
  params = run.parametrization.full(state["params"], run.frozen, dtype=dtype)
  config = paligemma.float_config(run.model.config)
  if export_quantize:
    params, config = paligemma.quantize_params(params, config, export_quantize)
  if export_format == "hf":
    hf_export.export(params, config, run.tokenizer.path, export_dir,
                     progress=multihost.is_writer())
  else:
    checkpoint.save(export_dir, params, config, run.tokenizer.path)


def train(config: ml_collections.ConfigDict, *, base: str, train_jsonl: str, workdir: str,
          eval_jsonl: str | None = None, export_dir: str | None = None,
          max_steps_this_run: int | None = None, mesh=None, export_format: str = "orbax") -> dict:
  """Runs (or resumes) training and, once the last step is done, exports to `export_dir`.

  Returns dict(state, frozen, parametrization, step, eval: the last evaluation's metrics).
  mesh: shard the parameters, the training state and the batches over it.
  export_format: "orbax" (a converted checkpoint) or "hf" (a Hugging Face directory, hf_export.py).
  """
  validate(config, base=base, train_jsonl=train_jsonl, workdir=workdir, eval_jsonl=eval_jsonl,
           export_dir=export_dir, max_steps_this_run=max_steps_this_run,
           export_format=export_format)
  workdir = os.path.abspath(workdir)  # Orbax wants absolute paths.
  if multihost.is_writer():
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.record_config(workdir, config)
  run, state = _setup(config, base, train_jsonl, eval_jsonl, mesh)
  data_info = {"seed": config.seed, "num_examples": len(run.train_records),
               "fingerprint": data.fingerprint(run.train_records)}
  manager = workdir_lib.checkpoint_manager(workdir, config.keep_checkpoints)
  try:
    state, position = _resume(manager, state, data_info)
    stop = config.total_steps if max_steps_this_run is None else min(
        config.total_steps, int(state["step"]) + max_steps_this_run)
    state, eval_metrics = _run_steps(
        config, run, state, position, stop=stop, manager=manager, data_info=data_info,
        metrics_path=os.path.join(workdir, workdir_lib.METRICS), mesh=mesh)
  finally:
    manager.wait_until_finished()
    manager.close()
  step = int(state["step"])
  if step >= config.total_steps and export_dir:
    _export(run, state, export_dir, export_format, config.export_quantize)
  return dict(state=state, frozen=run.frozen, parametrization=run.parametrization, step=step,
              eval=eval_metrics)
