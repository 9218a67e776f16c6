"""Tiny random transformers PaliGemma checkpoints, saved the way the Hugging Face Hub stores them.

`make_hf_paligemma(out_dir, version=1|2)` builds a `transformers.PaliGemmaForConditionalGeneration`
with the shapes of configs/paligemma.py `tiny-pg1` / `tiny-pg2`, saves it to `out_dir` and returns
`HFCheckpoint(path, model)`: the directory (config.json, safetensors, optional tokenizer.model) and
the torch model in eval mode, whose outputs are the reference for parity tests.

Every weight is seeded noise (`perturb_`) chosen so that numerical mistakes show: RMSNorm weights
are far from zero (so `x * (1 + w)` and `x * w` differ), LayerNorm weights far from one, all biases
non-zero, and the attention (Gemma 2: softcap 50) and final (softcap 30) logits large enough for
the softcaps to matter. `real_widths=True` models scale their matrices by fan-in to keep the tiny
models' activation scales. The same arguments give the same weights (in any `dtype`, up to
rounding). `random_inputs(model)` gives matching transformers inputs (image tokens, <bos>, text).

Namings (`naming=`):
  "transformers5"  what transformers 5 `save_pretrained` writes: language_model.model.*,
                   vision_tower.* (no `vision_model.`), multi_modal_projector.*; no lm_head.
  "hub"            the older names of the released checkpoints: vision_tower.vision_model.*,
                   plus a copy of the tied head as language_model.lm_head.weight; config.json
                   says `torch_dtype` instead of `dtype`.
  "in_memory"      transformers' module names: model.language_model.*, model.vision_tower.*,
                   model.multi_modal_projector.* (save_pretrained(save_original_format=False)).
"""

import glob
import json
import os
import shutil
from typing import NamedTuple

import numpy as np
import safetensors.torch
import torch
import transformers
# Bound by name: `transformers.initialization` is not always an attribute of the lazy package
# (not when transformers loaded it before this import, e.g. for the benchmark's reference model).
import transformers.initialization as transformers_initialization

from paligemma_jax.model import paligemma

NAMINGS = ("transformers5", "hub", "in_memory")

TINY_IMAGE_TOKEN = 1536  # configs/paligemma.py: vocab_size - 64.
REAL_IMAGE_TOKEN = 257152
_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    patch_size=4)
_REAL_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=1, num_attention_heads=16,
                    patch_size=14)  # SigLIP So400m/14 widths, one layer.
_GEMMA2 = dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
_TINY_TEXT = {
    1: dict(model_type="gemma", vocab_size=1600, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=16, intermediate_size=128),
    2: dict(model_type="gemma2", vocab_size=1600, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, intermediate_size=128, query_pre_attn_scalar=24, **_GEMMA2),
}
_REAL_TEXT = {  # Gemma 2B / Gemma 2 2B widths, one layer, the real vocabulary.
    1: dict(model_type="gemma", vocab_size=257216, hidden_size=2048, num_hidden_layers=1, num_attention_heads=8,
            num_key_value_heads=1, head_dim=256, intermediate_size=16384),
    2: dict(model_type="gemma2", vocab_size=257216, hidden_size=2304, num_hidden_layers=1, num_attention_heads=8,
            num_key_value_heads=4, head_dim=256, intermediate_size=9216, query_pre_attn_scalar=256, **_GEMMA2),
}


class HFCheckpoint(NamedTuple):
  path: str  # The saved directory.
  model: transformers.PaliGemmaForConditionalGeneration  # float32 or `dtype`, eval mode.


def hf_config(version=1, image_size=None, sliding_window=None, real_widths=False):
  """The PaliGemmaConfig of a tiny (or real-width, one-layer) PaliGemma `version` 1 or 2."""
  if version not in (1, 2):
    raise ValueError(f"version must be 1 or 2, got {version!r}")
  vision = dict(_REAL_VISION if real_widths else _TINY_VISION, model_type="siglip_vision_model",
                image_size=image_size or (224 if real_widths else 16), vision_use_head=False)
  text = dict((_REAL_TEXT if real_widths else _TINY_TEXT)[version])
  if version == 2:
    text["sliding_window"] = sliding_window or (4096 if real_widths else 8)
  return transformers.PaliGemmaConfig(
      vision_config=vision, text_config=text, projection_dim=text["hidden_size"], vocab_size=text["vocab_size"],
      image_token_index=REAL_IMAGE_TOKEN if real_widths else TINY_IMAGE_TOKEN)


# Standard deviations of the perturbed weights, by tensor role (see `_role`).
_STD = dict(rms_norm=0.5, layer_norm=0.5, bias=0.5, embed=0.8, text_qk=0.35, text_other=0.12,
            vision_qk=0.4, vision_other=0.2, projector=0.2, position=0.5)


def _role(name):
  if name.endswith("bias"):
    return "bias"
  if "vision_tower" in name:
    if "layer_norm" in name or "post_layernorm" in name:
      return "layer_norm"
    if "position_embedding" in name:
      return "position"
    return "vision_qk" if any(f"{p}_proj" in name for p in "qk") else "vision_other"
  if "multi_modal_projector" in name:
    return "projector"
  if "norm" in name:
    return "rms_norm"
  if "embed_tokens" in name:
    return "embed"
  return "text_qk" if any(f"{p}_proj" in name for p in "qk") else "text_other"


def _fan_in(shape):
  return int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1


@torch.no_grad()
def perturb_(model, seed=0, reference_shapes=None):
  """Overwrites every weight in place with seeded uniform noise of the standard deviations in `_STD`.

  Uniform rather than normal: filled in place, it is fast and needs no second copy of the
  real-width embedding table. `reference_shapes` ({name: shape} of the tiny model): matrices are
  scaled by sqrt(reference fan-in / fan-in), so wider models keep the tiny model's activation scales.
  """
  gen = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():  # Tied weights appear once.
    role = _role(name)
    std = _STD[role]
    if reference_shapes and p.dim() > 1 and role != "position":
      std *= (_fan_in(reference_shapes[name]) / _fan_in(p.shape)) ** 0.5
    p.uniform_(-std * 3 ** 0.5, std * 3 ** 0.5, generator=gen)
    if role == "layer_norm" and name.endswith("weight"):
      p.add_(1.0)  # LayerNorm multiplies by w itself: keep it away from 1 but positive on average.


def _new_model(config):
  """A model with uninitialised weights (perturb_ overwrites them all) and the LM head tied."""
  with transformers_initialization.no_init_weights():
    model = transformers.PaliGemmaForConditionalGeneration(config)
  model.tie_weights()  # Skipped along with the initialisation.
  if model.lm_head.weight is not model.model.language_model.embed_tokens.weight:
    raise AssertionError("the LM head is not tied to the embedding")
  return model


def _hub_name(name):
  """transformers 5 file name -> the older hub name (only the vision tower's differ)."""
  if name.startswith("vision_tower."):
    return "vision_tower.vision_model." + name[len("vision_tower."):]
  return name


def _rewrite_hub(path):
  """Rewrites a transformers 5 save in the older hub naming (every shard, the index, config.json)."""
  for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
    tensors = safetensors.torch.load_file(file)
    renamed = {_hub_name(k): v for k, v in tensors.items()}
    if "language_model.model.embed_tokens.weight" in renamed:  # Older saves kept the tied head.
      renamed["language_model.lm_head.weight"] = renamed["language_model.model.embed_tokens.weight"].clone()
    safetensors.torch.save_file(renamed, file, metadata={"format": "pt"})
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      data = json.load(f)
    weight_map = {_hub_name(k): v for k, v in data["weight_map"].items()}
    weight_map["language_model.lm_head.weight"] = weight_map["language_model.model.embed_tokens.weight"]
    data["weight_map"] = dict(sorted(weight_map.items()))
    with open(index, "w") as f:
      json.dump(data, f, indent=2)
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  config["torch_dtype"] = config.pop("dtype")
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=2)


def _num_bytes(model):
  return sum(p.numel() * p.element_size() for p in model.parameters())


def make_hf_paligemma(out_dir, version=1, image_size=None, sliding_window=None, seed=0, naming="transformers5",
                      sharded=False, real_widths=False, dtype=torch.float32, tokenizer_model=None):
  """Builds, perturbs and saves a random PaliGemma `version` (1 or 2); returns HFCheckpoint(path, model).

  out_dir: a new or empty directory. image_size: default 16 (tiny; 32/64 mirror 448/896) or 224
  (real_widths). sliding_window: Gemma 2 only; default 8 (tiny) or 4096. naming: one of NAMINGS.
  sharded: several safetensors shards and model.safetensors.index.json. real_widths: SigLIP So400m
  and Gemma (2) 2B widths with one layer each and the real 257216-row vocabulary (2.6-2.8 GB in
  float32). dtype: the saved dtype (PaliGemma 2 ships bfloat16). tokenizer_model: a SentencePiece
  file copied to tokenizer.model.
  """
  if naming not in NAMINGS:
    raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"{out_dir} is not empty")
  config = hf_config(version, image_size, sliding_window, real_widths)
  model = _new_model(config)
  reference = None
  if real_widths:
    reference = {n: p.shape for n, p in _new_model(hf_config(version)).named_parameters()}
  perturb_(model, seed, reference)
  model = model.to(dtype).eval()
  # transformers writes at most `max_shard_size` per file: a third of the model gives several shards.
  shard = max(_num_bytes(model) // 3, 1) if sharded else "50GB"
  model.save_pretrained(out_dir, max_shard_size=shard, save_original_format=naming != "in_memory")
  if sharded and not os.path.exists(os.path.join(out_dir, "model.safetensors.index.json")):
    raise AssertionError("save_pretrained wrote a single file although sharding was requested")
  if naming == "hub":
    _rewrite_hub(out_dir)
  if tokenizer_model is not None:
    shutil.copyfile(tokenizer_model, os.path.join(out_dir, "tokenizer.model"))
  return HFCheckpoint(out_dir, model)


def random_inputs(model, batch=2, prompt_len=5, seed=0):
  """Model inputs: image tokens + <bos> + random text ids, and random pixels in [-1, 1]."""
  cfg = model.config
  gen = torch.Generator().manual_seed(seed)
  n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
  text = torch.randint(5, cfg.image_token_index, (batch, prompt_len), generator=gen)
  ids = torch.cat([torch.full((batch, n), cfg.image_token_index), torch.full((batch, 1), 2), text], 1)
  s = cfg.vision_config.image_size
  pixels = torch.rand((batch, 3, s, s), generator=gen) * 2 - 1
  return dict(input_ids=ids, pixel_values=pixels.to(model.dtype), attention_mask=torch.ones_like(ids),
              token_type_ids=torch.zeros_like(ids))


# Comparing our logits with transformers' on right-padded prefix-LM batches.

def padded_batch(config, lengths, prefix_lengths, seed=0):
  """Right-padded rows: image tokens, <bos>, text; the first prefix_lengths[b] tokens are prefix."""
  rng = np.random.RandomState(seed)
  n = paligemma.num_image_tokens(config)
  t = max(lengths)
  tokens = rng.randint(5, config.image_token_id, size=(len(lengths), t)).astype(np.int32)
  tokens[:, :n], tokens[:, n] = config.image_token_id, 2
  slots = np.arange(t)[None]
  input_mask = slots < np.array(lengths)[:, None]
  prefix_mask = (slots < np.array(prefix_lengths)[:, None]) & input_mask
  tokens = np.where(input_mask, tokens, 0)
  s = config.vision.image_size
  images = rng.uniform(-1, 1, (len(lengths), s, s, 3)).astype(np.float32)
  return tokens, images, input_mask, prefix_mask



def text_prompts(config, text_lengths, seed=0):
  """(tokens, images, mask): right-padded prompts (image tokens, <bos>, text) of the given text
  lengths, all prefix."""
  n = paligemma.num_image_tokens(config)
  lengths = [n + 1 + t for t in text_lengths]
  tokens, images, mask, _ = padded_batch(config, lengths, lengths, seed)
  return tokens, images, mask

def reference_logits(model, tokens, images, input_mask, prefix_mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens, dtype=torch.long),
                 pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)).to(model.dtype),
                 attention_mask=torch.tensor(input_mask, dtype=torch.long),
                 token_type_ids=torch.tensor(~prefix_mask, dtype=torch.long)).logits.float().numpy()


def max_error(ours, theirs, input_mask):
  """Largest difference over real tokens, relative to the logit scale."""
  valid = input_mask[..., None]
  return np.max(np.abs(ours - theirs) * valid) / np.max(np.abs(theirs) * valid)
