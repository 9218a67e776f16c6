"""Fine-tuning: what trains, schedules, accumulation, and end to end on a tiny random checkpoint:
overfitting until greedy generation reproduces the suffixes (full and LoRA), a run stopped,
crashed and resumed that ends exactly where an uninterrupted command-line run does, and a
command-line run sharded over 8 simulated devices that matches one device.

The command line registers absl flags, so it runs in a subprocess. A persistent compilation cache
shared by the runs (and the subprocess) keeps identical programs from compiling twice.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
from jax.experimental.compilation_cache import compilation_cache
import numpy as np
import pytest
import torch
from PIL import Image

from configs import finetune as finetune_config
from configs.paligemma import get_config
from paligemma_jax import errors
from paligemma_jax.checkpoints import checkpoint
from paligemma_jax.checkpoints import loading
from paligemma_jax.decoding import inference
from paligemma_jax.model import paligemma
from paligemma_jax.training import data
from paligemma_jax.training import lora
from paligemma_jax.training import objective
from paligemma_jax.training import trainer
from paligemma_jax.training import workdir
from helpers import ROOT, assert_expected_failure

EXAMPLES = [("caption en", "red car"), ("caption en", "blue tree near house"),
            ("answer en what is this?", "a dog"), ("caption en", "two white cats"),
            ("caption en", "a man on a bench")]
_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("jax_cache"))
  saved = {k: getattr(jax.config, k) for k in _CACHE_OPTIONS}
  compilation_cache.set_cache_dir(path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  compilation_cache.reset_cache()
  yield path
  for k, v in saved.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


def _random_params(config, seed=0):
  """Fan-in scaled random weights, so image features differ between images from the start.

  The embedding table (also the LM head) is wide enough for confident logits through the final
  norm, which LoRA leaves frozen.
  """
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name, joined = path[-1].key, "/".join(k.key for k in path)
    if name == "bias":
      return np.zeros(s.shape, np.float32)
    if name == "scale":  # LayerNorm (vision) multiplies by scale; RMSNorm by 1 + scale.
      return (np.ones if joined.startswith("img/") else np.zeros)(s.shape, np.float32)
    std = 0.02
    if name == "input_embedding":
      std = 0.25
    elif name == "kernel":
      lead, fan_in, _ = lora.matrix_axes(joined, len(s.shape))
      std = math.prod(s.shape[lead:lead + fan_in]) ** -0.5
    return (rng.standard_normal(s.shape) * std).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, paligemma.param_shapes(config))


@pytest.fixture(scope="module")
def base(tmp_path_factory, spm_model_path):
  """A tiny random PaliGemma 1 checkpoint (with the test tokenizer) and a training set of five
  distinct images plus two bad lines."""
  root = tmp_path_factory.mktemp("finetune")
  config = get_config("tiny-pg1")
  checkpoint.save(str(root / "base"), _random_params(config), config, spm_model_path)
  rng = np.random.default_rng(0)
  lines = []
  for i, (prefix, suffix) in enumerate(EXAMPLES):
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(root / f"img{i}.png")
    lines.append(json.dumps({"image": f"img{i}.png", "prefix": prefix, "suffix": suffix}))
  (root / "clean.jsonl").write_text("\n".join(lines) + "\n")
  bad = lines[:2] + ["{broken", json.dumps({"image": "gone.png", "prefix": "p", "suffix": "s"})]
  (root / "train.jsonl").write_text("\n".join(bad + lines[2:]) + "\n")
  return root


def _config(preset, **overrides):
  """Small, fast settings; the same values as `_cli_overrides` writes for the command line."""
  c = finetune_config.get_config(preset)
  c.update(dict(total_steps=40, batch_size=4, max_text_len=32, remat=False, log_every=10,
                checkpoint_every=5, eval_batch_size=4, eval_max_new_tokens=12, num_threads=2))
  c.update(overrides)
  return c


def _cli_overrides(config):
  defaults = finetune_config.get_config(config.trainable).to_dict()
  return [f"--config.{k}={v}" for k, v in config.to_dict().items() if not isinstance(v, dict)
          and v != defaults[k]]


def _generate(export_dir, image_dir, examples=EXAMPLES):
  """Greedy answers of an exported checkpoint, the way `python -m paligemma_jax.generate` runs."""
  params, config, tokenizer = loading.load_model(export_dir)
  predictor = inference.Predictor(params, config, tokenizer, batch_size=4)
  inputs = [inference.Example(str(image_dir / f"img{i}.png"), p) for i, (p, _) in enumerate(examples)]
  return [r["text"] for r in predictor.predict(inputs, max_new_tokens=12)]


# ----------------------------------------------------------------------------------------------
# What trains, and the optimizer.

@pytest.fixture(scope="module")
def tiny_params():
  return _random_params(get_config("tiny-pg2"))


def _paths(tree):
  return set(traverse_util.flatten_dict(tree, sep="/"))


def test_trainable_presets(tiny_params):
  everything = _paths(tiny_params)
  for spec, want in [
      ("all", everything),
      ("llm", {p for p in everything if p.startswith("llm/")}),
      ("attn", {f"llm/layers/attn/{n}/kernel" for n in "qkvo"}),
      (r"projector/.*|llm/final_norm/scale", {"projector/kernel", "projector/bias",
                                              "llm/final_norm/scale"})]:
    trainable, frozen = objective.split(tiny_params, objective.trainable_regex(spec))
    assert _paths(trainable) == want, spec
    assert _paths(frozen) == everything - want
  restored = objective.combine(*objective.split(tiny_params, r"llm/.*"))
  jax.tree.map(np.testing.assert_array_equal, restored, tiny_params)


def test_trainable_float32_frozen_bfloat16(tiny_params):
  config = _config("attn")
  par, trainable, frozen = objective.init_trainable(config, tiny_params, jax.random.PRNGKey(0),
                                                   jnp.bfloat16)
  assert not par.use_lora
  assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}

  config = _config("lora")
  par, adapters, frozen = objective.init_trainable(config, tiny_params, jax.random.PRNGKey(0),
                                                  jnp.bfloat16)
  assert par.use_lora and par.lora_alpha == config.lora.alpha
  assert _paths(frozen) == _paths(tiny_params)  # The whole base is frozen.
  assert {p.rsplit("/", 2)[0] for p in _paths(adapters)} == {
      f"llm/layers/{n}" for n in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up",
                                  "mlp/down")}
  with pytest.raises(ValueError, match="matches no parameter"):
    objective.init_trainable(_config("attn", trainable="nothing/.*"), tiny_params,
                            jax.random.PRNGKey(0), jnp.float32)


def test_schedules():
  config = _config("attn", lr=0.5, total_steps=100, warmup_percent=0.1, end_lr_factor=0.1)
  cosine = objective.make_schedule(config)
  np.testing.assert_allclose([cosine(0), cosine(5), cosine(10)], [0.0, 0.25, 0.5], rtol=1e-6)
  np.testing.assert_allclose(cosine(55), 0.05 + 0.45 * 0.5, rtol=1e-5)  # Half way down.
  np.testing.assert_allclose(cosine(100), 0.05, rtol=1e-5)
  config.schedule = "linear"
  np.testing.assert_allclose(objective.make_schedule(config)(55), 0.05 + 0.45 * 0.5, rtol=1e-5)
  config.schedule = "constant"
  np.testing.assert_allclose([objective.make_schedule(config)(s) for s in (5, 10, 99)],
                             [0.25, 0.5, 0.5], rtol=1e-6)
  with pytest.raises(ValueError, match="schedule"):
    config.schedule = "step"
    objective.make_schedule(config)


def test_optimizers_and_clipping():
  params = {"w": {"kernel": jnp.ones((2, 2))}, "n": {"scale": jnp.ones(2)}}
  grads = jax.tree.map(lambda x: 3.0 * x, params)  # Global norm sqrt(6 * 9) > clip.
  config = _config("attn", optimizer="sgd", lr=0.1, warmup_percent=0.0, schedule="constant",
                   grad_clip=1.0)
  tx, _ = objective.make_optimizer(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  clipped = 3.0 / math.sqrt(6 * 9)
  np.testing.assert_allclose(updates["w"]["kernel"], -0.1 * clipped * np.ones((2, 2)), rtol=1e-5)

  config.update(dict(optimizer="adamw", weight_decay=0.5, grad_clip=0.0))
  tx, _ = objective.make_optimizer(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  # First Adam step: -lr * sign(g); decay (lr * wd * w) on kernels only, not on norm scales.
  np.testing.assert_allclose(updates["w"]["kernel"], -0.1 * (1 + 0.5), rtol=1e-5)
  np.testing.assert_allclose(updates["n"]["scale"], -0.1, rtol=1e-5)
  with pytest.raises(ValueError, match="optimizer"):
    objective.make_optimizer(_config("attn", optimizer="lion"))


def test_token_loss_targets_the_next_token():
  tokens = jnp.array([[5, 6, 7, 8, 0]])
  loss_mask = jnp.array([[False, False, True, True, False]])  # Targets: 7 and 8.
  logits = jax.nn.one_hot(jnp.array([[6, 7, 8, 0, 0]]), 10) * 100.0  # Position t predicts t + 1.
  total, count = objective.token_loss(logits, tokens, loss_mask)
  assert count == 2 and total < 1e-6
  wrong = jax.nn.one_hot(jnp.zeros((1, 5), int), 10) * 100.0
  assert objective.token_loss(wrong, tokens, loss_mask)[0] > 100
  assert objective.token_loss(wrong, tokens, loss_mask, weight=jnp.array([False]))[1] == 0


def _rows_of_one_and_two_images(config, max_text_len=12):
  """A batch in training's layout with K = 2 ([2N image tokens][max_text_len text tokens]): rows
  of two images and of one (whose text starts N earlier), one of each with its suffix cut at
  max_text_len (the two-image one ending at the row's last position), one with weight 0 (a
  held-out padding row)."""
  n, image_id = paligemma.num_image_tokens(config), config.image_token_id
  length = 2 * n + max_text_len
  rng = np.random.default_rng(0)
  rows = []
  for images, prompt, suffix in [(2, 3, 4), (1, 2, 8), (2, 2, 20), (1, 4, 20), (1, 3, 2)]:
    text = min(1 + prompt + suffix, max_text_len)  # <bos>, the prompt, the suffix + <eos>, cut.
    tokens = np.zeros(length, np.int32)
    tokens[:images * n] = image_id
    tokens[images * n:images * n + text] = rng.integers(5, 1000, text)
    at = np.arange(length) - images * n
    rows.append(dict(tokens=tokens, input_mask=at < text, prefix_mask=at < 1 + prompt,
                     loss_mask=(at >= 1 + prompt) & (at < text)))
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  s = config.vision.image_size
  batch["images"] = rng.uniform(-1, 1, (len(rows), 2, s, s, 3)).astype(np.float32)
  batch["weight"] = np.array([True, True, True, True, False])
  return batch


@pytest.mark.parametrize("preset", ["all", "lora"])
def test_loss_at_the_text_positions_equals_the_loss_at_every_position(tiny_params, preset):
  """The LM head over max_text_len positions per row (the fast path `finetune` takes) gives the
  loss, target count and gradients of the head over all positions, also for rows whose text
  starts earlier (fewer images) or reaches the row's last position."""
  config = get_config("tiny-pg2")
  model, batch = paligemma.PaliGemma(config), _rows_of_one_and_two_images(config)
  par, trainable, frozen = objective.init_trainable(_config(preset), jax.device_put(tiny_params),
                                                   jax.random.PRNGKey(0), jnp.float32)
  if par.use_lora:  # B = 0 would leave A without a gradient.
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)
  loss = lambda t, max_text_len: objective.batch_loss(
      t, frozen, batch, jax.random.PRNGKey(0), model=model, parametrization=par,
      max_text_len=max_text_len)
  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (total, count), grads = grad(trainable, 12)
  (want_total, want_count), want_grads = grad(trainable, None)
  assert count == want_count == batch["loss_mask"][:4].sum() == 4 + 8 + 9 + 7
  np.testing.assert_allclose(total, want_total, rtol=1e-5)
  # Float rounding only: on the CPU the head over a few rows sums in another order
  # (gemma.dot_out_in) than over every position.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads,
               want_grads)
  assert objective.loss_positions(jnp.asarray(batch["loss_mask"]), 12).shape == (5, 12)


class _ToyModel(nn.Module):
  """Stands in for PaliGemma in train_step: same call signature, fast to compile."""

  @nn.compact
  def __call__(self, tokens, images, input_mask, prefix_mask, image_index=None):
    x = nn.Embed(16, 8)(tokens) + nn.Dense(8)(images.reshape(images.shape[0], 1, -1))
    return nn.Dense(16)(jnp.tanh(x))


def test_gradient_accumulation_matches_the_full_batch():
  """Micro-batches with different target counts still give the full batch's token-mean update."""
  model = _ToyModel()
  rng = np.random.default_rng(0)
  batch = dict(tokens=rng.integers(0, 16, (4, 6)).astype(np.int32),
               images=rng.normal(size=(4, 2, 2, 3)).astype(np.float32),
               input_mask=np.ones((4, 6), bool), prefix_mask=np.zeros((4, 6), bool),
               loss_mask=np.array([[0, 1, 1, 1, 1, 1]] * 2 + [[0, 0, 0, 0, 1, 1]] * 2, bool))
  params = model.init(jax.random.PRNGKey(0), *(batch[k] for k in ("tokens", "images", "input_mask",
                                                                   "prefix_mask")))["params"]
  tx, schedule = objective.make_optimizer(_config("all", lr=0.1, warmup_percent=0.0))
  results = []
  for accum_steps in (1, 2):
    state = objective.init_state(params, tx, jax.random.PRNGKey(1))
    step = jax.jit(lambda s, b, a=accum_steps: objective.train_step(
        s, {}, b, model=model, parametrization=objective.Parametrization(), tx=tx,
        schedule=schedule, accum_steps=a))
    for _ in range(3):
      state, metrics = step(state, batch)
    results.append((state, metrics))
  (one, m1), (two, m2) = results
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  assert m1["tokens"] == m2["tokens"] == 14
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), one["params"],
               two["params"])
  assert int(two["step"]) == 3


def test_metric_writer_trims_to_the_restored_step(tmp_path):
  """Lines past the checkpoint, and a line cut short by a kill, are dropped on resume."""
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "eval_loss": 2.5}\n{"step": 3, "loss": 2.0}\n'
                  '{"step": 4, "lo')
  writer = workdir.MetricWriter(str(path), start_step=2)
  writer.write(3, loss=1.5)
  writer.close()
  assert workdir.read_metrics(str(path)) == [
      {"step": 1, "loss": 3.0}, {"step": 2, "eval_loss": 2.5}, {"step": 3, "loss": 1.5}]


# ----------------------------------------------------------------------------------------------
# Expected failures: named on one line, before anything loads where they can be.

@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "--config.batch_size=0: must be at least 1"),
    ("accum_steps", 3, "--config.batch_size=4 is not a multiple of --config.accum_steps=3"),
    ("total_steps", 0, "--config.total_steps=0"),
    ("lr", -1.0, "--config.lr=-1.0"),
    ("lr", float("nan"), "--config.lr=nan"),
    ("max_text_len", 0, "--config.max_text_len=0"),
    ("lora.rank", 0, "--config.lora.rank=0"),
    ("optimizer", "lion", "--config.optimizer='lion': choose one of 'adamw', 'sgd'"),
    ("schedule", "step", "--config.schedule='step'"),
    ("eval_batch_size", 0, "--config.eval_batch_size=0"),
    ("eval_max_new_tokens", 0, "--config.eval_max_new_tokens=0"),
    ("checkpoint_every", 0, "--config.checkpoint_every=0"),
    ("log_every", 0, "--config.log_every=0"),
    ("keep_checkpoints", 0, "--config.keep_checkpoints=0"),
    ("warmup_percent", 1.5, "--config.warmup_percent=1.5: must be in [0, 1]"),
    ("param_dtype", "int8", "--config.param_dtype='int8'"),
    ("trainable", "llm/(", "--config.trainable='llm/(' is not a preset or a regular expression"),
    ("image_root", "/no/such/dir", "--config.image_root=/no/such/dir: no such directory"),
    ("quantize", "int3", "--config.quantize='int3': choose one of '', 'int8', 'int4'"),
    ("export_quantize", "fp8", "--config.export_quantize='fp8'"),
    ("trainable", "attn", "--config.quantize=int4: a quantized base trains only through LoRA"),
    # Past what jax.random.PRNGKey and the int32 schedule take (an OverflowError after loading).
    ("seed", 2**70, "--config.seed=1180591620717411303424: must be in"),
    ("total_steps", 2**40, "--config.total_steps=1099511627776: must be at most 2147483647"),
])
def test_validate_config_names_the_field(field, value, message):
  config = _config("qlora")
  config.update_from_flattened_dict({field: value})
  with pytest.raises(errors.InputError, match=re.escape(message)):
    trainer.validate_config(config)
  trainer.validate_config(_config("lora"))  # The defaults are fine.
  trainer.validate_config(_config("qlora"))


def test_train_checks_flags_and_config_before_loading(base, tmp_path, monkeypatch):
  monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
  (tmp_path / "taken").mkdir()
  missing = str(tmp_path / "missing.jsonl")
  good = dict(base=str(base / "base"), train_jsonl=str(base / "clean.jsonl"),
              workdir=str(tmp_path / "work"))
  for config, arguments, message in [
      (_config("lora", batch_size=0), {}, "--config.batch_size=0"),
      (_config("lora"), dict(base=str(tmp_path / "nothing")), "no such checkpoint"),
      (_config("lora"), dict(train_jsonl=missing), f"--train_jsonl={missing}: no such file"),
      (_config("lora"), dict(eval_jsonl=missing), f"--eval_jsonl={missing}: no such file"),
      (_config("lora"), dict(export_dir=str(tmp_path / "taken")), "--export_dir="),
      (_config("lora"), dict(export_dir=str(base / "clean.jsonl" / "export")), "is a file"),
      (_config("lora"), dict(max_steps_this_run=0), "--max_steps_this_run=0"),
      (_config("qlora", export_quantize="int8"), dict(export_dir=str(tmp_path / "new"),
                                                      export_format="hf"), "is a float model"),
  ]:
    with pytest.raises(errors.InputError, match=re.escape(message)):
      trainer.train(config, **{**good, **arguments})
  assert not os.path.exists(tmp_path / "work")


def test_command_line_reports_expected_errors_on_one_line(base, compile_cache, tmp_path):
  """A bad config value (before loading), a corrupt checkpoint and a training file without a
  usable line (after loading): exit status 1 and one `error:` line, no traceback."""
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  (corrupt / "params").mkdir()  # Orbax finds no parameters in it.
  for name in ("config.json", "tokenizer.model"):
    (corrupt / name).write_bytes((base / "base" / name).read_bytes())
  unusable = tmp_path / "unusable.jsonl"
  unusable.write_text('{broken\n{"image": "gone.png", "prefix": "p", "suffix": "s"}\n')
  config = _config("lora", total_steps=2)
  cases = [
      ((base / "base", base / "clean.jsonl", "--config.accum_steps=3"),
       "--config.batch_size=4 is not a multiple of --config.accum_steps=3"),
      ((corrupt, base / "clean.jsonl"), "corrupt"),
      ((base / "base", unusable), f"--train_jsonl={unusable} has no usable example"),
  ]
  procs = [subprocess.Popen(_command(config, checkpoint_dir, train_jsonl, tmp_path / f"work{i}",
                                     tmp_path / f"export{i}", *extra),
                            cwd=ROOT, env=_cli_env(compile_cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for i, ((checkpoint_dir, train_jsonl, *extra), _) in enumerate(cases)]
  for proc, (_, message) in zip(procs, cases):
    _, stderr = proc.communicate(timeout=300)
    errors_printed = [line for line in stderr.splitlines() if ": error: " in line]
    assert_expected_failure(proc, stderr)
    assert len(errors_printed) == 1 and message in errors_printed[0], stderr[-3000:]
  assert not [n for n in os.listdir(tmp_path) if n.startswith("export")]


def test_loss_on_two_images_equals_transformers(converted_checkpoint, tmp_path):
  """Rows of two and one images in one training batch ([B, K, S, S, 3], the second row's
  unused image zero): each row's loss equals transformers' with the same labels."""
  directory, reference = converted_checkpoint(1)
  params, config, tokenizer = loading.load_model(directory)
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(tmp_path / f"img{i}.png")
  lines = [{"images": ["img0.png", "img1.png"], "prefix": "answer en same?", "suffix": "no"},
           {"image": "img2.png", "prefix": "caption en", "suffix": "a red car"}]
  (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  layout = data.Layout(paligemma.num_image_tokens(config), config.image_token_id,
                       config.vision.image_size, max_text_len=16)
  records = data.read_jsonl(str(tmp_path / "d.jsonl"), tokenizer, layout)
  layout = layout.for_records(records)
  assert layout.max_images == 2
  batch = data.stack([data.load_example(r, layout) for r in records])
  assert batch["images"].shape[:2] == (2, 2) and not batch["images"][1, 1].any()
  parametrization = objective.Parametrization.from_config(finetune_config.get_config("all"))
  model = paligemma.PaliGemma(config)
  for b, record in enumerate(records):
    row = jax.tree.map(lambda x: x[b:b + 1], batch)
    total, count = objective.batch_loss(params, {}, row, jax.random.PRNGKey(0), model=model,
                                        parametrization=parametrization)
    n, k = len(record.tokens), len(record.images)
    labels = np.where(record.loss_mask, record.tokens, -100)
    with torch.no_grad():
      theirs = reference(input_ids=torch.tensor(record.tokens[None], dtype=torch.long),
                         pixel_values=torch.tensor(batch["images"][b, :k].transpose(0, 3, 1, 2)),
                         token_type_ids=torch.tensor(record.loss_mask[None], dtype=torch.long),
                         labels=torch.tensor(labels[None], dtype=torch.long)).loss
    assert count == record.loss_mask.sum() and n <= layout.length
    np.testing.assert_allclose(total / count, theirs.item(), rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# End to end.

def test_full_finetune_overfits_until_generation_reproduces_the_suffixes(base, compile_cache,
                                                                         tmp_path):
  config = _config("all", optimizer="adamw", lr=3e-3, checkpoint_every=100)
  result = trainer.train(config, base=str(base / "base"), train_jsonl=str(base / "clean.jsonl"),
                          workdir=str(tmp_path / "work"), export_dir=str(tmp_path / "export"))
  metrics = workdir.read_metrics(str(tmp_path / "work" / "metrics.jsonl"))
  assert [m["step"] for m in metrics] == list(range(1, 41))
  assert metrics[0]["loss"] > 5 and metrics[-1]["loss"] < 0.5
  assert all(m["examples_per_s"] > 0 and m["step_time_s"] > 0 for m in metrics)
  schedule = objective.make_schedule(config)
  np.testing.assert_allclose([m["lr"] for m in metrics], [schedule(s) for s in range(40)], rtol=1e-5)

  assert _generate(tmp_path / "export", base) == [s for _, s in EXAMPLES]
  exported, exported_config = checkpoint.load(str(tmp_path / "export"))
  assert exported_config.variant == "tiny-pg1" and not exported_config.remat
  assert jax.tree.structure(exported) == jax.tree.structure(result["state"]["params"])


def test_lora_overfits_and_exports_merged(base, compile_cache, tmp_path):
  config = _config("lora", lr=1e-2, checkpoint_every=100)
  result = trainer.train(config, base=str(base / "base"), train_jsonl=str(base / "clean.jsonl"),
                          eval_jsonl=str(base / "clean.jsonl"), workdir=str(tmp_path / "work"),
                          export_dir=str(tmp_path / "export"))
  assert result["eval"]["eval_exact_match"] == 1.0 and result["eval"]["eval_examples"] == 5
  metrics = workdir.read_metrics(str(tmp_path / "work" / "metrics.jsonl"))
  assert metrics[-1]["step"] == 40 and metrics[-1]["eval_loss"] < 0.5 * metrics[0]["loss"]
  assert _generate(tmp_path / "export", base) == [s for _, s in EXAMPLES]

  exported, _ = checkpoint.load(str(tmp_path / "export"))
  original, _ = checkpoint.load(str(base / "base"))
  adapters = traverse_util.flatten_dict(result["state"]["params"], sep="/")
  targets = {p.rsplit("/", 1)[0] for p in adapters}
  flat_exported = traverse_util.flatten_dict(exported, sep="/")
  for path, w in traverse_util.flatten_dict(original, sep="/").items():
    if path in targets:
      want = w + lora.delta(path, w.shape, adapters[path + "/a"], adapters[path + "/b"],
                            config.lora.alpha)
      np.testing.assert_allclose(flat_exported[path], want, rtol=1e-6, atol=1e-6)
      assert not np.allclose(flat_exported[path], w)
    else:
      np.testing.assert_array_equal(flat_exported[path], w)  # Frozen: untouched.


def test_qlora_learns_like_lora_and_exports_the_float_model_transformers_runs(
    base, compile_cache, tmp_path):
  """An int4 base (quantized as it loads) with float adapters: the loss falls as LoRA's does;
  the Hugging Face export (dequantized base + merged adapters) gives in transformers the logits
  our quantized model with its adapters gives; a quantized export on request loads as int8."""
  import hf_fixtures
  import transformers
  config = _config("qlora", lr=1e-2, checkpoint_every=100)
  result = trainer.train(config, base=str(base / "base"), train_jsonl=str(base / "clean.jsonl"),
                         workdir=str(tmp_path / "work"), export_dir=str(tmp_path / "export"),
                         export_format="hf")
  frozen, adapters = result["frozen"], result["state"]["params"]
  assert frozen["llm"]["layers"]["mlp"]["up"]["kernel"].dtype == jnp.int4
  assert frozen["llm"]["embedder"]["input_embedding"].dtype == jnp.int4
  metrics = workdir.read_metrics(str(tmp_path / "work" / "metrics.jsonl"))
  assert metrics[-1]["step"] == 40 and metrics[-1]["loss"] < 0.2 * metrics[0]["loss"]

  qconfig = paligemma.float_config(get_config("tiny-pg1"))
  qconfig.quantize = "int4"
  model = paligemma.PaliGemma(qconfig)
  n = paligemma.num_image_tokens(qconfig)
  tokens, images, input_mask, prefix_mask = hf_fixtures.padded_batch(
      qconfig, [n + 6, n + 4], [n + 3, n + 4], seed=1)
  ours = result["parametrization"].apply(model, adapters, frozen, tokens, images, input_mask,
                                         prefix_mask)
  exported = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
      str(tmp_path / "export")).eval()
  theirs = hf_fixtures.reference_logits(exported, tokens, images, input_mask, prefix_mask)
  assert hf_fixtures.max_error(np.asarray(ours), theirs, input_mask) < 1e-4

  int8_dir = str(tmp_path / "int8")
  trainer._export(trainer._setup(config, str(base / "base"), str(base / "clean.jsonl"), None,
                                 None)[0], result["state"], int8_dir, "orbax", "int8")
  params, int8_config, _ = loading.load_model(int8_dir)
  assert int8_config.quantize == "int8"
  assert params["llm"]["layers"]["attn"]["q"]["kernel"].dtype == jnp.int8


def test_quantized_base_trains_only_adapters(base, tmp_path):
  """A checkpoint stored quantized: LoRA trains over it; other presets are refused by name."""
  from paligemma_jax.model import quantize
  params, config, tokenizer = loading.load_model(str(base / "base"), quantize="int8")
  checkpoint.save(str(tmp_path / "int8"), params, config, tokenizer.path)
  with pytest.raises(errors.InputError, match="holds int8 weights: over a quantized base only "
                     "LoRA adapters train"):
    trainer._setup(_config("attn"), str(tmp_path / "int8"), "unread.jsonl", None, None)
  run, state = trainer._setup(_config("lora"), str(tmp_path / "int8"), str(base / "clean.jsonl"),
                              None, None)
  assert quantize.qtype(run.model.config) == "int8" and set(state["params"]) == {"llm"}
  with pytest.raises(errors.InputError, match="holds int8 weights; int4 needs the float"):
    trainer._setup(_config("qlora"), str(tmp_path / "int8"), "unread.jsonl", None, None)


def test_lines_with_different_image_counts_train_and_answer(base, compile_cache, tmp_path):
  """Pairs and a triple beside single images: the pair's answer depends on which image comes
  first, and the fine-tuned model learns both orders."""
  pairs = [(["img0.png", "img1.png"], "answer en which first?", "red car"),
           (["img1.png", "img0.png"], "answer en which first?", "blue tree"),
           (["img2.png", "img3.png", "img4.png"], "caption en", "two white cats"),
           (["img3.png"], "caption en", "a dog")]
  lines = [{"images": i, "prefix": p, "suffix": s} for i, p, s in pairs]
  (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  for i in range(5):
    os.symlink(base / f"img{i}.png", tmp_path / f"img{i}.png")
  config = _config("all", optimizer="adamw", lr=3e-3, checkpoint_every=100)
  trainer.train(config, base=str(base / "base"), train_jsonl=str(tmp_path / "pairs.jsonl"),
                workdir=str(tmp_path / "work"), export_dir=str(tmp_path / "export"))
  metrics = workdir.read_metrics(str(tmp_path / "work" / "metrics.jsonl"))
  assert metrics[0]["loss"] > 5 and metrics[-1]["loss"] < 0.5
  params, model_config, tokenizer = loading.load_model(str(tmp_path / "export"))
  predictor = inference.Predictor(params, model_config, tokenizer, batch_size=4)
  examples = [inference.Example(prompt=p, images=[str(tmp_path / x) for x in i])
              for i, p, _ in pairs]
  assert [r["text"] for r in predictor.predict(examples, max_new_tokens=12)] == [
      s for *_, s in pairs]


def _command(config, checkpoint_dir, train_jsonl, work, export, *extra):
  return [sys.executable, "-m", "paligemma_jax.finetune",
          f"--config=configs/finetune.py:{config.trainable}", *_cli_overrides(config),
          f"--checkpoint={checkpoint_dir}", f"--train_jsonl={train_jsonl}", f"--workdir={work}",
          f"--export_dir={export}", *extra]


def _cli_env(compile_cache):
  return dict(os.environ, PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=compile_cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _temporaries(directory):
  """Temporary files or directories anywhere under `directory` (ours, files.py's, Orbax's)."""
  return [os.path.join(d, n) for d, subdirs, names in os.walk(directory)
          for n in subdirs + names if "tmp" in n]


def test_stopped_crashed_and_killed_runs_resume_to_the_uninterrupted_result(
    base, compile_cache, tmp_path, monkeypatch):
  """Stopped by --max_steps_this_run, crashed mid-step, then killed (SIGKILL) by the command
  line once it saved a checkpoint: the same command run again ends with the metrics and export
  of an uninterrupted run, and nothing temporary is left in the workdir or next to the export."""
  config = _config("lora", lr=1e-2)  # As in the LoRA test: its compiled step is reused.
  common = dict(base=str(base / "base"), train_jsonl=str(base / "train.jsonl"))
  work, export = tmp_path / "work", tmp_path / "export"
  command = _command(config, common["base"], common["train_jsonl"], work, export)
  env = _cli_env(compile_cache)

  # Reference: one uninterrupted run of the command line.
  proc = subprocess.run(_command(config, common["base"], common["train_jsonl"], tmp_path / "ref",
                                 tmp_path / "ref_export"),
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "train.jsonl:3: bad line, skipped" in proc.stderr
  assert "train.jsonl:4: bad line, skipped: image not found" in proc.stderr
  assert "step 40/40: loss" in proc.stderr

  # The same run stopped after 13 steps (checkpoints at 5, 10, 13) ...
  stopped = trainer.train(config, workdir=str(work), max_steps_this_run=13, **common)
  assert stopped["step"] == 13 and not os.path.exists(export)

  # ... resumed, then crashed while fetching the data of step 23 (last checkpoint: step 20) ...
  next_batch = data.TrainLoader.__next__

  def crash(self):
    if self.position >= 22 * config.batch_size:
      raise KeyboardInterrupt("killed")
    return next_batch(self)

  monkeypatch.setattr(data.TrainLoader, "__next__", crash)
  with pytest.raises(KeyboardInterrupt):
    trainer.train(config, workdir=str(work), **common)
  assert max(m["step"] for m in workdir.read_metrics(str(work / workdir.METRICS))) == 22
  monkeypatch.setattr(data.TrainLoader, "__next__", next_batch)

  # ... resumed by the command line and killed as soon as it has saved a new checkpoint ...
  with open(tmp_path / "killed.log", "w") as log:  # A file: a full pipe would stall the run.
    killed = subprocess.Popen(command, cwd=ROOT, env=env, stderr=log)
  while killed.poll() is None and not any(
      n.isdigit() and int(n) > 20 for n in os.listdir(work / workdir.CHECKPOINTS)):
    time.sleep(0.005)
  killed.send_signal(signal.SIGKILL)
  assert killed.wait() == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
  assert not os.path.exists(export)

  # ... and the same command again, to the end.
  proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Resumed from step" in proc.stderr and "Exported the fine-tuned model" in proc.stderr

  got = workdir.read_metrics(str(work / workdir.METRICS))
  want = workdir.read_metrics(str(tmp_path / "ref" / workdir.METRICS))
  assert [m["step"] for m in got] == list(range(1, 41))
  for key in ("loss", "lr", "grad_norm"):
    np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want], rtol=1e-6, atol=1e-6)
  ref_export, _ = checkpoint.load(str(tmp_path / "ref_export"))
  our_export, _ = checkpoint.load(str(export))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), our_export,
               ref_export)
  assert not _temporaries(work)
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # The export's temporary.


def test_sharded_command_line_run_matches_one_device(base, compile_cache, tmp_path):
  """`--mesh` on 8 simulated CPU devices (a subprocess: the device count is fixed when jax starts),
  stopped after 2 steps and resumed from its sharded checkpoint, trains, evaluates and exports
  what one device does."""
  # eps: Adam's first step is lr * g / (|g| + eps); the default 1e-8 would turn float noise in
  # near-zero gradients (zero-initialised biases) into full-size updates of either sign.
  config = _config("all", total_steps=4, checkpoint_every=2, lr=3e-3, eps=1e-3,
                   eval_num_generate=2, eval_max_new_tokens=4)
  common = dict(base=str(base / "base"), train_jsonl=str(base / "clean.jsonl"),
                eval_jsonl=str(base / "clean.jsonl"))
  cmd = _command(config, common["base"], common["train_jsonl"], tmp_path / "work",
                 tmp_path / "export", "--mesh=data:2,fsdp:2,tensor:2",
                 f"--eval_jsonl={common['eval_jsonl']}")
  # conftest's flags (less LLVM optimisation, the faster fusion emitters) halve the compile time,
  # which dominates these runs.
  flags = [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
  env = dict(_cli_env(compile_cache), JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))

  def start(name, *extra):  # The log goes to a file: a full pipe would stall the run.
    with open(tmp_path / name, "w") as log:
      return subprocess.Popen(cmd + list(extra), cwd=ROOT, env=env, stderr=log), tmp_path / name

  def finish(proc, log):
    proc.wait(timeout=600)
    assert proc.returncode == 0, log.read_text()[-3000:]
    return log.read_text()

  stopped = start("stopped.log", "--max_steps_this_run=2")  # Runs while the reference trains here.
  trainer.train(config, workdir=str(tmp_path / "ref"), export_dir=str(tmp_path / "ref_export"),
                 **common)
  logs = [finish(*stopped)]
  assert not os.path.exists(tmp_path / "export")
  logs.append(finish(*start("resumed.log")))
  assert "Sharded over {'data': 2, 'fsdp': 2, 'tensor': 2}" in logs[0]
  assert "Resumed from step 2" in logs[1]

  got = workdir.read_metrics(str(tmp_path / "work" / "metrics.jsonl"))
  want = workdir.read_metrics(str(tmp_path / "ref" / "metrics.jsonl"))
  assert [sorted(m) for m in got] == [sorted(m) for m in want] and len(got) == 5  # 4 steps, 1 eval.
  for key in ("loss", "lr", "grad_norm", "eval_loss", "eval_exact_match"):
    np.testing.assert_allclose([m[key] for m in got if key in m], [m[key] for m in want if key in m],
                               rtol=1e-5, atol=1e-5, err_msg=key)
  ours, _ = checkpoint.load(str(tmp_path / "export"))
  ref, _ = checkpoint.load(str(tmp_path / "ref_export"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), ours, ref)
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # No temporaries left.
