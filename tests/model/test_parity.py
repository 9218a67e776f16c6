"""Logits parity with transformers' PaliGemmaForConditionalGeneration on converted checkpoints."""

import jax
import numpy as np
import pytest
import torch

import hf_fixtures
from hf_fixtures import max_error, padded_batch, reference_logits
from configs import paligemma as presets
from paligemma_jax.checkpoints import hf
from paligemma_jax.model import attention_mask
from paligemma_jax.model import gemma
from paligemma_jax.model import paligemma

RTOL = 1e-4  # Of the logit scale (max |logit|).






def our_logits(params, config, tokens, images, input_mask, prefix_mask, jit=True):
  """Jitted (one program a shape), or op by op (each op compiled once a shape and reused: faster
  for the tolerance tests below, which run many configs over one batch)."""
  apply = lambda p, *batch: paligemma.PaliGemma(config).apply({"params": p}, *batch)
  return np.asarray((jax.jit(apply) if jit else apply)(params, tokens, images, input_mask,
                                                        prefix_mask))




CASES = [  # version, image size (tiny 16 ~ 224 px, 32 ~ 448 px), tensor naming, sharded files
    (1, 16, "transformers5", False),
    (1, 32, "hub", True),
    (2, 16, "hub", False),
    (2, 32, "in_memory", True),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"pg{c[0]}-{c[1]}px-{c[2]}-{'sharded' if c[3] else 'single'}")
def converted(request, tmp_path_factory):
  version, image_size, naming, sharded = request.param
  ref = hf_fixtures.make_hf_paligemma(str(tmp_path_factory.mktemp("hf") / "ckpt"), version=version,
                                      image_size=image_size, naming=naming, sharded=sharded)
  params, config, _ = hf.load_hf(ref.path)
  return ref.model, params, config


def test_padded_prefix_suffix_batch_matches_transformers(converted):
  model, params, config = converted
  n = paligemma.num_image_tokens(config)
  # Two rows of different lengths (padding), each with a prefix and a causal suffix of 11+ tokens,
  # longer than the tiny Gemma 2 sliding window of 8, so the window cuts.
  batch = padded_batch(config, lengths=[n + 26, n + 19], prefix_lengths=[n + 9, n + 5])
  ours, theirs = our_logits(params, config, *batch), reference_logits(model, *batch)
  assert max_error(ours, theirs, batch[2]) < RTOL
  assert np.abs(theirs).max() > 5.0  # The logit scale is not trivially small.


def test_each_row_matches_its_unbatched_run(converted):
  _, params, config = converted
  n = paligemma.num_image_tokens(config)
  tokens, images, input_mask, prefix_mask = padded_batch(config, [n + 20, n + 12], [n + 8, n + 12])
  batched = our_logits(params, config, tokens, images, input_mask, prefix_mask)
  for b, length in enumerate([n + 20, n + 12]):
    single = our_logits(params, config, tokens[b:b + 1, :length], images[b:b + 1],
                        input_mask[b:b + 1, :length], prefix_mask[b:b + 1, :length])
    np.testing.assert_allclose(batched[b, :length], single[0], atol=1e-5 * np.abs(single).max())


# Each variation breaks one numeric detail; the parity tolerance must catch every one of them.
BREAKS = {
    "attention softcap off": lambda c: c.text.update(attn_logit_softcap=0.0),
    "final softcap off": lambda c: c.text.update(final_logit_softcap=0.0),
    "sliding window off": lambda c: c.text.update(sliding_window=0),
    "window applied to the prefix": lambda c: c.text.update(sliding_window=4),
    "query scale head_dim": lambda c: c.text.update(query_pre_attn_scalar=float(c.text.head_dim)),
    "query scale doubled": lambda c: c.text.update(query_pre_attn_scalar=2 * c.text.query_pre_attn_scalar),
    "rope base": lambda c: c.text.update(rope_base=1000.0),
    "norm eps": lambda c: c.text.update(norm_eps=1e-1),
    "vision norm eps": lambda c: c.vision.update(norm_eps=1e-1),
    "all layers sliding": lambda c: c.text.update(layer_types=("sliding_attention",) * c.text.depth),
}


@pytest.mark.parametrize("version", [1, 2])
def test_parity_tolerance_catches_every_broken_detail(version, tmp_path):
  ref = hf_fixtures.make_hf_paligemma(str(tmp_path / "ckpt"), version=version)
  params, config, _ = hf.load_hf(ref.path)
  n = paligemma.num_image_tokens(config)
  batch = padded_batch(config, [n + 26, n + 20], [n + 9, n + 6], seed=1)
  theirs = reference_logits(ref.model, *batch)
  assert max_error(our_logits(params, config, *batch, jit=False), theirs, batch[2]) < RTOL
  for name, brk in BREAKS.items():
    if version == 1 and ("softcap" in name or "window" in name or "sliding" in name or "head_dim" in name):
      continue  # PaliGemma 1 has none of these (and scales queries by head_dim).
    broken = config.copy_and_resolve_references()
    brk(broken)
    error = max_error(our_logits(params, broken, *batch, jit=False), theirs, batch[2])
    assert error > 10 * RTOL, f"breaking '{name}' went unnoticed ({error:.2e})"


_ROPE, _GELU = gemma.apply_rope, jax.nn.gelu


def _interleaved_rope(x, positions, base):
  """RoPE with the interleaved (even/odd) pair layout instead of the half split."""
  h = x.shape[-1]
  pairs = x.reshape(*x.shape[:-1], h // 2, 2)
  halves = jax.numpy.concatenate([pairs[..., 0], pairs[..., 1]], axis=-1)
  out = _ROPE(halves, positions, base)
  return jax.numpy.stack([out[..., :h // 2], out[..., h // 2:]], axis=-1).reshape(x.shape)


def _causal_prefix(q_slot, q_prefix, kv_valid, kv_prefix, window=0):
  return attention_mask.attention_mask(q_slot, q_prefix & False, kv_valid, kv_prefix, window)


CODE_BREAKS = {  # Details that live in code, not in the config.
    "interleaved rope": (gemma, "apply_rope", _interleaved_rope),
    "causal prefix": (paligemma, "attention_mask", _causal_prefix),
    "exact instead of tanh gelu": (jax.nn, "gelu", lambda x, approximate=True: _GELU(x, approximate=False)),
}


@pytest.mark.parametrize("break_name", sorted(CODE_BREAKS))
def test_parity_tolerance_catches_broken_code(break_name, monkeypatch, tmp_path):
  ref = hf_fixtures.make_hf_paligemma(str(tmp_path / "ckpt"), version=2)
  params, config, _ = hf.load_hf(ref.path)
  n = paligemma.num_image_tokens(config)
  batch = padded_batch(config, [n + 26, n + 20], [n + 9, n + 6], seed=2)
  theirs = reference_logits(ref.model, *batch)
  monkeypatch.setattr(*CODE_BREAKS[break_name])
  error = max_error(our_logits(params, config, *batch, jit=False), theirs, batch[2])
  assert error > 10 * RTOL, f"breaking '{break_name}' went unnoticed ({error:.2e})"


@pytest.mark.xdist_group("real_width")
def test_real_widths_match_transformers(real_width_checkpoint):
  """So400m + Gemma 2 2B widths (one layer each), 224 px, the real 257216-token vocabulary
  (conftest.py's checkpoint, as transformers saved it and loads it back)."""
  import transformers
  reference = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
      real_width_checkpoint).eval()
  assert reference.dtype == torch.float32
  params, config, _ = hf.load_hf(real_width_checkpoint)
  assert config.vision.image_size == 224 and config.text.vocab_size == 257216
  n = paligemma.num_image_tokens(config)
  assert n == 256
  batch = padded_batch(config, [n + 12, n + 7], [n + 6, n + 7])
  ours, theirs = our_logits(params, config, *batch), reference_logits(reference, *batch)
  text = batch[2] & (np.arange(batch[0].shape[1]) >= n)
  assert max_error(ours, theirs, text) < RTOL
  # Image-token positions (whose logits are never read) carry the vision tower's float32 rounding
  # at So400m width under deliberately large random weights: about 3e-4 of the logit scale.
  assert max_error(ours, theirs, batch[2]) < 10 * RTOL


# Real checkpoint shapes (Hugging Face names, section 2 of the design notes), per preset.
REAL = {
    "pg1-3b": dict(D=2048, L=18, N=8, K=1, H=256, F=16384),
    "pg2-3b": dict(D=2304, L=26, N=8, K=4, H=256, F=9216),
    "pg2-10b": dict(D=3584, L=42, N=16, K=8, H=256, F=14336),
    "pg2-28b": dict(D=4608, L=46, N=32, K=16, H=128, F=36864),
}


@pytest.mark.parametrize("variant", sorted(REAL))
@pytest.mark.parametrize("resolution,tokens", [(224, 256), (448, 1024), (896, 4096)])
def test_preset_shapes_match_the_real_checkpoints(variant, resolution, tokens):
  r = REAL[variant]
  shapes = jax.tree_util.tree_map(lambda x: x.shape,
                                  paligemma.param_shapes(presets.get_config(f"{variant}-{resolution}")))
  img, llm = shapes["img"], shapes["llm"]
  assert img["embedding"]["kernel"] == (14, 14, 3, 1152)
  assert img["pos_embedding"] == (tokens, 1152)
  assert img["layers"]["attn"]["q"]["kernel"] == (27, 1152, 16, 72)
  assert img["layers"]["mlp"]["fc1"]["kernel"] == (27, 1152, 4304)
  assert shapes["projector"]["kernel"] == (1152, r["D"])
  assert llm["embedder"]["input_embedding"] == (257216, r["D"])
  assert llm["layers"]["attn"]["q"]["kernel"] == (r["L"], r["D"], r["N"], r["H"])
  assert llm["layers"]["attn"]["k"]["kernel"] == (r["L"], r["D"], r["K"], r["H"])
  assert llm["layers"]["attn"]["o"]["kernel"] == (r["L"], r["N"], r["H"], r["D"])
  assert llm["layers"]["mlp"]["gate"]["kernel"] == (r["L"], r["D"], r["F"])
  assert llm["layers"]["mlp"]["down"]["kernel"] == (r["L"], r["F"], r["D"])
  assert ("post_ffw_norm" in llm["layers"]) == variant.startswith("pg2")
  cfg = presets.get_config(variant)
  assert cfg.image_token_id == 257152
  assert cfg.text.query_pre_attn_scalar == (144.0 if variant == "pg2-28b" else 256.0)
