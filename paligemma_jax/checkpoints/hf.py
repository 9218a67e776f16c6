"""Reads Hugging Face PaliGemma / PaliGemma 2 directories (config.json, safetensors) into params.

The config is read by hf_config.py; this module maps and reads the tensors.

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
import ml_dtypes
import numpy as np
import safetensors
import tqdm

from paligemma_jax import errors
from paligemma_jax.checkpoints import hf_config
from paligemma_jax.checkpoints import host_memory
from paligemma_jax.model import paligemma

_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # As safetensors names them.

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
  raise errors.InputError(f"Unexpected tensor {name!r}: not part of a PaliGemma checkpoint.")


class _Rule(NamedTuple):
  """How one of our leaves (per-layer shape `s`) comes from a torch tensor, and goes back to one
  (`invert`: our leaf, torch shape -> the tensor; used by hf_export.py)."""
  hf_shape: Callable[[tuple], tuple]
  apply: Callable[[np.ndarray, tuple], np.ndarray]
  invert: Callable[[np.ndarray, tuple], np.ndarray] | None = None


def _linear(n_in):
  """torch Linear weight [out, in] -> kernel [*in_axes, *out_axes], the first n_in axes inputs."""
  return _Rule(lambda s: (math.prod(s[n_in:]), math.prod(s[:n_in])), lambda x, s: x.T.reshape(s),
               lambda y, h: y.reshape(h[1], h[0]).T)


_COPY = _Rule(tuple, lambda x, s: x, lambda y, h: y)
# [H*hd] -> [H, hd] biases.
_FLAT = _Rule(lambda s: (math.prod(s),), lambda x, s: x.reshape(s), lambda y, h: y.reshape(h))
# OIHW -> HWIO.
_CONV = _Rule(lambda s: (s[3], s[2], s[0], s[1]), lambda x, s: x.transpose(2, 3, 1, 0),
              lambda y, h: y.transpose(3, 2, 0, 1))


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
  """safe_open; "numpy" cannot return bfloat16 tensors, "flax" can (as jax arrays on the CPU, one
  more copy)."""
  try:
    return safetensors.safe_open(path, framework=framework)
  except safetensors.SafetensorError as e:
    raise errors.InputError(f"{path}: cannot read it: {e} (truncated or corrupt safetensors "
                            "file?)") from None


_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                 "BF16": ml_dtypes.bfloat16}


def _mapped(path) -> dict:
  """Stored name -> read-only numpy view of a memory-mapped safetensors file (read by the OS as
  it is touched, from its page cache; safe_open's get_tensor copies each tensor first, and
  cannot return bfloat16 without going through jax). The file was checked by `_inventory`."""
  with open(path, "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  data = np.memmap(path, np.uint8, mode="r")
  start = 8 + int.from_bytes(data[:8].tobytes(), "little")
  tensors = {}
  for name, info in header.items():
    if name != "__metadata__" and info["dtype"] in _NUMPY_DTYPES:
      begin, end = info["data_offsets"]
      tensors[name] = data[start + begin:start + end].view(_NUMPY_DTYPES[info["dtype"]]).reshape(
          info["shape"])
  return tensors


def safetensors_files(hf_dir: str) -> list[str]:
  """The checkpoint's safetensors files: the shards of model.safetensors.index.json, else
  model.safetensors."""
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    weight_map = hf_config.read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
      raise errors.InputError(f"{index}: expected an object with a \"weight_map\" of file names.")
    names = dict.fromkeys(weight_map.values())
    files = [os.path.join(hf_dir, n) for n in names]
  elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
    files = [os.path.join(hf_dir, "model.safetensors")]
  else:
    raise FileNotFoundError(f"{hf_dir} has neither model.safetensors nor "
                            "model.safetensors.index.json.")
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
        except errors.InputError as e:
          raise errors.InputError(f"{path}: {e}") from None
        if hub is None:
          continue
        if hub not in targets:
          raise errors.InputError(f"{path}: unexpected tensor {name!r}: config.json describes no "
                                  "such parameter.")
        if hub in found:
          raise errors.InputError(f"{path}: tensor {name!r} duplicates {found[hub][1]!r} in "
                                  f"{found[hub][0]}.")
        tensor = f.get_slice(name)
        shape, dtype = tuple(tensor.get_shape()), tensor.get_dtype()
        if shape != targets[hub].shape:
          raise errors.InputError(f"{path}: tensor {name!r} has shape {shape}, expected "
                                  f"{targets[hub].shape} (from config.json).")
        if dtype not in _FLOAT_DTYPES:
          raise errors.InputError(f"{path}: tensor {name!r} has dtype {dtype}, expected a float "
                                  "type.")
        found[hub] = (path, name, dtype)
  missing = [n for n in targets if n not in found]
  if missing:
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    raise errors.InputError(f"Missing tensor(s) in {os.path.dirname(files[0])}: "
                            f"{', '.join(missing[:3])}{more}.")
  return found


def load_params(hf_dir: str, config: ml_collections.ConfigDict, progress: bool = False) -> dict:
  """Our params (numpy, `config.param_dtype`) from a directory's safetensors files."""
  targets, shapes = _targets(config)
  found = _inventory(safetensors_files(hf_dir), targets)
  out = {path: host_memory.aligned_empty(sds.shape, sds.dtype)  # Taken by JAX as is.
         for path, sds in shapes.items()}
  by_file = {}
  for hub, (path, name, dtype) in found.items():
    by_file.setdefault(path, []).append((hub, name, dtype))
  bar = tqdm.tqdm(total=len(found), unit="tensor", desc="Converting", disable=not progress)
  with bar:
    for path, names in by_file.items():
      tensors = _mapped(path)
      for hub, name, _ in names:
        t = targets[hub]
        leaf = out[t.path]
        shape = leaf.shape[1:] if t.layer is not None else leaf.shape
        x = t.rule.apply(tensors[name], shape)
        if t.layer is None and x.dtype == leaf.dtype and x.flags.c_contiguous:
          out[t.path] = x  # The mapped file itself: no copy until the arrays go to a device.
        elif t.layer is None:
          out[t.path][...] = x
        else:
          out[t.path][t.layer] = x
        bar.update()
  return _unflat(out)


def load_hf(hf_dir: str, dtype: str | None = None, progress: bool = False):
  """(params, config, tokenizer path or None) from a Hugging Face directory; `dtype` overrides
  the weights'."""
  config = hf_config.read_config(hf_dir, dtype)
  params = load_params(hf_dir, config, progress=progress)
  tokenizer = os.path.join(hf_dir, "tokenizer.model")
  return params, config, tokenizer if os.path.exists(tokenizer) else None


# The way back, for hf_export.py: the same table, read in reverse.

def hub_targets(config: ml_collections.ConfigDict) -> dict:
  """Hub tensor name -> (our param path, layer or None, torch shape, rule) for every tensor the
  model has, in our parameter tree's order."""
  return _targets(config)[0]


def to_hub(leaf: np.ndarray, target) -> np.ndarray:
  """The torch-layout tensor of `target` (a `hub_targets` value) from our leaf at target.path."""
  x = leaf if target.layer is None else leaf[target.layer]
  return np.ascontiguousarray(target.rule.invert(x, target.shape))
