"""int8 weights (paligemma_jax/model/quantize.py): the arithmetic, the parameter tree, the quality of
both CPU products against float32, and an int8 checkpoint from the converter to the loader."""

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


def test_quantize_rounds_each_output_channel_to_half_a_step():
  w = np.random.RandomState(0).normal(size=(2, 6, 3, 5)).astype(np.float32)
  w[1, :, 2, 4] = 0  # An all-zero channel.
  q, scale = quantize.quantize(w, (1,))
  assert q.dtype == jnp.int8 and scale.shape == (2, 1, 3, 5)
  want = np.abs(w).max(axis=1) / 127
  want[1, 2, 4] = 1.0  # The zero channel's scale is 1 (not 0: no division by zero).
  np.testing.assert_allclose(scale[:, 0], want, rtol=1e-6)
  assert np.abs(np.asarray(q)).max() == 127  # Symmetric: the largest magnitude maps to +-127.
  error = np.abs(np.asarray(quantize.dequantize(q, scale)) - w)
  assert (error <= np.asarray(scale) / 2 + 1e-7).all()
  assert (np.asarray(q)[1, :, 2, 4] == 0).all()


@pytest.mark.parametrize("variant", ["tiny-pg1", "pg2-10b"])
def test_int8_tree_is_the_float_tree_plus_scales_and_shards(variant):
  config = presets.get_config(variant)
  float_shapes = paligemma.param_shapes(config)
  qconfig = config.copy_and_resolve_references()
  qconfig.quantize = "int8"
  shapes = paligemma.param_shapes(qconfig)
  qparams = jax.eval_shape(lambda p: paligemma.quantize_params(p, config)[0], float_shapes)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), qparams) == jax.tree.map(
      lambda x: (x.shape, x.dtype), shapes)
  flat = {sharding.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(qparams)[0]}
  float_flat = {sharding.path_str(p): x
                for p, x in jax.tree_util.tree_flatten_with_path(float_shapes)[0]}
  scales = {p for p in flat if p.endswith("_scale")}
  assert set(flat) - scales == set(float_flat)  # Same paths and shapes, plus one scale per matrix.
  assert all(flat[p].shape == float_flat[p].shape for p in float_flat)
  int8 = {p for p, x in flat.items() if x.dtype == jnp.int8}
  assert int8 == {p.removesuffix("_scale") for p in scales}
  assert flat["llm/embedder/input_embedding_scale"].shape == (config.text.vocab_size, 1)
  assert {p.split("/")[0] for p in int8} == {"img", "llm"}  # SigLIP's too; not the projector.
  assert len(int8) == 7 + 6 + 1  # Decoder q k v o gate up down, SigLIP q k v o fc1 fc2, embedding.
  # Every scale has a sharding rule of its rank (its matrix's); size-1 axes are never split.
  mesh = jax.make_mesh((1, 1, 1), sharding.AXES, devices=jax.devices()[:1])
  specs = sharding.param_specs(qparams, mesh)  # strict: raises for a leaf without a rule.
  assert jax.tree.structure(specs) == jax.tree.structure(qparams)
  assert sharding.rule_for("llm/layers/mlp/gate/kernel_scale") == sharding.rule_for(
      "llm/layers/mlp/gate/kernel")


def test_int8_checkpoint_converts_loads_and_decodes_like_float32(tmp_path, converted_checkpoint,
                                                                 monkeypatch):
  """Converter --quantize=int8 -> config.json says int8 -> loads as int8 without asking, equal to
  quantizing the float checkpoint as it loads; greedy decoding keeps float32's tokens, with both
  CPU products: weight-only in the prefill (46 rows), int8 activations in the LM head and decode
  steps (2 rows). Measured: first-token max logit error 0.43 for logits of std 7.5 and max 29;
  log-probabilities of the chosen tokens within 5e-4."""
  monkeypatch.setattr(quantize, "DYNAMIC_MAX_ROWS", 40)
  import hf_fixtures
  from checkpoints_convert import hf_to_orbax
  float_dir, model = converted_checkpoint(2)
  hf_dir = os.path.join(os.path.dirname(float_dir), "hf")  # Where the fixture saved it.
  hf_to_orbax.convert(hf_dir, str(tmp_path / "int8"), progress=False, quantize="int8")
  with open(tmp_path / "int8" / "config.json") as f:
    stored = json.load(f)
  assert stored["quantize"] == "int8" and stored["param_dtype"] == "float32"
  stored_bytes = sum(os.path.getsize(os.path.join(d, n))
                     for d, _, names in os.walk(tmp_path / "int8") for n in names)
  params, config, tokenizer = loading.load_model(str(tmp_path / "int8"))
  assert quantize.enabled(config) and params["llm"]["embedder"]["input_embedding"].dtype == jnp.int8
  on_load, on_load_config, _ = loading.load_model(float_dir, quantize="int8")
  assert quantize.enabled(on_load_config)
  jax.tree.map(np.testing.assert_array_equal, params, on_load)
  from configs import finetune as finetune_configs
  from paligemma_jax.training import trainer
  with pytest.raises(errors.InputError, match="is an int8 checkpoint: fine-tune the float"):
    trainer._setup(finetune_configs.get_config("lora"), str(tmp_path / "int8"), "unread.jsonl",
                   None, None)  # Refused before the data is read: LoRA cannot wrap int8 layers.
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
  assert 0 < error < 0.1 * float(want_logits.std()), (error, float(want_logits.std()))
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


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's matrix-vector lowering")
def test_one_row_product_never_widens_the_weight_and_equals_the_batched_row():
  """XLA:CPU lowers an int8 matrix-vector product by writing an int32 copy of the whole weight
  (the 257,216-row LM head every decode step: int8 decoding was 4.7x slower than float32)."""
  w = jax.random.normal(jax.random.PRNGKey(0), (96, 160))
  q, scale = quantize.quantize(w, (0,))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 96))
  one_row = jax.jit(lambda x: quantize.matmul(x, q, scale, (0,), jnp.float32))
  hlo = one_row.lower(x[:1]).compile().as_text()
  assert "s32[96,160]" not in hlo and "f32[96,160]" not in hlo
  np.testing.assert_array_equal(one_row(x[:1]), one_row(x)[:1])
