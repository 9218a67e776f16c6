"""A Hugging Face PaliGemma / PaliGemma 2 `config.json` -> our model config.

transformers fills in defaults for the fields a config.json omits, differently for an absent
sub-config and a present one; `config_from_hf` applies the same rules, checks every value it
reads (type, range, what this package supports) and names the field when one is wrong.
"""

import json
import os

import ml_collections

from configs import paligemma as presets
from paligemma_jax import errors
from paligemma_jax.checkpoints import checkpoint

DTYPES = ("float32", "bfloat16", "float16")

# transformers' defaults for fields that config.json files omit. When a sub-config is absent,
# PaliGemmaConfig builds it from its `sub_configs_defaults`; when present, only the sub-config
# class's own defaults apply (transformers/models/{paligemma,siglip,gemma,gemma2}/configuration_*).
_MISSING_SUBCONFIG = {
    "vision_config": dict(model_type="siglip_vision_model", intermediate_size=4096,
                          hidden_size=1152, patch_size=14, image_size=224, num_hidden_layers=27,
                          num_attention_heads=16, vision_use_head=False),
    "text_config": dict(model_type="gemma", hidden_size=2048, num_hidden_layers=18,
                        intermediate_size=16384, num_attention_heads=8, num_key_value_heads=1,
                        vocab_size=257152),
}
_CLASS_DEFAULTS = {
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, num_channels=3, image_size=224,
                                patch_size=16, hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6, vision_use_head=True),
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                  head_dim=256, hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                  attention_bias=False),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                   hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, attention_bias=False,
                   query_pre_attn_scalar=256, sliding_window=4096, layer_types=None,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
}
_GELU_TANH = "gelu_pytorch_tanh"
_LAYER_TYPES = ("sliding_attention", "full_attention")


def _unsupported(field, value, why):
  return errors.InputError(f"Unsupported Hugging Face PaliGemma config: {field}={value!r} ({why}).")


def _subconfig(hf_config, key):
  """A sub-config with transformers' defaults filled in, and its model_type."""
  given = hf_config.get(key)
  if given is None:
    given = _MISSING_SUBCONFIG[key]
  if not isinstance(given, dict):
    raise _unsupported(key, given, "expected a JSON object")
  model_type = given.get("model_type", _MISSING_SUBCONFIG[key]["model_type"])
  is_vision = model_type == "siglip_vision_model"
  if (not isinstance(model_type, str) or model_type not in _CLASS_DEFAULTS
      or (key == "vision_config") != is_vision):
    raise _unsupported(f"{key}.model_type", model_type,
                       "expected siglip_vision_model, gemma or gemma2")
  return {**_CLASS_DEFAULTS[model_type], **given, "model_type": model_type}


def _number(section, sub, key, kind=int, none=None):
  """sub[key] as a non-negative `kind` (an int will do for a float); `none` stands for null."""
  value = sub[key]
  if value is None and none is not None:
    return none
  if not (type(value) is int or (kind is float and type(value) is float)) or value < 0:
    raise _unsupported(f"{section}.{key}", value,
                       "expected a non-negative " + ("integer" if kind is int else "number"))
  return kind(value)


def _square(section, sub, key):
  value = sub[key]
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise _unsupported(f"{section}.{key}", value, "only square sizes are supported")
    return _number(section, {key: value[0]}, key)
  return _number(section, sub, key)


def _rope_base(t):
  """RoPE base from `rope_parameters` (transformers 5) or `rope_theta` (older); no scaling."""
  if t.get("rope_scaling"):
    raise _unsupported("text_config.rope_scaling", t["rope_scaling"],
                       "only default RoPE is supported")
  rope = t.get("rope_parameters") or {}
  if not isinstance(rope, dict):
    raise _unsupported("text_config.rope_parameters", rope, "expected a JSON object")
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default":
    raise _unsupported("text_config.rope_parameters.rope_type", kind,
                       "only default RoPE is supported")
  if "rope_theta" in rope:
    return _number("text_config.rope_parameters", rope, "rope_theta", float)
  return _number("text_config", {"rope_theta": 10000.0, **t}, "rope_theta", float)


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
  number = lambda key, kind=int: _number("vision_config", v, key, kind)
  return dict(width=number("hidden_size"), depth=number("num_hidden_layers"),
              mlp_dim=number("intermediate_size"), num_heads=number("num_attention_heads"),
              patch_size=_square("vision_config", v, "patch_size"),
              norm_eps=number("layer_norm_eps", float),
              image_size=_square("vision_config", v, "image_size"))


def _text(hf_config):
  t = _subconfig(hf_config, "text_config")
  family = t["model_type"]
  act_field = "hidden_act" if family == "gemma" else "hidden_activation"
  act = t[act_field]
  if not (act == _GELU_TANH or (family == "gemma" and act == "gelu")):  # Legacy "gelu": tanh.
    raise _unsupported(f"text_config.{act_field}", act, f"expected {_GELU_TANH}")
  if t["attention_bias"]:
    raise _unsupported("text_config.attention_bias", True, "Gemma attention has no biases")
  if t.get("use_bidirectional_attention") is False:
    raise _unsupported("text_config.use_bidirectional_attention", False,
                       "PaliGemma's prefix is bidirectional")
  number = lambda key, kind=int, none=None: _number("text_config", t, key, kind, none)
  text = dict(family=family, vocab_size=number("vocab_size"), width=number("hidden_size"),
              depth=number("num_hidden_layers"), num_heads=number("num_attention_heads"),
              num_kv_heads=number("num_key_value_heads"), head_dim=number("head_dim"),
              mlp_dim=number("intermediate_size"), query_pre_attn_scalar=number("head_dim", float),
              attn_logit_softcap=0.0, final_logit_softcap=0.0, sliding_window=0, layer_types=(),
              norm_eps=number("rms_norm_eps", float), rope_base=_rope_base(t))
  if family == "gemma2":
    depth = text["depth"]
    layer_types = t["layer_types"] or [_LAYER_TYPES[i % 2] for i in range(depth)]
    if (not isinstance(layer_types, list) or len(layer_types) != depth
        or not all(kind in _LAYER_TYPES for kind in layer_types)):
      raise _unsupported("text_config.layer_types", layer_types,
                         f"expected {depth} of {_LAYER_TYPES}")
    text.update(query_pre_attn_scalar=number("query_pre_attn_scalar", float),
                attn_logit_softcap=number("attn_logit_softcapping", float, none=0.0),
                final_logit_softcap=number("final_logit_softcapping", float, none=0.0),
                sliding_window=number("sliding_window", none=0), layer_types=tuple(layer_types))
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
  """Our model config from a Hugging Face PaliGemma config.json dict (transformers' defaults
  apply)."""
  if hf_config.get("model_type", "paligemma") != "paligemma":
    raise _unsupported("model_type", hf_config["model_type"], "expected paligemma")
  if hf_config.get("quantization_config"):
    raise _unsupported("quantization_config", hf_config["quantization_config"], "quantized weights")
  if not hf_config.get("tie_word_embeddings", True):
    raise _unsupported("tie_word_embeddings", False, "the LM head is the embedding table")
  vision, text = _vision(hf_config), _text(hf_config)
  projection_dim = hf_config.get("projection_dim", 2048)
  if projection_dim != text["width"]:
    raise _unsupported("projection_dim", projection_dim,
                       f"must equal text_config.hidden_size={text['width']}")
  image_token_id = hf_config.get("image_token_index", hf_config.get("image_token_id", 256000))
  if type(image_token_id) is not int or not 0 <= image_token_id < text["vocab_size"]:
    raise _unsupported("image_token_index", image_token_id, "expected a token id")
  return checkpoint.model_config(dict(
      variant=_variant(vision, text), vision=vision, text=text, image_token_id=image_token_id,
      param_dtype=_param_dtype(hf_config)))


def read_json(path: str):
  with open(path, "rb") as f:
    try:
      return json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError.
      raise errors.InputError(f"{path}: not valid JSON ({e}).") from None


def read_config(hf_dir: str, dtype: str | None = None) -> ml_collections.ConfigDict:
  """Our model config for a Hugging Face directory; `dtype` replaces its weights' dtype."""
  if not os.path.isdir(hf_dir):
    raise FileNotFoundError(f"{hf_dir}: no such Hugging Face model directory.")
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model directory: no config.json.")
  hf_config = read_json(path)
  if not isinstance(hf_config, dict):
    raise errors.InputError(f"{path}: expected a JSON object, not a {type(hf_config).__name__}.")
  if dtype is not None and dtype not in DTYPES:
    raise errors.InputError(f"Unsupported dtype {dtype!r}; choose one of {DTYPES}.")
  try:
    config = config_from_hf(hf_config)
  except errors.InputError as e:
    raise errors.InputError(f"{path}: {e}") from None
  if dtype is not None:
    config.param_dtype = dtype
  return config


def config_to_hf(config: ml_collections.ConfigDict, dtype: str) -> dict:
  """The inverse of `config_from_hf`: a config.json dict, as transformers 5 writes it, for a
  model whose weights are stored in `dtype`."""
  v, t = config.vision, config.text
  text = dict(model_type=t.family, vocab_size=t.vocab_size, hidden_size=t.width,
              num_hidden_layers=t.depth, num_attention_heads=t.num_heads,
              num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim,
              intermediate_size=t.mlp_dim, rms_norm_eps=t.norm_eps, attention_bias=False,
              rope_parameters=dict(rope_type="default", rope_theta=t.rope_base),
              bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True,
              use_bidirectional_attention=True,
              num_image_tokens=(v.image_size // v.patch_size) ** 2)
  if t.family == "gemma":
    text["hidden_act"] = _GELU_TANH
    if t.query_pre_attn_scalar != t.head_dim:
      raise errors.InputError(f"Gemma (PaliGemma 1) scales queries by head_dim^-0.5; this model "
                              f"uses {t.query_pre_attn_scalar}^-0.5, which config.json cannot say.")
  else:
    scalar = t.query_pre_attn_scalar  # transformers insists on an int.
    text.update(hidden_activation=_GELU_TANH,
                query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
                attn_logit_softcapping=t.attn_logit_softcap or None,
                final_logit_softcapping=t.final_logit_softcap or None,
                sliding_window=t.sliding_window or None,
                layer_types=list(t.layer_types) or [_LAYER_TYPES[i % 2] for i in range(t.depth)])
    if not t.sliding_window:  # No window: no sliding layers either.
      text["layer_types"] = ["full_attention"] * t.depth
  vision = dict(model_type="siglip_vision_model", hidden_size=v.width, intermediate_size=v.mlp_dim,
                num_hidden_layers=v.depth, num_attention_heads=v.num_heads, num_channels=3,
                patch_size=v.patch_size, image_size=v.image_size, layer_norm_eps=v.norm_eps,
                hidden_act=_GELU_TANH, vision_use_head=False, projection_dim=t.width)
  return dict(architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma",
              dtype=dtype, hidden_size=t.width, projection_dim=t.width, vocab_size=t.vocab_size,
              image_token_index=config.image_token_id, tie_word_embeddings=True,
              text_config=text, vision_config=vision)
