r"""Fine-tuning speed: train steps per second, ours against transformers (+ PEFT for LoRA), on the
same machine, model and batch, in one run.

  python -m paligemma_jax.benchmark --finetune_speed --variant=pg1-3b --vision_layers=2 \
    --text_layers=2 --finetune_batch_size=2 --finetune_text_len=32

Builds the component benchmark's random transformers PaliGemma (components.build_reference) at
the variant's widths with reduced depth, converts it (hf.load_hf) and times one optimizer step,
float32, no remat, on one batch of random images and tokens: per row one image's N tokens, then
--finetune_text_len text tokens, <bos> and a prompt (PROMPT_TOKENS) then a suffix that is all
loss targets. Per preset of --finetune_presets (configs/finetune.py: its optimizer, learning
rate, clipping and, for `lora`, rank, alpha and targets):

  ours                  objective.train_step as `finetune` runs it (jit, state donated)
  ours, LM head at every position
                        the same step with logits at every position, not only the text (what the
                        step did before; the head dominated it)
  ours, qwix LoraProvider adapters
                        (`lora`) the same step with qwix's LoRA (model surgery) instead of
                        lora.py's adapters on activations: why lora.py stays
  transformers          the same tensors training in PyTorch: `lora` through PEFT (LoraConfig with
                        the same rank, alpha and targets, the language model's q/k/v/o/gate/up/
                        down projections), other presets by requires_grad; torch.optim.AdamW or
                        SGD and clip_grad_norm_ as the preset's; no gradient checkpointing.
                        `qlora` (ours over an int4 base) is timed against the same PEFT LoRA over
                        the float base: bitsandbytes' 4-bit layers have no CPU kernels

The steps run in turn, one of each per round (a fair share of a CPU shared with other jobs), one
warm-up round, then the medians of --repeats rounds: wall seconds per step, the process's CPU
seconds per step, and each step's matrix-product FLOPs (`matmul_flops`) against the machine's
nominal FMA peak (`fma_peak`). The first steps' losses are printed too: the three compute the
same loss. Results go to docs/finetuning.md by hand.
"""

import functools
import math
import os
import platform
import re
import statistics
import tempfile
import time

import flax.traverse_util as traverse_util
import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import qwix

from configs import finetune as finetune_configs
from paligemma_jax import errors
from paligemma_jax.benchmarks import components
from paligemma_jax.checkpoints import hf
from paligemma_jax.model import paligemma
from paligemma_jax.training import objective

PROMPT_TOKENS = 8  # <bos> and the prompt, at the start of each row's text; the rest is targets.

# The transformers parameters a preset trains (its tensors as hf.py maps them); `lora` uses PEFT.
TORCH_TRAINABLE = {
    "attn": r"model\.language_model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight",
    "llm": r"model\.language_model\..*",  # The embedding table is also the (tied) head.
    "all": r".*",
}
# PEFT's module names for the kernels of configs/finetune.py's default lora.targets.
PEFT_TARGETS = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


QWIX = "ours, qwix LoraProvider adapters"


def random_batch(config, batch_size: int, text_len: int, seed: int = 0) -> dict:
  """A training batch (data.TrainLoader's arrays), one image per row: N image tokens, <bos>, a
  prompt, then a suffix to the end of the `text_len` text tokens, all of it loss targets."""
  n, s = paligemma.num_image_tokens(config), config.vision.image_size
  rng = np.random.default_rng(seed)
  text = rng.integers(10, 1000, (batch_size, text_len))
  text[:, 0] = 2  # <bos>
  tokens = np.concatenate([np.full((batch_size, n), config.image_token_id), text], 1)
  prefix_mask = np.broadcast_to(np.arange(n + text_len) < n + PROMPT_TOKENS, tokens.shape)
  return dict(tokens=tokens.astype(np.int32),
              images=rng.uniform(-1, 1, (batch_size, s, s, 3)).astype(np.float32),
              input_mask=np.ones(tokens.shape, bool), prefix_mask=prefix_mask.copy(),
              loss_mask=~prefix_mask)


def matmul_flops(fn, *args) -> float:
  """2 x the multiply-adds of the matrix products and convolutions in `fn(*args)`'s jaxpr, a scan
  body once per iteration (XLA's cost analysis counts a loop body once: it misses the layers)."""
  return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_flops(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    out = eqn.outvars[0].aval.shape if eqn.outvars else ()
    if eqn.primitive.name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(out) * math.prod(lhs[d] for d in contracting)
    elif eqn.primitive.name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape  # Per output element: the kernel of one output feature.
      total += 2 * math.prod(out) * math.prod(rhs) / rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    inner = sum(_jaxpr_flops(j) for j in _sub_jaxprs(eqn.params))
    total += inner * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
  return total


def _sub_jaxprs(params):
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax_core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax_core.Jaxpr):
        yield v


def _cpuinfo() -> dict:
  """The first CPU's fields in /proc/cpuinfo (none where there is no such file)."""
  fields = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return fields


def cpu_model() -> str:
  """The CPU's model name (lscpu's "Model name")."""
  return _cpuinfo().get("model name") or platform.processor() or "unknown CPU"


def fma_peak() -> tuple[float, str]:
  """(nominal float32 FLOP/s, how it was estimated): CPUs x 2 FMA pipes x float32 lanes per
  pipe x 2 FLOP x the clock /proc/cpuinfo reports (a virtual machine's is the TSC's). Lanes: 16
  on an Intel AVX-512 core, else 8 with AVX2/FMA (AMD Zen 4 runs AVX-512 as two 256-bit halves),
  else 4. An estimate: cores boosting above the reported clock exceed it, narrower pipes fall
  short."""
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  fields = _cpuinfo()
  flags, ghz = set(fields.get("flags", "").split()), float(fields.get("cpu MHz", 0)) / 1e3
  if "avx512f" in flags and fields.get("vendor_id") == "GenuineIntel":
    lanes = 16
  else:
    lanes = 8 if {"avx2", "fma"} <= flags else 4
  how = f"{cpus} CPUs x 2 FMA pipes x {lanes} float32 lanes x 2 FLOP x {ghz:.2f} GHz"
  return cpus * 2 * lanes * 2 * ghz * 1e9, how


def matmul_rate(repeats: int = 5) -> float:
  """The best FLOP/s of an XLA float32 matrix product as large as a layer's MLP over a batch."""
  a, b = jnp.ones((1024, 2048), jnp.float32), jnp.ones((2048, 16384), jnp.float32)
  product = jax.jit(lambda a, b: a @ b)
  product(a, b).block_until_ready()

  def seconds():
    start = time.perf_counter()
    product(a, b).block_until_ready()
    return time.perf_counter() - start

  return 2 * a.shape[0] * a.shape[1] * b.shape[1] / min(seconds() for _ in range(repeats))


def our_step(config, params, preset: str, batch, max_text_len: int | None):
  """(run: one of our train steps on `batch` -> its loss, the step's matmul FLOPs);
  max_text_len None: the LM head at every position."""
  ft = finetune_configs.get_config(preset)
  if ft.quantize:  # QLoRA: the base quantized as `finetune` loads it.
    params, config = paligemma.quantize_params(params, config, ft.quantize)
  par, trainable, frozen = objective.init_trainable(ft, params, jax.random.PRNGKey(0),
                                                    jnp.dtype(config.param_dtype))
  # A copy: the state is donated, and `params` (the frozen tree of other steps) holds its leaves.
  return _step_runner(ft, paligemma.PaliGemma(config), par, jax.tree.map(jnp.copy, trainable),
                      frozen, batch, max_text_len)


def _step_runner(ft, model, parametrization, trainable, frozen, batch, max_text_len):
  """(run: objective.train_step, jitted with its state donated, on `batch` -> its loss, the
  step's matmul FLOPs), with the optimizer of the fine-tuning config `ft`."""
  tx, schedule = objective.make_optimizer(ft)
  state = objective.init_state(trainable, tx, jax.random.PRNGKey(1))
  fn = functools.partial(objective.train_step, model=model, parametrization=parametrization,
                         tx=tx, schedule=schedule, max_text_len=max_text_len)
  flops = matmul_flops(fn, state, frozen, batch)
  step = jax.jit(fn, donate_argnums=0)

  def run():
    nonlocal state
    state, metrics = step(state, frozen, batch)
    return float(metrics["loss"])

  return run, flops


def qwix_lora_step(config, params, batch, max_text_len: int):
  """(run, FLOPs) of our LoRA train step with qwix's adapters instead of lora.py's: the model
  under qwix.LoraProvider (same targets, rank and alpha; A drawn like lora.init, B zero), the
  adapters trained as the step's only parameters, the same loss, optimizer and batch."""
  ft = finetune_configs.get_config("lora")
  targets = ft.lora.targets.removesuffix("/kernel")  # qwix matches the layer, not the kernel.
  model = qwix.apply_lora_to_model(paligemma.PaliGemma(config), qwix.LoraProvider(
      module_path=targets, rank=ft.lora.rank, alpha=ft.lora.alpha))
  images, _ = paligemma.images_per_row(batch["images"])
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch["tokens"], images,
                                             batch["input_mask"], batch["prefix_mask"]))
  flat = traverse_util.flatten_dict(shapes["params"], sep="/")
  draw = np.random.default_rng(0)
  adapters = {p: (draw.standard_normal(x.shape, np.float32) * np.float32(x.shape[-2]**-0.5)
                  if p.endswith("_lora_a") else np.zeros(x.shape, np.float32))
              for p, x in flat.items() if p.endswith(("_lora_a", "_lora_b"))}
  # The adapters are the model's own parameters: trained as `trainable`, no LoRA apply.
  return _step_runner(ft, model, objective.Parametrization(),
                      jax.device_put(traverse_util.unflatten_dict(adapters, sep="/")), params,
                      batch, max_text_len)


def transformers_step(model, preset: str, batch):
  """(run: one transformers train step on `batch` -> its loss, undo: the model as it was)."""
  import torch  # Benchmark-only dependencies, like the tests'.
  ft = finetune_configs.get_config(preset)
  undo = lambda: model
  if ft.trainable == "lora":  # qlora too: bitsandbytes' quantized layers have no CPU kernels.
    peft = _peft()
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=ft.lora.rank, lora_alpha=ft.lora.alpha, lora_dropout=0.0, target_modules=PEFT_TARGETS))
    undo = model.unload
  else:
    for name, p in model.named_parameters():
      p.requires_grad_(re.fullmatch(TORCH_TRAINABLE[preset], name) is not None)
  trainable = [p for p in model.parameters() if p.requires_grad]
  if ft.optimizer == "adamw":
    opt = torch.optim.AdamW(trainable, lr=ft.lr, betas=(ft.b1, ft.b2), eps=ft.eps,
                            weight_decay=ft.weight_decay)
  else:
    opt = torch.optim.SGD(trainable, lr=ft.lr, momentum=ft.momentum)
  model.train()
  tokens = torch.tensor(batch["tokens"], dtype=torch.long)
  loss_mask = torch.tensor(batch["loss_mask"])
  kwargs = dict(input_ids=tokens,
                pixel_values=torch.tensor(batch["images"].transpose(0, 3, 1, 2)).to(model.dtype),
                attention_mask=torch.tensor(batch["input_mask"], dtype=torch.long),
                token_type_ids=loss_mask.long(), labels=torch.where(loss_mask, tokens, -100))

  def run():
    loss = model(**kwargs).loss
    loss.backward()
    if ft.grad_clip:
      torch.nn.utils.clip_grad_norm_(trainable, ft.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()

  return run, undo


def _peft():
  try:
    import peft
  except ImportError:
    raise errors.InputError("--finetune_speed times transformers + PEFT for LoRA: pip install "
                            "peft, or pass --skip_transformers.") from None
  return peft


def time_in_turn(steps: dict, repeats: int) -> dict:
  """name -> dict(wall, cpu: median seconds per step, loss: the first step's): one step of each
  per round, after a warm-up round (compiles)."""
  results = {name: dict(loss=run(), wall=[], cpu=[]) for name, run in steps.items()}
  for _ in range(repeats):
    for name, run in steps.items():
      wall, cpu = time.perf_counter(), time.process_time()
      run()
      results[name]["wall"].append(time.perf_counter() - wall)
      results[name]["cpu"].append(time.process_time() - cpu)
  for r in results.values():
    r["wall"], r["cpu"] = statistics.median(r["wall"]), statistics.median(r["cpu"])
  return results


def run(f):
  """The fine-tuning speed table for flags `f` (benchmark.py's)."""
  for preset in f.finetune_presets:
    if preset not in finetune_configs.PRESETS:
      raise errors.InputError(f"--finetune_presets: {preset!r} is not one of "
                              f"{', '.join(finetune_configs.PRESETS)}.")
  uses_peft = {"lora", "qlora"} & set(f.finetune_presets)
  if uses_peft and not f.skip_transformers:
    _peft()  # Missing: said now, not after the model is built.
  dtype = f.dtype or "float32"
  with tempfile.TemporaryDirectory() as directory:
    model = components.build_reference(f.variant, f.vision_layers, f.text_layers, directory)
    params, config, _ = hf.load_hf(directory, dtype=dtype)
  config.update(dtype=dtype, remat=False)
  versions = f"jax {jax.__version__}"
  if f.skip_transformers:
    model = None
  else:
    import torch
    import transformers
    model = model.to(getattr(torch, dtype))
    versions += f", torch {torch.__version__}, transformers {transformers.__version__}"
    if uses_peft:
      versions += f", peft {_peft().__version__}"
  params = jax.device_put(params)
  batch = random_batch(config, f.finetune_batch_size, f.finetune_text_len)
  n = paligemma.num_image_tokens(config)
  peak, how = fma_peak()
  print(f"CPU: {cpu_model()}; nominal FMA peak {how} = {peak / 1e9:.0f} GFLOP/s; XLA float32 "
        f"matmul {matmul_rate() / 1e9:.0f} GFLOP/s (best of 5); {versions}")
  print(f"model: {f.variant} widths, {f.vision_layers}+{f.text_layers} layers, {dtype}, no "
        f"remat; batch {f.finetune_batch_size} x ({n} image + {f.finetune_text_len} text tokens, "
        f"{f.finetune_text_len - PROMPT_TOKENS} targets per row); steps in turn, medians of "
        f"{f.repeats} rounds")
  every = "ours, LM head at every position"
  rows, losses = [], []
  for preset in f.finetune_presets:
    ours, flops = our_step(config, params, preset, batch, f.finetune_text_len)
    before, flops_before = our_step(config, params, preset, batch, None)
    steps, theirs, undo = {"ours": ours, every: before}, None, None
    step_flops = {"ours": flops, every: flops_before}
    if preset == "lora":
      steps[QWIX], step_flops[QWIX] = qwix_lora_step(config, params, batch, f.finetune_text_len)
    if model is not None:
      theirs = "transformers + PEFT" if preset in uses_peft else "transformers"
      steps[theirs], undo = transformers_step(model, preset, batch)
    results = time_in_turn(steps, f.repeats)
    if undo:
      model = undo()
    for name, r in results.items():
      rows.append((preset, name, r, step_flops.get(name), results.get(theirs)))
    losses.append(f"{preset}: " + ", ".join(f"{name} {r['loss']:.4f}"
                                            for name, r in results.items()))
    del steps, ours, before

  print("\n| preset | step | s/step | CPU s/step | steps/s | GFLOP/step | GFLOP/s (of nominal "
        "peak) | speed / transformers |")
  print("|---|---|---|---|---|---|---|---|")
  for preset, name, r, step_flops, reference in rows:
    gflops = f"{step_flops / 1e9:.4g}" if step_flops else "-"
    rate = (f"{step_flops / r['wall'] / 1e9:.0f} ({step_flops / r['wall'] / peak:.0%})"
            if step_flops else "-")
    ratio = f"{reference['wall'] / r['wall']:.2f}x" if reference else "-"
    print(f"| {preset} | {name} | {r['wall']:.2f} | {r['cpu']:.2f} | {1 / r['wall']:.3f} | "
          f"{gflops} | {rate} | {ratio} |")
  print("\nfirst-step losses (the same loss): " + "; ".join(losses))
