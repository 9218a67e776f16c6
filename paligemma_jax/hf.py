"""Reads Hugging Face PaliGemma / PaliGemma 2 directories (config.json + safetensors) into our params.

A Hugging Face directory holds `config.json`, `model.safetensors` (or shards listed in
`model.safetensors.index.json`) and usually `tokenizer.model`. Tensor names differ between
transformers versions; `canonical_name` maps every known spelling onto the hub's:

  vision_tower.vision_model.*   (hub)  <- vision_tower.* (transformers 5 save_pretrained),
                                          model.vision_tower.* (in-memory)
  language_model.model.*        (hub)  <- model.language_model.* (in-memory), language_model.*
  multi_modal_projector.*       (hub)  <- model.multi_modal_projector.*
  lm_head.weight, language_model.lm_head.weight: tied to the embedding, ignored.

The expected parameter tree is the model's own (`paligemma.param_shapes`), so the converter and
the model cannot drift apart: every leaf names its source tensor and how to transform it. Tensors
are read one at a time into preallocated [L, ...] arrays, so a checkpoint is never held twice.
"""

import json
import math
import os
from typing import Callable, NamedTuple

import jax
import ml_collections
import numpy as np
import safetensors
import tqdm

from configs import paligemma as presets
from paligemma_jax import paligemma

DTYPES = ("float32", "bfloat16", "float16")
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # As safetensors names them.

# transformers' defaults for fields that config.json files omit. When a sub-config is absent,
# PaliGemmaConfig builds it from its `sub_configs_defaults`; when present, only the sub-config
# class's own defaults apply (transformers/models/{paligemma,siglip,gemma,gemma2}/configuration_*).
_MISSING_SUBCONFIG = {
    "vision_config": dict(model_type="siglip_vision_model", intermediate_size=4096, hidden_size=1152,
                          patch_size=14, image_size=224, num_hidden_layers=27, num_attention_heads=16,
                          vision_use_head=False),
    "text_config": dict(model_type="gemma", hidden_size=2048, num_hidden_layers=18,
                        intermediate_size=16384, num_attention_heads=8, num_key_value_heads=1,
                        vocab_size=257152),
}
_CLASS_DEFAULTS = {
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True),
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16, head_dim=256,
                  hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6, attention_bias=False),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                   hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, attention_bias=False,
                   query_pre_attn_scalar=256, sliding_window=4096, layer_types=None,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
}
_GELU_TANH = "gelu_pytorch_tanh"
_LAYER_TYPES = ("sliding_attention", "full_attention")


def _unsupported(field, value, why):
  return ValueError(f"Unsupported Hugging Face PaliGemma config: {field}={value!r} ({why}).")


def _subconfig(hf_config, key):
  """A sub-config with transformers' defaults filled in, and its model_type."""
  given = hf_config.get(key)
  if given is None:
    given = _MISSING_SUBCONFIG[key]
  model_type = given.get("model_type", _MISSING_SUBCONFIG[key]["model_type"])
  if model_type not in _CLASS_DEFAULTS or (key == "vision_config") != (model_type == "siglip_vision_model"):
    raise _unsupported(f"{key}.model_type", model_type, "expected siglip_vision_model, gemma or gemma2")
  return {**_CLASS_DEFAULTS[model_type], **given, "model_type": model_type}


def _square(field, value):
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise _unsupported(field, value, "only square sizes are supported")
    value = value[0]
  return int(value)


def _rope_base(t):
  """RoPE base from `rope_parameters` (transformers 5) or `rope_theta` (older); no scaling allowed."""
  if t.get("rope_scaling"):
    raise _unsupported("text_config.rope_scaling", t["rope_scaling"], "only default RoPE is supported")
  rope = t.get("rope_parameters") or {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default":
    raise _unsupported("text_config.rope_parameters.rope_type", kind, "only default RoPE is supported")
  return float(rope.get("rope_theta", t.get("rope_theta", 10000.0)))


def _param_dtype(hf_config):
  dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
  dtype = str(dtype).removeprefix("torch.")
  if dtype not in DTYPES:
    raise _unsupported("dtype", dtype, f"expected one of {DTYPES}")
  return dtype


def _vision(hf_config):
  v = _subconfig(hf_config, "vision_config")
  if v["vision_use_head"]:
    absent = "vision_use_head" not in (hf_config.get("vision_config") or {})
    raise _unsupported("vision_config.vision_use_head", True,
                       "SigLIP's default when absent; " * absent + "PaliGemma has no pooling head")
  if v["hidden_act"] != _GELU_TANH:
    raise _unsupported("vision_config.hidden_act", v["hidden_act"], f"expected {_GELU_TANH}")
  if v["num_channels"] != 3:
    raise _unsupported("vision_config.num_channels", v["num_channels"], "expected RGB")
  return dict(width=v["hidden_size"], depth=v["num_hidden_layers"], mlp_dim=v["intermediate_size"],
              num_heads=v["num_attention_heads"], patch_size=_square("vision_config.patch_size", v["patch_size"]),
              norm_eps=float(v["layer_norm_eps"]), image_size=_square("vision_config.image_size", v["image_size"]))


def _text(hf_config):
  t = _subconfig(hf_config, "text_config")
  family = t["model_type"]
  act_field = "hidden_act" if family == "gemma" else "hidden_activation"
  act = t[act_field]
  if not (act == _GELU_TANH or (family == "gemma" and act == "gelu")):  # Gemma's legacy "gelu" means tanh.
    raise _unsupported(f"text_config.{act_field}", act, f"expected {_GELU_TANH}")
  if t["attention_bias"]:
    raise _unsupported("text_config.attention_bias", True, "Gemma attention has no biases")
  if t.get("use_bidirectional_attention") is False:
    raise _unsupported("text_config.use_bidirectional_attention", False, "PaliGemma's prefix is bidirectional")
  text = dict(family=family, vocab_size=t["vocab_size"], width=t["hidden_size"], depth=t["num_hidden_layers"],
              num_heads=t["num_attention_heads"], num_kv_heads=t["num_key_value_heads"], head_dim=t["head_dim"],
              mlp_dim=t["intermediate_size"], query_pre_attn_scalar=float(t["head_dim"]),
              attn_logit_softcap=0.0, final_logit_softcap=0.0, sliding_window=0, layer_types=(),
              norm_eps=float(t["rms_norm_eps"]), rope_base=_rope_base(t))
  if family == "gemma2":
    depth = text["depth"]
    layer_types = t["layer_types"] or [_LAYER_TYPES[i % 2] for i in range(depth)]
    if len(layer_types) != depth or set(layer_types) - set(_LAYER_TYPES):
      raise _unsupported("text_config.layer_types", layer_types, f"expected {depth} of {_LAYER_TYPES}")
    text.update(query_pre_attn_scalar=float(t["query_pre_attn_scalar"]),
                attn_logit_softcap=float(t["attn_logit_softcapping"] or 0.0),
                final_logit_softcap=float(t["final_logit_softcapping"] or 0.0),
                sliding_window=int(t["sliding_window"] or 0), layer_types=tuple(layer_types))
  return text


def _variant(vision, text):
  """The preset whose architecture this is (ignoring resolution), else "custom"."""
  for name in presets.TEXT_VARIANTS:
    preset = presets.get_config(name)
    same_vision = all(preset.vision[k] == v for k, v in vision.items() if k != "image_size")
    same_text = all(preset.text[k] == v for k, v in text.items() if k != "layer_types")
    if same_vision and same_text:
      return name
  return "custom"


def config_from_hf(hf_config: dict) -> ml_collections.ConfigDict:
  """Our model config from a Hugging Face PaliGemma config.json dict (transformers' defaults apply)."""
  if hf_config.get("model_type", "paligemma") != "paligemma":
    raise _unsupported("model_type", hf_config["model_type"], "expected paligemma")
  if hf_config.get("quantization_config"):
    raise _unsupported("quantization_config", hf_config["quantization_config"], "quantized weights")
  if not hf_config.get("tie_word_embeddings", True):
    raise _unsupported("tie_word_embeddings", False, "the LM head is the embedding table")
  vision, text = _vision(hf_config), _text(hf_config)
  projection_dim = hf_config.get("projection_dim", 2048)
  if projection_dim != text["width"]:
    raise _unsupported("projection_dim", projection_dim, f"must equal text_config.hidden_size={text['width']}")
  cfg = ml_collections.ConfigDict()
  cfg.variant = _variant(vision, text)
  cfg.vision = ml_collections.ConfigDict(vision)
  cfg.text = ml_collections.ConfigDict(text)
  cfg.image_token_id = int(hf_config.get("image_token_index", hf_config.get("image_token_id", 256000)))
  cfg.dtype = "float32"  # Compute dtype: a runtime choice, not the checkpoint's.
  cfg.param_dtype = _param_dtype(hf_config)
  cfg.remat = False
  cfg.scan_layers = True
  return cfg


def read_config(hf_dir: str) -> ml_collections.ConfigDict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model directory: no config.json.")
  with open(path) as f:
    return config_from_hf(json.load(f))


# Tensor names.

_PREFIXES = (  # (stored prefix, hub prefix or None = ignore); the first match wins.
    ("lm_head.", None),
    ("language_model.lm_head.", None),
    ("model.language_model.", "language_model.model."),
    ("language_model.model.", "language_model.model."),
    ("language_model.", "language_model.model."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
)


def canonical_name(name: str) -> str | None:
  """The hub's name for a stored tensor name; None for tensors to ignore (the tied LM head)."""
  for prefix, hub in _PREFIXES:
    if name.startswith(prefix):
      return hub and hub + name[len(prefix):]
  raise ValueError(f"Unexpected tensor {name!r}: not part of a PaliGemma checkpoint.")


class _Rule(NamedTuple):
  """How one of our leaves (per-layer shape `s`) comes from a torch tensor."""
  hf_shape: Callable[[tuple], tuple]
  apply: Callable[[np.ndarray, tuple], np.ndarray]


def _linear(n_in):
  """torch Linear weight [out, in] -> kernel [*in_axes, *out_axes], the first n_in axes being inputs."""
  return _Rule(lambda s: (math.prod(s[n_in:]), math.prod(s[:n_in])), lambda x, s: x.T.reshape(s))


_COPY = _Rule(tuple, lambda x, s: x)
_FLAT = _Rule(lambda s: (math.prod(s),), lambda x, s: x.reshape(s))  # [H*hd] -> [H, hd] biases.
_CONV = _Rule(lambda s: (s[3], s[2], s[0], s[1]), lambda x, s: x.transpose(2, 3, 1, 0))  # OIHW -> HWIO.


def _sources(family):
  """Our param path -> (hub tensor name, with {i} for the layer, rule)."""
  v, vl = "vision_tower.vision_model.", "vision_tower.vision_model.encoder.layers.{i}."
  t, tl = "language_model.model.", "language_model.model.layers.{i}."
  src = {
      "img/embedding/kernel": (v + "embeddings.patch_embedding.weight", _CONV),
      "img/embedding/bias": (v + "embeddings.patch_embedding.bias", _COPY),
      "img/pos_embedding": (v + "embeddings.position_embedding.weight", _COPY),
      "img/layers/attn/o/kernel": (vl + "self_attn.out_proj.weight", _linear(2)),
      "img/layers/attn/o/bias": (vl + "self_attn.out_proj.bias", _COPY),
      "img/norm/scale": (v + "post_layernorm.weight", _COPY),
      "img/norm/bias": (v + "post_layernorm.bias", _COPY),
      "projector/kernel": ("multi_modal_projector.linear.weight", _linear(1)),
      "projector/bias": ("multi_modal_projector.linear.bias", _COPY),
      "llm/embedder/input_embedding": (t + "embed_tokens.weight", _COPY),
      "llm/layers/pre_attention_norm/scale": (tl + "input_layernorm.weight", _COPY),
      "llm/layers/attn/o/kernel": (tl + "self_attn.o_proj.weight", _linear(2)),
      "llm/final_norm/scale": (t + "norm.weight", _COPY),
  }
  for n in "qkv":
    src[f"img/layers/attn/{n}/kernel"] = (vl + f"self_attn.{n}_proj.weight", _linear(1))
    src[f"img/layers/attn/{n}/bias"] = (vl + f"self_attn.{n}_proj.bias", _FLAT)
    src[f"llm/layers/attn/{n}/kernel"] = (tl + f"self_attn.{n}_proj.weight", _linear(1))
  for n in ("1", "2"):
    src[f"img/layers/norm{n}/scale"] = (vl + f"layer_norm{n}.weight", _COPY)
    src[f"img/layers/norm{n}/bias"] = (vl + f"layer_norm{n}.bias", _COPY)
    src[f"img/layers/mlp/fc{n}/kernel"] = (vl + f"mlp.fc{n}.weight", _linear(1))
    src[f"img/layers/mlp/fc{n}/bias"] = (vl + f"mlp.fc{n}.bias", _COPY)
  for n in ("gate", "up", "down"):
    src[f"llm/layers/mlp/{n}/kernel"] = (tl + f"mlp.{n}_proj.weight", _linear(1))
  if family == "gemma":  # Gemma 1 calls its pre-MLP norm "post_attention_layernorm".
    src["llm/layers/pre_ffw_norm/scale"] = (tl + "post_attention_layernorm.weight", _COPY)
  else:
    src["llm/layers/pre_ffw_norm/scale"] = (tl + "pre_feedforward_layernorm.weight", _COPY)
    src["llm/layers/post_attention_norm/scale"] = (tl + "post_attention_layernorm.weight", _COPY)
    src["llm/layers/post_ffw_norm/scale"] = (tl + "post_feedforward_layernorm.weight", _COPY)
  return src


class _Target(NamedTuple):
  """One tensor to read: into params[path][layer] (layer None: the whole leaf)."""
  path: str
  layer: int | None
  shape: tuple  # Expected torch shape.
  rule: _Rule


def _targets(config):
  """Hub tensor name -> _Target for every tensor the model's parameter tree needs."""
  sources = _sources(config.text.family)
  shapes = _flat(paligemma.param_shapes(config))
  targets = {}
  for path, sds in shapes.items():
    if path not in sources:
      raise ValueError(f"No Hugging Face tensor is known for model parameter {path!r}.")
    template, rule = sources[path]
    if "/layers/" in path:
      for i in range(sds.shape[0]):
        targets[template.format(i=i)] = _Target(path, i, rule.hf_shape(sds.shape[1:]), rule)
    else:
      targets[template] = _Target(path, None, rule.hf_shape(sds.shape), rule)
  return targets, shapes


def _flat(tree):
  return {"/".join(k.key for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(flat):
  tree = {}
  for path, x in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = x
  return tree


# Safetensors files.

def _open(path, framework="numpy"):
  """safe_open; "numpy" cannot return bfloat16 tensors, "flax" can (as jax arrays on the CPU, one more copy)."""
  try:
    return safetensors.safe_open(path, framework=framework)
  except safetensors.SafetensorError as e:
    raise ValueError(f"Cannot read {path}: {e} (truncated or corrupt safetensors file?)") from e


def safetensors_files(hf_dir: str) -> list[str]:
  """The checkpoint's safetensors files: the shards of model.safetensors.index.json, else model.safetensors."""
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      names = dict.fromkeys(json.load(f)["weight_map"].values())
    files = [os.path.join(hf_dir, n) for n in names]
  elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
    files = [os.path.join(hf_dir, "model.safetensors")]
  else:
    raise FileNotFoundError(f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json.")
  for path in files:
    if not os.path.exists(path):
      raise FileNotFoundError(f"Missing safetensors file {path}.")
  return files


def _inventory(files, targets):
  """Checks names, shapes and dtypes from the headers: hub name -> (file, stored name, dtype)."""
  found = {}
  for path in files:
    with _open(path) as f:
      for name in f.keys():
        try:
          hub = canonical_name(name)
        except ValueError as e:
          raise ValueError(f"{path}: {e}") from None
        if hub is None:
          continue
        if hub not in targets:
          raise ValueError(f"{path}: unexpected tensor {name!r}: config.json describes no such parameter.")
        if hub in found:
          raise ValueError(f"{path}: tensor {name!r} duplicates {found[hub][1]!r} in {found[hub][0]}.")
        tensor = f.get_slice(name)
        shape, dtype = tuple(tensor.get_shape()), tensor.get_dtype()
        if shape != targets[hub].shape:
          raise ValueError(f"{path}: tensor {name!r} has shape {shape}, expected {targets[hub].shape} "
                           f"(from config.json).")
        if dtype not in _FLOAT_DTYPES:
          raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}, expected a float type.")
        found[hub] = (path, name, dtype)
  missing = [n for n in targets if n not in found]
  if missing:
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    raise ValueError(f"Missing tensor(s) in {os.path.dirname(files[0])}: {', '.join(missing[:3])}{more}.")
  return found


def load_params(hf_dir: str, config: ml_collections.ConfigDict, progress: bool = False) -> dict:
  """Our params (numpy, `config.param_dtype`) from a directory's safetensors files."""
  targets, shapes = _targets(config)
  found = _inventory(safetensors_files(hf_dir), targets)
  out = {path: np.empty(sds.shape, sds.dtype) for path, sds in shapes.items()}
  by_file = {}
  for hub, (path, name, dtype) in found.items():
    by_file.setdefault(path, []).append((hub, name, dtype))
  bar = tqdm.tqdm(total=len(found), unit="tensor", desc="Converting", disable=not progress)
  with jax.default_device(jax.devices("cpu")[0]), bar:
    for path, names in by_file.items():
      with _open(path, "flax" if any(d == "BF16" for _, _, d in names) else "numpy") as f:
        for hub, name, _ in names:
          t = targets[hub]
          leaf = out[t.path]
          shape = leaf.shape[1:] if t.layer is not None else leaf.shape
          x = t.rule.apply(np.asarray(f.get_tensor(name)), shape).astype(leaf.dtype, copy=False)
          if t.layer is None:
            out[t.path][...] = x
          else:
            out[t.path][t.layer] = x
          bar.update()
  return _unflat(out)


def load_hf(hf_dir: str, dtype: str | None = None, progress: bool = False):
  """(params, config, tokenizer path or None) from a Hugging Face directory; `dtype` overrides the weights'."""
  config = read_config(hf_dir)
  if dtype is not None:
    if dtype not in DTYPES:
      raise ValueError(f"Unsupported dtype {dtype!r}; choose one of {DTYPES}.")
    config.param_dtype = dtype
  params = load_params(hf_dir, config, progress=progress)
  tokenizer = os.path.join(hf_dir, "tokenizer.model")
  return params, config, tokenizer if os.path.exists(tokenizer) else None
