r"""Fine-tunes a PaliGemma checkpoint on JSONL data; resumable, exports a `generate`-ready checkpoint.

  python -m paligemma_jax.finetune --config=configs/finetune.py:lora \
      --checkpoint=/ckpt/pg2-3b-224 --train_jsonl=train.jsonl --eval_jsonl=val.jsonl \
      --workdir=/runs/captions --export_dir=/ckpt/pg2-3b-224-captions

Each data line is {"image": path, "prefix": str, "suffix": str}; the model learns to answer
`prefix` with `suffix` (see paligemma_jax/data.py). `--workdir` holds Orbax checkpoints of the
training state (trainable parameters, optimizer state, step, PRNG key, data position), the
training config and metrics.jsonl (one line per step, plus evaluation lines). Running the same
command again resumes from the last checkpoint and continues exactly where the run would have
been. When the last step is done, the model (LoRA merged) is written to `--export_dir`.

`--mesh` shards the model, the training state and the batches over the devices (see
docs/scaling.md); the numbers are those of one device. On a multi-host job (`--distributed`)
every host runs the same command with the same data; only the first writes metrics and logs.
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import orbax.checkpoint as ocp
import tqdm

from paligemma_jax import checkpoint
from paligemma_jax import data
from paligemma_jax import hf
from paligemma_jax import inference
from paligemma_jax import paligemma
from paligemma_jax import sharding
from paligemma_jax import training
from paligemma_jax.tokenizer import Tokenizer

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "finetune.py")


def define_flags():
  """The command-line flags; defined only when this module runs as a program, so the library
  part (`train`) can be imported next to other command-line modules."""
  config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG, "Training config, e.g. configs/finetune.py:lora (default: attn).",
      lock_config=True)
  flags.DEFINE_string("checkpoint", None, "Base model: a converted checkpoint or a Hugging Face "
                      "PaliGemma directory.", required=True)
  flags.DEFINE_string("train_jsonl", None, 'Lines {"image", "prefix", "suffix"}.', required=True)
  flags.DEFINE_string("eval_jsonl", None, "Held-out lines, same format: loss and exact match.")
  flags.DEFINE_string("workdir", None, "Training state and metrics; rerun to resume.", required=True)
  flags.DEFINE_string("export_dir", None, "Where the fine-tuned checkpoint goes at the end.")
  flags.DEFINE_integer("max_steps_this_run", None, "Stop (with a checkpoint) after this many "
                       "steps; rerun to go on.")
  sharding.define_flags()


def load_base(path: str, mesh=None):
  """(params as stored, model config, tokenizer file) from either checkpoint format; with a
  mesh, sharded over it (a converted checkpoint is restored straight into its shards)."""
  if os.path.exists(os.path.join(path, checkpoint.PARAMS)):
    params, config = checkpoint.load(path) if mesh is None else sharding.load(path, mesh)
    return params, config, checkpoint.tokenizer_path(path)
  if os.path.exists(os.path.join(path, "config.json")):
    params, config, tokenizer_file = hf.load_hf(path, progress=sharding.is_writer())
    if tokenizer_file is None:
      raise FileNotFoundError(f"{path} has no tokenizer.model.")
    return params if mesh is None else sharding.shard_params(params, mesh), config, tokenizer_file
  raise FileNotFoundError(f"{path} is neither a converted checkpoint nor a Hugging Face directory.")


def _info(*args):
  """Logs on the writing process only (every host of a multi-host job runs the same steps)."""
  if sharding.is_writer():
    logging.info(*args)


def _step_of(line: str):
  try:
    return json.loads(line)["step"]
  except (json.JSONDecodeError, KeyError, TypeError):
    return None  # A line cut short by a kill.


class MetricWriter:
  """Appends one JSON line per record to `path`, first dropping the lines past `start_step`
  (left by a run that died after its last checkpoint), so a resumed file reads as one run."""

  def __init__(self, path: str, start_step: int):
    kept = []
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        kept = [line.rstrip("\n") + "\n" for line in f
                if (step := _step_of(line)) is not None and step <= start_step]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)
    self._file = open(path, "a", encoding="utf-8")

  def write(self, step: int, **values):
    self._file.write(json.dumps({"step": step, **values}) + "\n")
    self._file.flush()

  def close(self):
    self._file.close()


def read_metrics(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class Evaluator:
  """Held-out loss over every usable example, and greedy exact match of the generated text
  against the suffix on the first `eval_num_generate` of them."""

  def __init__(self, records, layout, config, model_config, tokenizer, model, parametrization,
               mesh=None):
    self.records, self.layout, self.config, self.mesh = records, layout, config, mesh
    self.parametrization = parametrization
    self.loss_fn = jax.jit(lambda t, f, b: training.eval_step(
        t, f, b, model=model, parametrization=parametrization))
    self.model_config, self.tokenizer = model_config, tokenizer
    self.predictor = None  # Built on first use, from the first parameters it sees.

  def __call__(self, trainable, frozen) -> dict:
    total, count = 0.0, 0.0
    for batch in data.eval_batches(self.records, self.layout, self.config.eval_batch_size,
                                   self.config.num_threads):
      if self.mesh is not None:
        batch = sharding.shard_batch(batch, self.mesh)
      loss_sum, n = sharding.fetch(self.loss_fn(trainable, frozen, batch))
      total, count = total + float(loss_sum), count + float(n)
    params = self.parametrization.full(trainable, frozen)
    if self.predictor is None:
      self.predictor = inference.Predictor(self.model_config, params, self.tokenizer,
                                           batch_size=self.config.eval_batch_size,
                                           num_threads=self.config.num_threads)
    self.predictor.decoder.params = params  # Same shapes every time: compiled once.
    chosen = self.records[:self.config.eval_num_generate]
    examples = [inference.Example(r.image, r.prefix) for r in chosen]
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
    return dict(eval_loss=total / max(count, 1.0), eval_exact_match=hits / max(scored, 1),
                eval_examples=scored)


def _save(manager, state, position, data_info):
  manager.save(int(state["step"]), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"position": position, **data_info})))


def _restore(manager, state):
  """(state, data record) from the latest checkpoint; `state` gives the structure and dtypes."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
  return restored.state, restored.data


def _check_config(workdir: str, config: ml_collections.ConfigDict):
  """Keeps the first run's config in the workdir; a resumed run with another one is flagged."""
  path = os.path.join(workdir, "config.json")
  text = config.to_json(indent=2, sort_keys=True)
  if not os.path.exists(path):
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
    return
  with open(path, encoding="utf-8") as f:
    if f.read() != text:
      logging.warning("The config differs from the one %s was started with (%s); the resumed "
                      "run will not match an uninterrupted one.", workdir, path)


def train(config: ml_collections.ConfigDict, *, base: str, train_jsonl: str, workdir: str,
          eval_jsonl: str | None = None, export_dir: str | None = None,
          max_steps_this_run: int | None = None, mesh=None) -> dict:
  """Runs (or resumes) training; returns the final state and the last evaluation metrics.

  mesh: shard the parameters, the training state and the batches over it. On a multi-host job
  every process calls this with the same arguments; only `sharding.is_writer()` writes files.
  """
  workdir, writer = os.path.abspath(workdir), sharding.is_writer()
  if export_dir and os.path.exists(export_dir):
    raise FileExistsError(f"--export_dir {export_dir} already exists; refusing to overwrite it.")
  if config.batch_size % config.accum_steps:
    raise ValueError(f"batch_size {config.batch_size} is not a multiple of accum_steps "
                     f"{config.accum_steps}.")
  if writer:
    os.makedirs(workdir, exist_ok=True)
    _check_config(workdir, config)

  params, model_config, tokenizer_file = load_base(base, mesh)
  param_dtype = config.param_dtype or inference.default_dtype()
  model_config.dtype = config.dtype or inference.default_dtype()
  model_config.param_dtype, model_config.remat = param_dtype, config.remat
  model = paligemma.PaliGemma(model_config)
  tokenizer = Tokenizer(tokenizer_file)

  layout = data.Layout(paligemma.num_image_tokens(model_config), model_config.image_token_id,
                       model_config.vision.image_size, config.max_text_len)
  train_records = data.read_jsonl(train_jsonl, tokenizer, layout, config.image_root)
  if not train_records:
    raise ValueError(f"{train_jsonl} has no usable example.")
  eval_records = data.read_jsonl(eval_jsonl, tokenizer, layout, config.image_root) if eval_jsonl else []

  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  parametrization, trainable, frozen = training.init_trainable(config, params, init_rng,
                                                               jnp.dtype(param_dtype))
  del params
  tx, schedule = training.make_optimizer(config)
  state = training.init_state(trainable, tx, state_rng)
  # Committed like the step's outputs (and restored arrays), so the step compiles once.
  if mesh is None:
    state, frozen = jax.device_put((state, frozen), jax.local_devices()[0])
    out_shardings = None
  else:
    state_shardings = sharding.state_shardings(state, mesh)
    state, frozen = jax.device_put(state, state_shardings), sharding.shard_params(frozen, mesh)
    out_shardings = (state_shardings, sharding.replicated(mesh))
    _info("Sharded over %s: %.1f MiB of training state and frozen parameters per device.",
          dict(mesh.shape), (sharding.bytes_per_device(state, mesh, strict=False)
                             + sharding.bytes_per_device(frozen, mesh)) / 2**20)
  _info("Training %d parameters (%s), %d frozen; %d training examples, %d held out.",
        sum(x.size for x in jax.tree.leaves(trainable)), config.trainable,
        sum(x.size for x in jax.tree.leaves(frozen)), len(train_records), len(eval_records))

  manager = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           cleanup_tmp_directories=True))
  data_info = {"seed": config.seed, "num_examples": len(train_records),
               "fingerprint": data.fingerprint(train_records)}
  position = 0
  if manager.latest_step() is not None:
    state, saved = _restore(manager, state)
    position = saved["position"]
    if {k: saved.get(k) for k in data_info} != data_info and writer:
      logging.warning("The training data or seed changed since the checkpoint (%s, now %s): the "
                      "data order will differ.", saved, data_info)
    _info("Resumed from step %d (data position %d).", int(state["step"]), position)
  start = int(state["step"])
  stop = config.total_steps if max_steps_this_run is None else min(
      config.total_steps, start + max_steps_this_run)

  step_fn = jax.jit(lambda s, f, b: training.train_step(
      s, f, b, model=model, parametrization=parametrization, tx=tx, schedule=schedule,
      accum_steps=config.accum_steps), out_shardings=out_shardings, donate_argnums=0)
  evaluator = Evaluator(eval_records, layout, config, model_config, tokenizer, model,
                        parametrization, mesh) if eval_records else None
  metric_writer = MetricWriter(os.path.join(workdir, "metrics.jsonl"), start) if writer else None
  # The same seeded loader on every host: each copies its devices' rows of the global batch.
  loader = data.TrainLoader(train_records, layout, batch_size=config.batch_size, seed=config.seed,
                            position=position, num_threads=config.num_threads)
  bar = tqdm.tqdm(total=config.total_steps, initial=start, unit="step", desc="finetune",
                  disable=not writer)
  eval_metrics = {}
  try:
    for step in range(start + 1, stop + 1):
      t0 = time.perf_counter()
      batch, position = next(loader)
      if mesh is not None:
        batch = sharding.shard_batch(batch, mesh)
      state, metrics = step_fn(state, frozen, batch)
      metrics = {k: float(v) for k, v in sharding.fetch(metrics).items()}
      dt = time.perf_counter() - t0
      if metric_writer:
        metric_writer.write(step, loss=metrics["loss"], lr=metrics["lr"],
                            grad_norm=metrics["grad_norm"], examples_per_s=config.batch_size / dt,
                            step_time_s=dt)
      bar.update()
      bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.3g}")
      if step % config.log_every == 0 or step == stop:
        _info("step %d/%d: loss %.4f, lr %.3g, grad norm %.3g, %.1f examples/s, %.3f s/step",
              step, config.total_steps, metrics["loss"], metrics["lr"], metrics["grad_norm"],
              config.batch_size / dt, dt)
      if step % config.checkpoint_every == 0 or step == stop:
        _save(manager, state, position, data_info)
      if evaluator and (config.eval_every and step % config.eval_every == 0
                        or step == config.total_steps):
        eval_metrics = evaluator(state["params"], frozen)
        if metric_writer:
          metric_writer.write(step, **eval_metrics)
        _info("step %d: held-out loss %.4f, exact match %.3f on %d examples", step,
              eval_metrics["eval_loss"], eval_metrics["eval_exact_match"],
              eval_metrics["eval_examples"])
  finally:
    bar.close()
    loader.close()
    if metric_writer:
      metric_writer.close()
    manager.wait_until_finished()
    manager.close()

  if int(state["step"]) < config.total_steps:
    _info("Stopped at step %d of %d; run again with the same --workdir to continue.",
          int(state["step"]), config.total_steps)
  elif export_dir:
    export_config = ml_collections.ConfigDict(model_config.to_dict())
    export_config.dtype, export_config.remat = param_dtype, False
    params = parametrization.full(state["params"], frozen, dtype=jnp.dtype(param_dtype))
    checkpoint.save(export_dir, params, export_config, tokenizer_file)  # Every process: its shards.
    _info("Exported the fine-tuned model to %s.", export_dir)
  return dict(state=state, frozen=frozen, parametrization=parametrization, eval=eval_metrics)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  checkpoint.quiet_orbax_logs()
  mesh = sharding.mesh_from_flags()  # Before anything touches a device.
  f = flags.FLAGS
  train(f.config, base=f.checkpoint, train_jsonl=f.train_jsonl, workdir=f.workdir,
        eval_jsonl=f.eval_jsonl, export_dir=f.export_dir, max_steps_this_run=f.max_steps_this_run,
        mesh=mesh)


if __name__ == "__main__":
  define_flags()
  app.run(main)
