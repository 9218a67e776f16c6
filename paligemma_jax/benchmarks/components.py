"""Component timings, ours against transformers: prefill, decode per token, beam search,
scoring and compile time, on a random model at a variant's real widths (see benchmark.py)."""

import functools
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import paligemma as presets
from paligemma_jax.checkpoints import hf
from paligemma_jax.decoding import autoregressive
from paligemma_jax.decoding import batching
from paligemma_jax.decoding import beam_search
from paligemma_jax.decoding import core
from paligemma_jax.decoding import sampling
from paligemma_jax.decoding import scoring
from paligemma_jax.model import paligemma


def median_seconds(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def memory_bandwidth_gbs(repeats=5):
  """GB/s of a float32 matrix-vector product over a 1 GiB matrix: the decode roofline."""
  w = jnp.ones((16384, 16384), jnp.float32)
  x = jnp.ones((16384,), jnp.float32)
  matvec = jax.jit(lambda w, x: w @ x)
  matvec(w, x).block_until_ready()
  return w.nbytes / median_seconds(lambda: matvec(w, x).block_until_ready(), repeats) / 1e9


def matmul_peak_gflops(dtype, repeats=5):
  """GFLOP/s of a large square matrix product in `dtype`: the arithmetic roofline (FMA peak as
  XLA reaches it), which bounds decode once enough rows share each weight read."""
  n = 2048 if jax.default_backend() == "cpu" else 8192
  a = jnp.ones((n, n), dtype)
  product = jax.jit(lambda a: a @ a)
  product(a).block_until_ready()
  return 2 * n**3 / median_seconds(lambda: product(a).block_until_ready(), repeats) / 1e9


def decode_limits_ms(llm_params, batch, bandwidth_gbs, peak_gflops):
  """(bandwidth, arithmetic) lower bounds on a decode step's ms for `batch` rows: every decoder
  weight read once, and multiplied once per row (2 FLOPs; the table as the head, attention over
  the cache left out: ~1% at these lengths). The step's limit is the larger."""
  leaves = jax.tree_util.tree_leaves(llm_params)
  flops = 2 * batch * sum(x.size for x in leaves if x.ndim >= 2)
  return (sum(x.nbytes for x in leaves) / bandwidth_gbs / 1e6, flops / peak_gflops / 1e6)


def build_reference(variant, vision_layers, text_layers, directory):
  """A random transformers PaliGemma at real widths, saved in the Hub's format."""
  import torch  # Benchmark-only dependency, like the tests.
  import transformers
  cfg = presets.get_config(variant)
  v, t = cfg.vision, cfg.text
  text = dict(model_type=t.family, vocab_size=t.vocab_size, hidden_size=t.width,
              num_hidden_layers=text_layers, num_attention_heads=t.num_heads,
              num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim, intermediate_size=t.mlp_dim)
  if t.family == "gemma2":
    text.update(query_pre_attn_scalar=int(t.query_pre_attn_scalar), sliding_window=t.sliding_window,
                attn_logit_softcapping=t.attn_logit_softcap, final_logit_softcapping=t.final_logit_softcap)
  config = transformers.PaliGemmaConfig(
      vision_config=dict(model_type="siglip_vision_model", hidden_size=v.width, intermediate_size=v.mlp_dim,
                         num_hidden_layers=vision_layers, num_attention_heads=v.num_heads,
                         patch_size=v.patch_size, image_size=v.image_size, vision_use_head=False),
      text_config=text, image_token_index=cfg.image_token_id, projection_dim=t.width, hidden_size=t.width)
  torch.manual_seed(0)
  model = transformers.PaliGemmaForConditionalGeneration(config).eval()
  model.save_pretrained(directory)
  return model


def time_ours(config, params, inputs, batch, new_tokens, repeats):
  # -1: never stop early. As Predictor does, ids from the image token on are never sampled.
  generator = autoregressive.Generator(params, config, eos_id=-1, vocab_size=config.image_token_id)
  params = generator.params  # The decoding layout (per-layer weights on CPU).
  prefill, loop = generator.compiled(new_tokens)
  args = [np.repeat(x, batch, axis=0) for x in inputs]
  rng = core.row_keys(jax.random.PRNGKey(0), range(batch))
  start = time.perf_counter()
  sampler = sampling.Sampler().as_arrays()
  jax.block_until_ready(loop(params, prefill(params, *args, rng, sampler)))
  first_call = time.perf_counter() - start
  prefill_s = median_seconds(lambda: jax.block_until_ready(prefill(params, *args, rng, sampler)), repeats)
  loop_times = []
  for _ in range(repeats):
    state = jax.block_until_ready(prefill(params, *args, rng, sampler))
    start = time.perf_counter()
    jax.block_until_ready(loop(params, state))
    loop_times.append(time.perf_counter() - start)
  decode_s = statistics.median(loop_times) / (new_tokens - 1)
  return dict(prefill=prefill_s, decode=decode_s, first_call=first_call)


def time_transformers(model, inputs, batch, new_tokens, repeats, **generate_kwargs):
  import torch
  tokens, images, input_mask, prefix_mask = (np.repeat(x, batch, axis=0) for x in inputs)
  kwargs = dict(input_ids=torch.tensor(tokens, dtype=torch.long),
                pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
                attention_mask=torch.tensor(input_mask, dtype=torch.long),
                token_type_ids=torch.tensor(~prefix_mask, dtype=torch.long), do_sample=False)

  def run(n):
    with torch.no_grad():
      model.generate(**kwargs, **generate_kwargs, max_new_tokens=n, min_new_tokens=n)

  run(2)  # Warm-up.
  prefill_s = median_seconds(lambda: run(1), repeats)
  total_s = median_seconds(lambda: run(new_tokens), repeats)
  return dict(prefill=prefill_s, decode=(total_s - prefill_s) / (new_tokens - 1))


def time_beams(config, params, inputs, batch, new_tokens, repeats, beam_size):
  """Seconds per generated token (per decode step, as `time_ours`) of our beam search; eos -1:
  no hypothesis finishes early, so every run takes all `new_tokens` steps."""
  generator = autoregressive.Generator(params, config, eos_id=-1, vocab_size=config.image_token_id)
  prefill, search = beam_search.BeamGenerator(generator).compiled(beam_size, new_tokens)
  args = [np.repeat(x, batch, axis=0) for x in inputs]
  prompt = lambda: jax.block_until_ready(prefill(generator.params, *args))
  run = lambda out: jax.block_until_ready(search(generator.params, *out, np.float32(1)))
  run(prompt())  # Compile.
  times = []
  for _ in range(repeats):
    out = prompt()
    start = time.perf_counter()
    run(out)
    times.append(time.perf_counter() - start)
  return statistics.median(times) / (new_tokens - 1)


def scoring_rows(inputs, choices, rng, suffix_tokens=8):
  """`choices` rows (tokens, prefix_mask, num_targets, pixels, group) continuing one prompt, each
  with `suffix_tokens` random tokens and <eos> (id 1)."""
  prompt, pixels = inputs[0][0], inputs[1][0]
  rows = []
  for _ in range(choices):
    tokens = np.concatenate([prompt, rng.randint(10, 1000, size=suffix_tokens), [1]]).astype(np.int32)
    rows.append((tokens, np.arange(len(tokens)) < len(prompt), suffix_tokens + 1, [pixels], 0))
  return rows


def time_scoring_ours(config, params, rows, repeats):
  """One example's answers: the prompt once into a KV cache, each answer on a copy."""
  fn = jax.jit(functools.partial(scoring.suffix_logprobs, scoring.make_setup(config)))
  batch = scoring.collate(rows, len(rows), batching.DEFAULT_BUCKET, scoring.DEFAULT_TARGET_BUCKET)
  jax.block_until_ready(fn(params, *batch))
  return median_seconds(lambda: jax.block_until_ready(fn(params, *batch)), repeats)


def time_scoring_transformers(model, rows, repeats):
  """The same answers as one forward over whole rows, logits only where a target is predicted."""
  import torch
  tokens = torch.tensor(np.stack([r[0] for r in rows]), dtype=torch.long)
  kwargs = dict(input_ids=tokens, pixel_values=torch.tensor(np.stack([r[3][0] for r in rows]).transpose(0, 3, 1, 2)),
                attention_mask=torch.ones_like(tokens),
                token_type_ids=torch.tensor(np.stack([~r[1] for r in rows]), dtype=torch.long),
                logits_to_keep=rows[0][2] + 1)

  def run():
    with torch.no_grad():
      logits = model(**kwargs).logits[:, :-1]
      torch.log_softmax(logits, -1).gather(-1, tokens[:, -rows[0][2]:, None])

  run()
  return median_seconds(run, repeats)


def compile_seconds(variant, quantize=None):
  """Compile time of prefill + decode loop for the full-depth preset (no weights allocated)."""
  config = presets.get_config(variant)
  config.quantize = quantize
  generator = autoregressive.Generator(None, config)
  shapes = jax.eval_shape(generator.decoding_layout, paligemma.param_shapes(config))
  prefill, loop = generator.compiled(32)
  n, s = paligemma.num_image_tokens(config), config.vision.image_size
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
  args = (shapes, spec((1, n + 32), jnp.int32), spec((1, s, s, 3), jnp.float32),
          spec((1, n + 32), bool), spec((1, n + 32), bool),
          core.row_keys(jax.random.PRNGKey(0), [0]),
          sampling.Sampler().as_arrays())
  start = time.perf_counter()
  prefill.lower(*args).compile()
  loop.lower(shapes, jax.eval_shape(prefill, *args)).compile()
  return time.perf_counter() - start


def run(f):
  """The component tables for flags `f` (benchmark.py's)."""
  dtype = f.dtype or "float32"
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  with tempfile.TemporaryDirectory() as directory:
    model = build_reference(f.variant, f.vision_layers, f.text_layers, directory)
    params, config, _ = hf.load_hf(directory, dtype=dtype)
  config.dtype = dtype
  if f.quantize:
    params, config = paligemma.quantize_params(params, config, f.quantize)
  if f.skip_transformers:
    del model
  params = jax.device_put(params)

  n = paligemma.num_image_tokens(config)
  rng = np.random.RandomState(0)
  text = rng.randint(10, 1000, size=f.text_tokens)
  tokens = np.concatenate([np.full(n, config.image_token_id), [2], text])[None].astype(np.int32)
  images = rng.uniform(-1, 1, (1, config.vision.image_size, config.vision.image_size, 3)).astype(np.float32)
  ones = np.ones(tokens.shape, bool)
  inputs = (tokens, images, ones, ones)

  llm_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params["llm"]))
  bandwidth, peak = memory_bandwidth_gbs(), matmul_peak_gflops(dtype)
  limits = {b: decode_limits_ms(params["llm"], b, bandwidth, peak) for b in map(int, f.batch_sizes)}
  print(f"model: {f.variant} widths{f', {f.quantize} weights' if f.quantize else ''}, "
        f"{f.vision_layers}+{f.text_layers} layers, "
        f"prompt {tokens.shape[1]} tokens, {f.new_tokens} new; decoder weights "
        f"{llm_bytes / 1e9:.2f} GB at {bandwidth:.1f} GB/s; {dtype} matmul peak {peak:.0f} GFLOP/s")
  rows = []
  for batch in map(int, f.batch_sizes):
    ours = time_ours(config, params, inputs, batch, f.new_tokens, f.repeats)
    ref = None if f.skip_transformers else time_transformers(model, inputs, batch, f.new_tokens,
                                                             f.repeats)
    rows.append((batch, ours, ref))
  score_rows = scoring_rows(inputs, f.choices, rng)
  score_ours = time_scoring_ours(config, params, score_rows, f.repeats)
  score_ref = (None if f.skip_transformers
               else time_scoring_transformers(model, score_rows, f.repeats))

  ratio = lambda ref, ours: f"{ref / ours:.2f}x" if ref else "-"
  fmt = lambda s: f"{s * 1e3:.1f}" if s is not None else "-"
  print("\n| batch | metric | ours | transformers | transformers / ours |")
  print("|---|---|---|---|---|")
  for batch, ours, ref in rows:
    ref = ref or {}
    print(f"| {batch} | prefill ms | {fmt(ours['prefill'])} | {fmt(ref.get('prefill'))} | "
          f"{ratio(ref.get('prefill'), ours['prefill'])} |")
    print(f"| {batch} | decode ms/token | {fmt(ours['decode'])} | {fmt(ref.get('decode'))} | "
          f"{ratio(ref.get('decode'), ours['decode'])} |")
    limit = max(limits[batch])
    of_limit = lambda d: f"{d * 1e3 / limit:.2f}x" if d else "-"
    print(f"| {batch} | decode / limit ({limit:.1f} ms) | {of_limit(ours['decode'])} | "
          f"{of_limit(ref.get('decode'))} | - |")
    tps = lambda d: f"{batch / d:.1f}" if d else "-"
    print(f"| {batch} | decode tokens/s | {tps(ours['decode'])} | {tps(ref.get('decode'))} | "
          f"{ratio(ref.get('decode'), ours['decode'])} |")
    print(f"| {batch} | first call (compile + run) s | {ours['first_call']:.1f} | - | - |")
  print(f"| 1 x {f.choices} answers | score ms | {fmt(score_ours)} | {fmt(score_ref)} | "
        f"{ratio(score_ref, score_ours)} |")
  if f.beam_sizes:
    print("\n| batch | decoding | ours ms/token | transformers ms/token | transformers / ours "
          "| ours / our greedy |")
    print("|---|---|---|---|---|---|")
  for batch, greedy, ref in rows:
    for k in map(int, f.beam_sizes):
      ours = time_beams(config, params, inputs, batch, f.new_tokens, f.repeats, k)
      theirs = None if f.skip_transformers else time_transformers(
          model, inputs, batch, f.new_tokens, f.repeats, num_beams=k, early_stopping=True)["decode"]
      print(f"| {batch} | beam {k} | {fmt(ours)} | {fmt(theirs)} | {ratio(theirs, ours)} | "
            f"{ours / greedy['decode']:.2f}x |")
  print("\n| batch | ours ms/step | bandwidth limit ms | arithmetic limit ms | ours / limit |")
  print("|---|---|---|---|---|")
  for batch, ours, _ in rows:
    bandwidth_ms, arithmetic_ms = limits[batch]
    print(f"| {batch} | {fmt(ours['decode'])} | {bandwidth_ms:.1f} | {arithmetic_ms:.1f} | "
          f"{ours['decode'] * 1e3 / max(limits[batch]):.2f}x |")
  print(f"compile time, full {f.variant} config (prefill + decode loop): "
        f"{compile_seconds(f.variant, f.quantize):.1f} s")
