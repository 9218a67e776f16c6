"""big_vision .npz checkpoints: layout, config from shapes, parity with transformers, errors.

The files are written here from random transformers checkpoints (tests/hf_fixtures.py) in the
layout of the released ones: flat `params/...` keys, layers stacked, bfloat16 saved as numpy
writes it (2-byte void), and the table without its padding rows, so that the image token lies
past it as in big_vision's 257,152-row table.
"""

import functools
import hashlib
import os
import shutil
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

import hf_fixtures
from checkpoints_convert import npz_to_orbax
from configs import paligemma as presets
from paligemma_jax import errors
from paligemma_jax.checkpoints import checkpoint
from paligemma_jax.checkpoints import hf
from paligemma_jax.checkpoints import loading
from paligemma_jax.checkpoints import npz
from paligemma_jax.decoding import autoregressive
from paligemma_jax.decoding import scoring
from paligemma_jax.model import gemma
from paligemma_jax.model import paligemma

ROWS = hf_fixtures.TINY_IMAGE_TOKEN  # 1536: the tiny table without its 64 padding rows.
MAX_NEW = 12  # Past the tiny Gemma 2 sliding window (8).
_ENC = "img/Transformer/encoderblock/"
_ATTN = _ENC + "MultiHeadDotProductAttention_0/"


def big_vision_arrays(model, rows=ROWS):
  """A transformers PaliGemma's weights as big_vision arrays (float32, keys without params/)."""
  sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  v, t = model.config.vision_config, model.config.text_config
  vd, vh, td = v.hidden_size, v.num_attention_heads, t.hidden_size
  n, k, h = t.num_attention_heads, t.num_key_value_heads, t.head_dim
  img, llm = "model.vision_tower.", "model.language_model."
  vstack = lambda name, f=lambda w: w: np.stack(
      [f(sd[f"{img}encoder.layers.{i}.{name}"]) for i in range(v.num_hidden_layers)])
  tstack = lambda name, f=lambda w: w: np.stack(
      [f(sd[f"{llm}layers.{i}.{name}"]) for i in range(t.num_hidden_layers)])
  transpose = lambda w: w.T
  kv = lambda w: w.reshape(k, h, td).transpose(0, 2, 1)  # [K*H, D] -> [K, D, H].
  out = {
      "img/embedding/kernel": sd[img + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
      "img/embedding/bias": sd[img + "embeddings.patch_embedding.bias"],
      "img/pos_embedding": sd[img + "embeddings.position_embedding.weight"][None],
      _ENC + "MlpBlock_0/Dense_0/kernel": vstack("mlp.fc1.weight", transpose),
      _ENC + "MlpBlock_0/Dense_0/bias": vstack("mlp.fc1.bias"),
      _ENC + "MlpBlock_0/Dense_1/kernel": vstack("mlp.fc2.weight", transpose),
      _ENC + "MlpBlock_0/Dense_1/bias": vstack("mlp.fc2.bias"),
      _ATTN + "out/kernel": vstack("self_attn.out_proj.weight",
                                   lambda w: w.T.reshape(vh, vd // vh, vd)),
      _ATTN + "out/bias": vstack("self_attn.out_proj.bias"),
      "img/Transformer/encoder_norm/scale": sd[img + "post_layernorm.weight"],
      "img/Transformer/encoder_norm/bias": sd[img + "post_layernorm.bias"],
      "img/head/kernel": sd["model.multi_modal_projector.linear.weight"].T,
      "img/head/bias": sd["model.multi_modal_projector.linear.bias"],
      "llm/embedder/input_embedding": sd[llm + "embed_tokens.weight"][:rows],
      "llm/layers/attn/q_einsum/w": tstack("self_attn.q_proj.weight",
                                           lambda w: w.reshape(n, h, td).transpose(0, 2, 1)),
      "llm/layers/attn/kv_einsum/w": np.stack(
          [tstack("self_attn.k_proj.weight", kv), tstack("self_attn.v_proj.weight", kv)], axis=1),
      "llm/layers/attn/attn_vec_einsum/w": tstack("self_attn.o_proj.weight",
                                                  lambda w: w.reshape(td, n, h).transpose(1, 2, 0)),
      "llm/layers/mlp/gating_einsum": np.stack(
          [tstack("mlp.gate_proj.weight", transpose), tstack("mlp.up_proj.weight", transpose)], 1),
      "llm/layers/mlp/linear": tstack("mlp.down_proj.weight", transpose),
      "llm/layers/pre_attention_norm/scale": tstack("input_layernorm.weight"),
      "llm/final_norm/scale": sd[llm + "norm.weight"],
  }
  for i in "12":
    out[_ENC + f"LayerNorm_{int(i) - 1}/scale"] = vstack(f"layer_norm{i}.weight")
    out[_ENC + f"LayerNorm_{int(i) - 1}/bias"] = vstack(f"layer_norm{i}.bias")
  for theirs, ours in (("query", "q"), ("key", "k"), ("value", "v")):
    out[_ATTN + f"{theirs}/kernel"] = vstack(f"self_attn.{ours}_proj.weight",
                                             lambda w: w.T.reshape(vd, vh, vd // vh))
    out[_ATTN + f"{theirs}/bias"] = vstack(f"self_attn.{ours}_proj.bias",
                                           lambda b: b.reshape(vh, vd // vh))
  if t.model_type == "gemma":
    out["llm/layers/pre_ffw_norm/scale"] = tstack("post_attention_layernorm.weight")
  else:
    out["llm/layers/pre_ffw_norm/scale"] = tstack("pre_feedforward_layernorm.weight")
    out["llm/layers/post_attention_norm/scale"] = tstack("post_attention_layernorm.weight")
    out["llm/layers/post_ffw_norm/scale"] = tstack("post_feedforward_layernorm.weight")
  return out


def write_npz(path, arrays, dtype=np.float32, compressed=False):
  """As big_vision saves: np.savez of flat `params/` keys (bfloat16 becomes `|V2`)."""
  save = np.savez_compressed if compressed else np.savez
  save(path, **{npz.PREFIX + k: np.asarray(x).astype(dtype) for k, x in arrays.items()})
  return str(path)


@pytest.fixture(scope="module")
def pg1(tmp_path_factory, spm_model_path):
  """(transformers model, its big_vision arrays, an .npz with tokenizer.model beside it)."""
  root = tmp_path_factory.mktemp("npz_pg1")
  reference = hf_fixtures.make_hf_paligemma(str(root / "hf"), version=1)
  arrays = big_vision_arrays(reference.model)
  shutil.copyfile(spm_model_path, root / "tokenizer.model")
  return reference.model, arrays, write_npz(root / "pg1.npz", arrays)


def prompts(config, lengths, seed=0):
  """Right-padded prompts (image tokens, <bos>, random text) and images."""
  rng = np.random.RandomState(seed)
  n, t = paligemma.num_image_tokens(config), max(lengths)
  tokens = rng.randint(5, ROWS, size=(len(lengths), t)).astype(np.int32)
  tokens[:, :n], tokens[:, n] = config.image_token_id, 2
  mask = np.arange(t)[None] < np.array(lengths)[:, None]
  s = config.vision.image_size
  images = rng.uniform(-1, 1, (len(lengths), s, s, 3)).astype(np.float32)
  return np.where(mask, tokens, 0), images, mask, mask.copy()


def transformers_greedy(model, tokens, image):
  """transformers' greedy continuation of one unpadded row over the table's rows only (the
  padding rows, the image token's among them, suppressed): (tokens, log-probs over the rows)."""
  with torch.no_grad():
    out = model.generate(
        input_ids=torch.tensor(tokens[None], dtype=torch.long),
        pixel_values=torch.tensor(image[None].transpose(0, 3, 1, 2)),
        attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
        token_type_ids=torch.zeros(1, len(tokens), dtype=torch.long), max_new_tokens=MAX_NEW,
        do_sample=False, eos_token_id=1, pad_token_id=0, output_logits=True,
        return_dict_in_generate=True, suppress_tokens=list(range(ROWS, model.config.vocab_size)))
  new = out.sequences[0, len(tokens):].numpy()
  logprobs = np.array([torch.log_softmax(l[0, :ROWS].float(), -1)[t].item()
                       for l, t in zip(out.logits, new)])
  stop = list(new).index(1) if 1 in new else len(new)  # We report <eos> as the stop reason.
  return new[:stop], logprobs[:stop]


def check_generates_like_transformers(reference, params, config, check_scoring=False):
  """Greedy generation on a padded batch against transformers; `check_scoring`: scoring what was
  generated gives the log-probs it was generated with (6 s of compiling: done once)."""
  batch = prompts(config, [paligemma.num_image_tokens(config) + n for n in (6, 3)])
  generation = autoregressive.Generator(params, config, vocab_size=ROWS).generate(*batch,
                                                                          max_new_tokens=MAX_NEW)
  for b, length in enumerate(batch[2].sum(1)):
    theirs, their_logprobs = transformers_greedy(reference, batch[0][b, :length], batch[1][b])
    ours = generation.tokens[b, :generation.lengths[b]]
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(generation.logprobs[b, :len(ours)], their_logprobs, atol=2e-4)
  if not check_scoring:
    return
  suffix = np.asarray(generation.tokens)
  suffix_mask = np.arange(MAX_NEW)[None] < generation.lengths[:, None]
  score = jax.jit(functools.partial(scoring.suffix_logprobs,
                                    scoring.make_setup(config)))
  scored = score(params, batch[0], batch[1], batch[2], suffix, suffix_mask, np.arange(len(suffix)))
  np.testing.assert_allclose(np.where(suffix_mask, generation.logprobs, 0), scored, atol=2e-4)


def test_pg1_npz_loads_and_generates_like_transformers(pg1):
  reference, _, path = pg1
  params, config, tokenizer = loading.load_model(path)  # tokenizer.model beside it.
  assert (config.variant, config.text.family, config.vision.image_size) == ("custom", "gemma", 16)
  assert config.text.vocab_size == config.image_token_id == ROWS  # No <image> row.
  assert (config.text.query_pre_attn_scalar, config.text.sliding_window) == (16.0, 0)
  assert params["llm"]["embedder"]["input_embedding"].shape == (ROWS, 64)
  assert tokenizer.vocab_size == ROWS
  check_generates_like_transformers(reference, params, config, check_scoring=True)


def test_pg2_bfloat16_npz_takes_the_gemma2_defaults(tmp_path, spm_model_path):
  """A shape matching no preset: every dimension from the shapes, softcaps 50/30, window 4096,
  query scale head_dim^-0.5; the bfloat16 arrays come back exactly."""
  hf_config = hf_fixtures.hf_config(2, sliding_window=4096)
  hf_config.text_config.query_pre_attn_scalar = 16  # head_dim.
  reference = transformers.PaliGemmaForConditionalGeneration(hf_config)
  hf_fixtures.perturb_(reference)
  reference = reference.to(torch.bfloat16).float().eval()  # The weights the file holds.
  path = write_npz(tmp_path / "pg2.npz", big_vision_arrays(reference), ml_dtypes.bfloat16)
  with np.load(path) as stored:
    assert stored["params/llm/final_norm/scale"].dtype == np.dtype("V2")  # As big_vision's are.
  params, config, _ = loading.load_model(path, tokenizer=spm_model_path)
  t = config.text
  assert (config.variant, t.family, t.num_kv_heads, t.depth) == ("custom", "gemma2", 2, 3)
  assert (t.attn_logit_softcap, t.final_logit_softcap, t.sliding_window) == (50.0, 30.0, 4096)
  assert (t.query_pre_attn_scalar, t.rope_base, t.norm_eps) == (16.0, 10000.0, 1e-6)
  with npz.NpzFile(path) as f:
    assert f.read("llm/final_norm/scale").dtype == ml_dtypes.bfloat16
  assert npz.load_npz(path)[1].param_dtype == "bfloat16"  # The file's dtype, unless asked.
  check_generates_like_transformers(reference, params, config)


def test_converter_takes_a_compressed_npz_and_a_variant(tmp_path, spm_model_path):
  """--variant supplies what shapes cannot say (tiny-pg2: query scale 24, window 8): the
  converted checkpoint is the one converted from Hugging Face, less the table's padding rows."""
  reference = hf_fixtures.make_hf_paligemma(str(tmp_path / "hf"), version=2)
  path = write_npz(tmp_path / "pg2.npz", big_vision_arrays(reference.model), compressed=True)
  assert npz.load_npz(path)[1].text.query_pre_attn_scalar == 16.0  # The shapes alone: custom.
  out = tmp_path / "converted"
  npz_to_orbax.convert(path, str(out), spm_model_path, variant="tiny-pg2", progress=False)
  params, config = checkpoint.load(str(out))
  want_params, want_config, _ = hf.load_hf(reference.path)
  want_params["llm"]["embedder"]["input_embedding"] = (
      want_params["llm"]["embedder"]["input_embedding"][:ROWS])
  want_config.text.vocab_size = ROWS
  assert (config.variant, config.image_token_id) == ("tiny-pg2", ROWS)
  drop_types = lambda text: {**text.to_dict(), "layer_types": None}  # Spelt out or implied.
  assert drop_types(config.text) == drop_types(want_config.text)
  np.testing.assert_array_equal(gemma.layer_is_sliding(config.text),
                                gemma.layer_is_sliding(want_config.text))
  assert config.vision.to_dict() == want_config.vision.to_dict()
  jax.tree.map(np.testing.assert_array_equal, params, want_params)
  assert os.path.exists(out / checkpoint.TOKENIZER)
  with pytest.raises(FileExistsError, match="already exists"):
    npz_to_orbax.convert(path, str(out), spm_model_path, progress=False)
  int4 = tmp_path / "int4"  # --quantize: the float tree quantized, as hf_to_orbax stores it.
  npz_to_orbax.convert(path, str(int4), spm_model_path, variant="tiny-pg2", progress=False,
                       quantize="int4")
  qparams, qconfig = checkpoint.load(str(int4))
  want_params, _ = paligemma.quantize_params(params, config, "int4")
  assert qconfig.quantize == "int4"
  jax.tree.map(np.testing.assert_array_equal, qparams, want_params)


# The shapes of the released checkpoints.

PG2_3B_224 = {  # As issue 12 lists them (PaliGemma 2 3B, 224 px).
    "img/embedding/kernel": (14, 14, 3, 1152), "img/embedding/bias": (1152,),
    "img/pos_embedding": (1, 256, 1152),
    **{_ENC + f"LayerNorm_{i}/{p}": (27, 1152) for i in "01" for p in ("scale", "bias")},
    _ENC + "MlpBlock_0/Dense_0/kernel": (27, 1152, 4304),
    _ENC + "MlpBlock_0/Dense_0/bias": (27, 4304),
    _ENC + "MlpBlock_0/Dense_1/kernel": (27, 4304, 1152),
    _ENC + "MlpBlock_0/Dense_1/bias": (27, 1152),
    **{_ATTN + f"{n}/kernel": (27, 1152, 16, 72) for n in ("query", "key", "value")},
    **{_ATTN + f"{n}/bias": (27, 16, 72) for n in ("query", "key", "value")},
    _ATTN + "out/kernel": (27, 16, 72, 1152), _ATTN + "out/bias": (27, 1152),
    "img/Transformer/encoder_norm/scale": (1152,), "img/Transformer/encoder_norm/bias": (1152,),
    "img/head/kernel": (1152, 2304), "img/head/bias": (2304,),
    "llm/embedder/input_embedding": (257152, 2304),
    "llm/layers/attn/q_einsum/w": (26, 8, 2304, 256),
    "llm/layers/attn/kv_einsum/w": (26, 2, 4, 2304, 256),
    "llm/layers/attn/attn_vec_einsum/w": (26, 8, 256, 2304),
    "llm/layers/mlp/gating_einsum": (26, 2, 2304, 9216), "llm/layers/mlp/linear": (26, 9216, 2304),
    **{f"llm/layers/{n}/scale": (26, 2304) for n in ("pre_attention_norm", "pre_ffw_norm",
                                                     "post_attention_norm", "post_ffw_norm")},
    "llm/final_norm/scale": (2304,),
}


def released_shapes(name):
  config = presets.get_config(name)
  config.text.vocab_size = 257152
  return npz.expected_shapes(config)


def test_the_released_shapes_name_their_preset_and_resolution():
  config = npz.config_from_shapes(PG2_3B_224, "bfloat16")
  assert (config.variant, config.vision.image_size) == ("pg2-3b", 224)
  assert config.param_dtype == "bfloat16"
  assert config.text.vocab_size == config.image_token_id == 257152
  assert npz.expected_shapes(config) == PG2_3B_224
  for name, variant, size in (("pg2-3b-448", "pg2-3b", 448), ("pg1-3b-896", "pg1-3b", 896),
                              ("pg2-10b-224", "pg2-10b", 224), ("pg2-28b-448", "pg2-28b", 448)):
    config = npz.config_from_shapes(released_shapes(name))
    want = presets.get_config(name)
    assert (config.variant, config.vision.image_size) == (variant, size)
    assert {**config.text.to_dict(), "vocab_size": 0} == {**want.text.to_dict(), "vocab_size": 0}
  assert npz.config_from_shapes(released_shapes("pg2-28b")).text.query_pre_attn_scalar == 144.0
  assert npz.config_from_shapes(released_shapes("pg1-3b")).text.sliding_window == 0
  # A fine-tune with other shapes (here one decoder layer fewer) keeps its own dimensions.
  shapes = {k: (25,) + s[1:] if k.startswith("llm/layers/") else s for k, s in PG2_3B_224.items()}
  config = npz.config_from_shapes(shapes)
  assert (config.variant, config.text.depth) == ("custom", 25)
  assert config.text.query_pre_attn_scalar == 256.0


# Errors: one line naming the array.

def test_a_truncated_file_names_the_array_it_ends_in(pg1, tmp_path):
  _, _, path = pg1
  with zipfile.ZipFile(path) as z:  # Cut inside the table.
    info = z.getinfo("params/llm/embedder/input_embedding.npy")
  cut = tmp_path / "cut.npz"
  cut.write_bytes(open(path, "rb").read()[:info.header_offset + 5000])
  with pytest.raises(errors.InputError, match="truncated: it ends inside array "
                     "params/llm/embedder/input_embedding"):
    npz.load_npz(str(cut))
  (tmp_path / "text.npz").write_text("not a zip")
  with pytest.raises(errors.InputError, match="not an .npz file"):
    npz.load_npz(str(tmp_path / "text.npz"))


def test_a_corrupt_array_is_named(pg1, tmp_path):
  _, arrays, path = pg1
  data = bytearray(open(path, "rb").read())
  at = data.find(arrays["llm/layers/mlp/linear"].astype(np.float32).tobytes()[:64])
  data[at + 100] ^= 0xFF
  (tmp_path / "flipped.npz").write_bytes(bytes(data))
  with pytest.raises(errors.InputError, match="params/llm/layers/mlp/linear is corrupt .CRC"):
    npz.load_npz(str(tmp_path / "flipped.npz"))


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update({"llm/layers/attn/kv_einsum/w": a["llm/layers/attn/kv_einsum/w"][..., :8]}),
     r"array params/llm/layers/attn/kv_einsum/w has shape \(2, 2, 1, 64, 8\), expected "
     r"\(2, 2, 1, 64, 16\) \(for the model the other arrays describe\)"),
    (lambda a: a.pop("llm/final_norm/scale"), "no array params/llm/final_norm/scale"),
    (lambda a: a.update(extra=np.zeros(3)), "unexpected array params/extra"),
    (lambda a: a.update({"img/pos_embedding": a["img/pos_embedding"][:, :15]}), "square grid"),
], ids=["wrong_shape", "missing", "unexpected", "not_square"])
def test_mismatched_arrays_are_named(pg1, tmp_path, change, message):
  arrays = dict(pg1[1])
  change(arrays)
  with pytest.raises(errors.InputError, match=message):
    npz.load_npz(write_npz(tmp_path / "bad.npz", arrays))


def test_a_variant_that_does_not_fit_and_a_missing_tokenizer_are_refused(pg1, tmp_path):
  _, _, path = pg1
  with pytest.raises(errors.InputError, match=r"has shape .* \(--variant=pg2-3b\)"):
    npz.load_npz(path, variant="pg2-3b")
  with pytest.raises(errors.InputError, match="--variant=pg9: Unknown PaliGemma variant"):
    npz.load_npz(path, variant="pg9")
  alone = tmp_path / "alone.npz"
  shutil.copyfile(path, alone)
  # Results record which file they came from (an .npz is one file, not a directory).
  identities = {loading.checkpoint_identity(p)["files"] for p in (path, str(alone))}
  assert len(identities) == 2 and hashlib.sha256().hexdigest()[:16] not in identities
  with pytest.raises(errors.InputError, match="no tokenizer .*tokenizer.model: put the "
                     "checkpoint's tokenizer.model beside the .npz, or convert it with "
                     ".*npz_to_orbax --tokenizer=PATH"):  # generate has no tokenizer= to give.
    loading.load_model(str(alone))
  with pytest.raises(errors.InputError, match="Tokenizer model not found.*--tokenizer=PATH"):
    npz_to_orbax.convert(str(alone), str(tmp_path / "out"), progress=False)
  with pytest.raises(errors.InputError, match="--npz=.*missing.npz: no such file"):  # Not its tokenizer.
    npz_to_orbax.convert(str(tmp_path / "missing.npz"), str(tmp_path / "out"), progress=False)
  assert not os.path.exists(tmp_path / "out")


def test_a_table_that_does_not_fit_the_tokenizer_is_refused_before_reading(pg1, tmp_path,
                                                                           spm_model_path):
  """A compressed member of zeros can claim millions of rows (a 1.4 MB file converted into a
  978 MB checkpoint); too few rows leave ids without an embedding. The tokenizer has ROWS ids."""
  arrays = dict(pg1[1])
  table = arrays["llm/embedder/input_embedding"]
  shutil.copyfile(spm_model_path, tmp_path / "tokenizer.model")
  for rows in (ROWS + npz.MAX_PADDING_ROWS + 1, 40 * ROWS, ROWS - 1):
    resized = np.zeros((rows, table.shape[1]), np.float32)
    resized[:min(rows, ROWS)] = table[:rows]
    path = write_npz(tmp_path / "resized.npz", {**arrays, "llm/embedder/input_embedding": resized},
                     compressed=True)
    message = (f"array params/llm/embedder/input_embedding has {rows} rows, but the tokenizer has "
               f"{ROWS} ids")
    with pytest.raises(errors.InputError, match=message):
      loading.load_model(path)
    with pytest.raises(errors.InputError, match=message):
      npz_to_orbax.convert(path, str(tmp_path / "out"), progress=False)
    assert not os.path.exists(tmp_path / "out")
  # A Hugging Face table: the <image> row and padding to a multiple of 64 (1600 rows) is fine.
  padded = np.concatenate([table, np.zeros((64, table.shape[1]), np.float32)])
  path = write_npz(tmp_path / "padded.npz", {**arrays, "llm/embedder/input_embedding": padded})
  assert npz.load_npz(path, vocab_size=ROWS)[1].text.vocab_size == ROWS + 64


@pytest.mark.parametrize("value, compressed", [(np.nan, False), (np.inf, True), (-np.inf, False)])
def test_a_weight_that_is_not_finite_is_named(pg1, tmp_path, value, compressed):
  """NaN or Inf weights converted without a word, then generated empty text."""
  arrays = {k: np.array(x) for k, x in pg1[1].items()}
  arrays["llm/layers/mlp/linear"][1, 5, 7] = value
  path = write_npz(tmp_path / "bad.npz", arrays, compressed=compressed)
  with pytest.raises(errors.InputError,
                     match="array params/llm/layers/mlp/linear holds NaN or infinite values"):
    npz.load_npz(path)
  with pytest.raises(errors.InputError, match="params/img/head/bias holds NaN"):  # bfloat16 too.
    arrays = {**pg1[1], "img/head/bias": np.full_like(pg1[1]["img/head/bias"], value)}
    npz.load_npz(write_npz(tmp_path / "bf16.npz", arrays, ml_dtypes.bfloat16))


def test_an_output_directory_under_a_file_is_one_clear_line(pg1, tmp_path, spm_model_path):
  """os.makedirs said only "[Errno 17] File exists", after the whole file was read."""
  _, _, path = pg1
  (tmp_path / "file").write_text("x")
  out = tmp_path / "file" / "sub" / "out"
  with pytest.raises(errors.InputError, match=f"Output directory {out} cannot be created: "
                     f"{tmp_path / 'file'} is a file, not a directory"):
    npz_to_orbax.convert(path, str(out), spm_model_path, progress=False)
