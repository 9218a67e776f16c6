"""Quantized weights (paligemma_jax/model/quantize.py, on qwix): the arithmetic of int8 and int4,
the parameter tree, and a quantized checkpoint from the converter to the loader, decoding like the
float model."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import paligemma as presets
from paligemma_jax import errors
from paligemma_jax import sharding
from paligemma_jax.checkpoints import loading
from paligemma_jax.model import paligemma
from paligemma_jax.model import quantize


def test_int8_rounds_each_output_channel_to_half_a_step():
  w = np.random.RandomState(0).normal(size=(2, 6, 3, 5)).astype(np.float32)
  w[1, :, 2, 4] = 0  # An all-zero channel.
  shape = quantize.scale_shape(w.shape, (1,), "int8")
  assert shape == (2, 1, 3, 5)
  q, scale = quantize.quantize(w, shape, "int8")
  assert q.dtype == jnp.int8 and scale.shape == shape and scale.dtype == w.dtype
  want = np.abs(w).max(axis=1) / 127.5  # qwix's symmetric bound: qmax + 1/2.
  want[1, 2, 4] = 1.0  # The zero channel's scale is 1 (not 0: no division by zero).
  np.testing.assert_allclose(scale[:, 0], want, rtol=1e-6)
  assert np.abs(np.asarray(q)).max() == 127
  error = np.abs(np.asarray(quantize.dequantize(q, scale)) - w)
  assert (error <= np.asarray(scale) / 2 + 1e-7).all()
  assert (np.asarray(q)[1, :, 2, 4] == 0).all()


def test_int4_scales_each_block_of_the_last_input_axis():
  """[layers, in=2 x 256, out=3] (as attention's [heads, head_dim] inputs): one scale per layer,
  output, head and block of 128 inputs; a block never spans two heads."""
  w = np.random.RandomState(1).normal(size=(4, 2, 256, 3)).astype(np.float32)
  w[0, :, 128:, 2] = 0  # All-zero blocks.
  shape = quantize.scale_shape(w.shape, (1, 2), "int4")
  assert shape == (4, 2, 2, 3)
  q, scale = quantize.quantize(w, shape, "int4")
  assert q.dtype == jnp.int4 and scale.shape == shape
  q = np.asarray(q.astype(jnp.int8))
  assert q.min() >= -8 and q.max() <= 7
  blocks = np.abs(w.reshape(4, 2, 2, 128, 3)).max(axis=3) / 7.5  # Layer, head, block, output.
  blocks[0, :, 1, 2] = 1.0
  np.testing.assert_allclose(scale, blocks, rtol=1e-6)
  error = np.abs(np.asarray(quantize.dequantize(q.astype(jnp.int4), scale)) - w)
  assert (error <= np.repeat(np.asarray(scale), 128, axis=2) * (0.5 + 1e-5)).all()
  assert (q[0, :, 128:, 2] == 0).all()


@pytest.mark.parametrize("n, block", [(2048, 128), (2304, 128), (1152, 128), (72, 72),
                                      (96, 96), (4304, 4304), (16, 16), (200, 100)])
def test_int4_block_is_the_largest_divisor_up_to_128_or_the_axis(n, block):
  assert quantize.block_size(n) == block


@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_products_equal_the_dequantized_matrix(qtype):
  """matmul contracts any trailing axes. Weight-only (many rows; int4; GPU/TPU): x times the
  dequantized matrix. CPU int8 with few rows: activations quantized per row, within their step."""
  rng = np.random.RandomState(2)
  w = rng.normal(size=(4, 64, 6)).astype(np.float32)  # [heads, head_dim, out], as attention's o.
  q, scale = quantize.quantize(w, quantize.scale_shape(w.shape, (0, 1), qtype), qtype)
  dequantized = np.asarray(quantize.dequantize(q, scale))
  for rows in (quantize.DYNAMIC_MAX_ROWS + 1, 3):
    x = rng.normal(size=(rows, 1, 4, 64)).astype(np.float32)
    got = quantize.matmul(x, q, scale, (0, 1), jnp.float32)
    want = np.einsum("btnh,nho->bto", x, dequantized)
    dynamic = rows <= quantize.DYNAMIC_MAX_ROWS and qtype == "int8" and (
        jax.default_backend() == "cpu")
    # A row quantized to int8 is off by at most half its step (absmax / 127.5) per element.
    step = np.abs(x).max(axis=(1, 2, 3))[:, None, None] / 127.5
    bound = step / 2 * np.abs(dequantized).sum((0, 1)) + 1e-4 if dynamic else 1e-4
    assert (np.abs(np.asarray(got) - want) <= bound).all()


@pytest.mark.parametrize("rows", [1, 3, quantize.DYNAMIC_MAX_ROWS + 1])
def test_int8_gradients_are_the_weight_only_products(rows):
  """LoRA over an int8 base trains through these products: the gradient with respect to x is
  the dequantized matrix's, also where the CPU quantizes x (the rounding passes it through)."""
  rng = np.random.RandomState(3)
  w = rng.normal(size=(4, 64, 6)).astype(np.float32)
  q, scale = quantize.quantize(w, quantize.scale_shape(w.shape, (0, 1), "int8"), "int8")
  x = rng.normal(size=(rows, 4, 64)).astype(np.float32)
  dy = rng.normal(size=(rows, 6)).astype(np.float32)
  got = jax.grad(lambda x: (quantize.matmul(x, q, scale, (0, 1), jnp.float32) * dy).sum())(x)
  want = np.einsum("bo,nho->bnh", dy, np.asarray(quantize.dequantize(q, scale)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_weights_quantize_like_their_float32_values():
  w = (np.random.RandomState(4).normal(size=(64, 8)) * 3).astype(jnp.bfloat16)
  shape = quantize.scale_shape(w.shape, (0,), "int8")
  q16, s16 = quantize.quantize(jnp.asarray(w), shape, "int8")
  q32, _ = quantize.quantize(jnp.asarray(w, jnp.float32), shape, "int8")
  assert s16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(q16, q32)


def test_a_bad_quantize_value_is_an_input_error():
  config = presets.get_config("tiny-pg1")
  config.quantize = "int3"
  with pytest.raises(errors.InputError, match="quantize='int3': choose one of int8, int4"):
    quantize.qtype(config)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's matrix-vector lowering")
def test_one_row_int8_product_never_widens_the_weight_and_equals_the_batched_row():
  """XLA:CPU lowers an int8 matrix-vector product by writing an int32 copy of the whole weight
  (the 257,216-row LM head every decode step: int8 decoding was 4.7x slower than float32)."""
  w = jax.random.normal(jax.random.PRNGKey(0), (96, 160))
  q, scale = quantize.quantize(w, quantize.scale_shape(w.shape, (0,), "int8"), "int8")
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 96))
  product = jax.jit(lambda x: quantize.matmul(x, q, scale, (0,), jnp.float32))
  hlo = product.lower(x[:1]).compile().as_text()
  assert "s32[96,160]" not in hlo and "f32[96,160]" not in hlo
  np.testing.assert_array_equal(product(x[:1]), product(x)[:1])


@pytest.mark.parametrize("variant, qtype", [("tiny-pg1", "int8"), ("pg2-10b", "int8"),
                                            ("pg2-10b", "int4")])
def test_quantized_tree_is_the_float_tree_plus_scales_and_shards(variant, qtype):
  config = presets.get_config(variant)
  float_shapes = paligemma.param_shapes(config)
  qconfig = config.copy_and_resolve_references()
  qconfig.quantize = qtype
  shapes = paligemma.param_shapes(qconfig)
  qparams = jax.eval_shape(lambda p: paligemma.quantize_params(p, config, qtype)[0], float_shapes)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), qparams) == jax.tree.map(
      lambda x: (x.shape, x.dtype), shapes)
  flat = {sharding.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(qparams)[0]}
  float_flat = {sharding.path_str(p): x
                for p, x in jax.tree_util.tree_flatten_with_path(float_shapes)[0]}
  scales = {p for p in flat if p.endswith("_scale")}
  assert set(flat) - scales == set(float_flat)  # Same paths and shapes, plus one scale per matrix.
  assert all(flat[p].shape == float_flat[p].shape for p in float_flat)
  quantized = {p for p, x in flat.items() if x.dtype == quantize.QTYPES[qtype]}
  assert quantized == {p.removesuffix("_scale") for p in scales}
  blocks = 1 if qtype == "int8" else config.text.width // 128
  assert flat["llm/embedder/input_embedding_scale"].shape == (config.text.vocab_size, blocks)
  assert {p.split("/")[0] for p in quantized} == {"img", "llm"}  # SigLIP's too; not the projector.
  assert len(quantized) == 7 + 6 + 1  # Decoder q k v o gate up down, SigLIP q k v o fc1 fc2, table.
  if qtype == "int4":  # Blocks of 128 along the last input axis where it divides, else per channel.
    assert flat["llm/layers/attn/o/kernel_scale"].shape == (
        config.text.depth, config.text.num_heads, config.text.head_dim // 128, config.text.width)
    assert flat["img/layers/mlp/fc2/kernel_scale"].shape == (config.vision.depth, 1, 1152)
  # Every scale has a sharding rule of its rank (its matrix's); size-1 axes are never split.
  mesh = jax.make_mesh((1, 1, 1), sharding.AXES, devices=jax.devices()[:1])
  specs = sharding.param_specs(qparams, mesh)  # strict: raises for a leaf without a rule.
  assert jax.tree.structure(specs) == jax.tree.structure(qparams)
  assert sharding.rule_for("llm/layers/mlp/gate/kernel_scale") == sharding.rule_for(
      "llm/layers/mlp/gate/kernel")


@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_quantized_checkpoint_converts_loads_and_decodes_like_float32(
    tmp_path, converted_checkpoint, qtype):
  """Converter --quantize -> config.json says so -> loads quantized without asking, equal to
  quantizing the float checkpoint as it loads; greedy decoding keeps float32's tokens. Measured
  on this tiny model (widths 32 and 64: int4 has one block per channel; on the CPU int8 quantizes
  the activations of these 46-row products too): first-token logit error 0.42 (int8) and 3.7
  (int4) of logits with std 7.5; log-probs of the chosen tokens within 6e-4 and 3e-3. Real
  widths: the test below."""
  import hf_fixtures
  from checkpoints_convert import hf_to_orbax
  float_dir, model = converted_checkpoint(2)
  hf_dir = os.path.join(os.path.dirname(float_dir), "hf")  # Where the fixture saved it.
  out = str(tmp_path / qtype)
  hf_to_orbax.convert(hf_dir, out, progress=False, quantize=qtype)
  with open(os.path.join(out, "config.json")) as f:
    stored = json.load(f)
  assert stored["quantize"] == qtype and stored["param_dtype"] == "float32"
  stored_bytes = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(out)
                     for n in names)
  params, config, tokenizer = loading.load_model(out)
  assert quantize.qtype(config) == qtype
  assert params["llm"]["embedder"]["input_embedding"].dtype == quantize.QTYPES[qtype]
  on_load, on_load_config, _ = loading.load_model(float_dir, quantize=qtype)
  assert quantize.qtype(on_load_config) == qtype
  jax.tree.map(np.testing.assert_array_equal, params, on_load)
  fparams, fconfig, _ = loading.load_model(float_dir)
  float_bytes = sum(x.nbytes for x in jax.tree.leaves(fparams))
  assert stored_bytes < 0.5 * float_bytes

  rows = hf_fixtures.random_inputs(model, batch=2, prompt_len=6)
  tokens = rows["input_ids"].numpy().astype(np.int32)
  images = rows["pixel_values"].numpy().transpose(0, 2, 3, 1)
  mask = np.ones(tokens.shape, bool)
  (want, want_logprobs, want_logits), (got, got_logprobs, got_logits) = (
      greedy(c, p, tokens, images, mask, steps=4)
      for c, p in ((fconfig, fparams), (config, params)))
  error = float(jnp.abs(got_logits - want_logits).max())
  bound = {"int8": 0.1, "int4": 0.6}[qtype]  # Of the logits' standard deviation.
  assert 0 < error < bound * float(want_logits.std()), (error, float(want_logits.std()))
  np.testing.assert_array_equal(want, got)
  np.testing.assert_allclose(want_logprobs, got_logprobs, atol=0.01)


def greedy(config, params, tokens, images, mask, steps):
  """Greedy tokens [B, steps], their log-probabilities and the first token's logits: prefill, then
  decode_step by decode_step (cheaper to compile than autoregressive.Generator's loop; same methods)."""
  model = paligemma.PaliGemma(config)
  cache = paligemma.init_cache(config, tokens.shape[0], tokens.shape[1] + steps)
  prefill = jax.jit(lambda p, c: model.apply({"params": p}, tokens, images, mask, mask, c,
                                             method=model.prefill))
  step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c, method=model.decode_step))
  logits, cache = prefill(params, cache)
  first, chosen, logprobs = logits, [], []
  for i in range(steps):
    if i:
      logits, cache = step(params, chosen[-1], cache)
    chosen.append(jnp.argmax(logits[:, :config.image_token_id], -1))
    logprobs.append(jnp.take_along_axis(jax.nn.log_softmax(logits), chosen[-1][:, None], 1)[:, 0])
  return np.stack(chosen, 1), np.stack(logprobs, 1), first


@pytest.fixture(scope="module")
def real_width_generations(real_width_model, real_width_greedy):
  """Greedy generations of the real-width model (conftest.py) with float32, int8 and int4
  weights: prompts of 3, 11 and 20 text tokens, 16 new tokens each."""
  params, config = real_width_model
  out = {None: real_width_greedy()}  # Shared with test_kv_cache.py.
  for qtype in ("int8", "int4"):
    out[qtype] = real_width_greedy(*paligemma.quantize_params(params, config, qtype))
  return out


@pytest.mark.xdist_group("real_width")
@pytest.mark.parametrize("qtype, bound", [("int8", 0.05), ("int4", 0.3)])
def test_quantized_weights_keep_greedy_tokens_and_log_probs_at_real_widths(
    real_width_generations, qtype, bound):
  """SigLIP So400m and Gemma 2 2B widths, the 257,216-token table: the float model's greedy tokens,
  log-probs within 0.05 (int8) and 0.3 (int4, its stated bound). Measured: 0.025 and 0.25."""
  want, got = real_width_generations[None], real_width_generations[qtype]
  assert want.logprobs.min() < -0.3  # Not saturated: log-probs near 0 would hide any error.
  np.testing.assert_array_equal(got.tokens, want.tokens)
  error = np.abs(got.logprobs - want.logprobs).max()
  assert 0 < error < bound, error
