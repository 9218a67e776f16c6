"""Reads big_vision PaliGemma / PaliGemma 2 checkpoints: the `.npz` files of Kaggle and of the
Hub's `-jax` repositories.

An `.npz` is a zip of `.npy` arrays with flat `/`-separated keys (under `params/`; files written
without the prefix are read too), layers stacked on axis 0. Shapes for PaliGemma 2 3B at 224 px:

  img/embedding/{kernel [14,14,3,1152], bias}, img/pos_embedding [1,256,1152]
  img/Transformer/encoderblock/  LayerNorm_{0,1}/{scale,bias} [27,1152]
    MlpBlock_0/Dense_0/{kernel [27,1152,4304], bias}
    MlpBlock_0/Dense_1/{kernel [27,4304,1152], bias}
    MultiHeadDotProductAttention_0/{query,key,value}/{kernel [27,1152,16,72], bias [27,16,72]},
                                   out/{kernel [27,16,72,1152], bias}
  img/Transformer/encoder_norm/{scale,bias}, img/head/{kernel [1152,2304], bias} (the projector)
  llm/embedder/input_embedding [257152,2304], llm/final_norm/scale
  llm/layers/attn/q_einsum/w [26,8,2304,256]      (layer, head, width, head dim)
  llm/layers/attn/kv_einsum/w [26,2,4,2304,256]   (k then v)
  llm/layers/attn/attn_vec_einsum/w [26,8,256,2304]
  llm/layers/mlp/gating_einsum [26,2,2304,9216]   (gate then up)
  llm/layers/mlp/linear [26,9216,2304]
  llm/layers/{pre_attention_norm,pre_ffw_norm}/scale [26,2304]; PaliGemma 2 also
    post_attention_norm and post_ffw_norm

Norm scales mean what Hugging Face's do (RMSNorm multiplies by 1 + scale) and are copied as they
are. bfloat16 arrays are stored as 2-byte void (`|V2`) and viewed back as ml_dtypes.bfloat16.
The table has 257,152 rows and no `<image>` row: the image token (257,152) lies past it, so the
model computes logits over exactly the table's rows, as big_vision does.

The model config comes from the shapes (`config_from_shapes`): a released architecture's preset
when the widths, depth and heads are one (pg1-3b, pg2-3b, pg2-10b, pg2-28b), else every dimension
from the shapes and the rest from the family's defaults. Arrays are read one at a time: members
stored uncompressed (np.savez, what big_vision writes) are memory-mapped where they lie in the
file, compressed ones are decompressed one by one; every member's CRC is checked, and every value
must be finite. So a 28B file never sits twice in memory, and a truncated, corrupt or mismatched
file, a NaN or Inf weight, or a table that does not fit the tokenizer (`check_table`) is one error
naming the array.
"""

import math
import os
import struct
import zipfile
import zlib
from typing import NamedTuple

import flax.traverse_util
import ml_collections
import ml_dtypes
import numpy as np
import tqdm

from configs import paligemma as presets
from paligemma_jax import errors
from paligemma_jax.checkpoints import checkpoint
from paligemma_jax.checkpoints import hf_config
from paligemma_jax.checkpoints import host_memory
from paligemma_jax.model import paligemma

PREFIX = "params/"
IMAGE_TOKEN_ID = 257152  # Past the 257,152-row table: the table has no <image> row.
RELEASED = ("pg1-3b", "pg2-3b", "pg2-10b", "pg2-28b")
_ENC = "img/Transformer/encoderblock/"
_MHA = "MultiHeadDotProductAttention_0/"
_ATTN = _ENC + _MHA
_CRC_CHUNK = 1 << 26
_FINITE_CHUNK = 1 << 24  # Values checked at a time: a 16 MB mask.
MAX_PADDING_ROWS = 1024  # Table rows past the tokenizer's ids (the <image> row, padding).


# Reading the file.

class _Member(NamedTuple):
  name: str  # As stored, without ".npy": what messages name.
  info: zipfile.ZipInfo
  shape: tuple
  dtype: np.dtype  # bfloat16 for the stored `|V2`.
  fortran: bool
  header_size: int  # Bytes of .npy header before the data.


def _dtype(stored: np.dtype, where: str) -> np.dtype:
  if stored.kind == "V" and stored.itemsize == 2 and stored.fields is None:
    return np.dtype(ml_dtypes.bfloat16)  # How numpy writes a bfloat16 array.
  if stored.kind != "f":
    raise errors.InputError(f"{where} has dtype {stored}, expected a float type.")
  return stored


def _end_of_truncated(path: str) -> str:
  """Where a file whose zip directory is gone ends: walks the members' local headers."""
  size, offset, last = os.path.getsize(path), 0, None
  with open(path, "rb") as f:
    while True:
      f.seek(offset)
      head = f.read(30)
      if len(head) < 30 or head[:4] != b"PK\x03\x04":
        break
      (flags,), (csize,) = struct.unpack_from("<H", head, 6), struct.unpack_from("<L", head, 18)
      name_len, extra_len = struct.unpack_from("<HH", head, 26)
      name = f.read(name_len).decode("utf-8", "replace").removesuffix(".npy")
      extra = f.read(extra_len)
      while len(extra) >= 4 and csize == 0xFFFFFFFF:  # Zip64: the sizes are in an extra field.
        tag, length = struct.unpack("<HH", extra[:4])
        if tag == 1 and length >= 16:
          (csize,) = struct.unpack_from("<Q", extra, 12)
        extra = extra[4 + length:]
      end = offset + 30 + name_len + extra_len + csize
      if flags & 8 or end > size:  # Sizes in a trailing descriptor (unknown), or cut short.
        return f"is truncated: it ends inside array {name}"
      offset, last = end, name
  if last is None:
    return "is not an .npz file (no zip members)"
  return f"is truncated or corrupt: it ends after array {last} (the zip directory is missing)"


class NpzFile:
  """The arrays of an .npz, by key (stored name without PREFIX and ".npy"), read one at a time."""

  def __init__(self, path: str):
    self.path = path
    try:
      self._zip = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
      raise errors.InputError(f"{path} {_end_of_truncated(path)}.") from None
    self.members = {}
    for info in self._zip.infolist():
      name = info.filename.removesuffix(".npy")
      if name == info.filename:
        raise errors.InputError(f"{path}: member {name} is not an .npy array.")
      key = name.removeprefix(PREFIX)
      if key in self.members:
        raise errors.InputError(f"{path}: array {name} appears twice.")
      self.members[key] = self._header(name, info)

  def _header(self, name, info):
    try:
      with self._zip.open(info) as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
          raise ValueError(f"unsupported .npy version {version}")
        shape, fortran, dtype = read(f)
        header_size = f.tell()
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
      raise errors.InputError(f"{self.path}: array {name} is corrupt ({e}).") from None
    dtype = _dtype(dtype, f"{self.path}: array {name}")
    if header_size + math.prod(shape) * dtype.itemsize != info.file_size:
      raise errors.InputError(f"{self.path}: array {name} is corrupt: its header says "
                              f"{shape} {dtype}, its member holds {info.file_size} bytes.")
    return _Member(name, info, tuple(shape), dtype, fortran, header_size)

  def shapes(self) -> dict:
    return {k: m.shape for k, m in self.members.items()}

  def read(self, key: str) -> np.ndarray:
    """The array `key`: memory-mapped (read-only) if stored, else decompressed; CRC checked, and
    every value finite (a NaN or Inf weight converts and loads, then only gives empty answers),
    a chunk at a time so that no second copy of the array is made."""
    m = self.members[key]
    if m.info.compress_type == zipfile.ZIP_STORED:
      raw = self._mapped(m)
    else:
      try:
        with self._zip.open(m.info) as f:
          raw = np.frombuffer(f.read(), np.uint8)  # Reading to the end checks the CRC.
      except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise errors.InputError(f"{self.path}: array {m.name} is corrupt ({e}).") from None
    values = raw[m.header_size:].view(m.dtype)
    for i in range(0, values.size, _FINITE_CHUNK):
      if not np.isfinite(values[i:i + _FINITE_CHUNK]).all():
        raise errors.InputError(f"{self.path}: array {m.name} holds NaN or infinite values (a "
                                "diverged training run or a damaged file?).")
    return values.reshape(m.shape, order="F" if m.fortran else "C")

  def _mapped(self, m: _Member) -> np.ndarray:
    with open(self.path, "rb") as f:
      f.seek(m.info.header_offset)
      local = f.read(30)
    start = m.info.header_offset + 30 + sum(struct.unpack_from("<HH", local, 26))  # + name, extra.
    if start + m.info.file_size > os.path.getsize(self.path):
      raise errors.InputError(f"{self.path} is truncated: it ends inside array {m.name}.")
    raw = np.memmap(self.path, np.uint8, "r", offset=start, shape=(m.info.file_size,))
    crc = 0
    for i in range(0, raw.size, _CRC_CHUNK):
      crc = zlib.crc32(raw[i:i + _CRC_CHUNK], crc)
    if crc != m.info.CRC:
      raise errors.InputError(f"{self.path}: array {m.name} is corrupt (CRC mismatch).")
    return raw

  def close(self):
    self._zip.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# The model config, from the shapes.

def _shape(shapes, key, rank):
  if key not in shapes:
    raise errors.InputError(f"no array {PREFIX}{key}: not a big_vision PaliGemma checkpoint.")
  if len(shapes[key]) != rank:
    raise errors.InputError(f"array {PREFIX}{key} has shape {shapes[key]}, expected {rank} "
                            "dimensions.")
  return shapes[key]


def _family_defaults(family, head_dim):
  """What the shapes do not say: the Gemma / Gemma 2 defaults."""
  text = dict(query_pre_attn_scalar=float(head_dim), attn_logit_softcap=0.0,
              final_logit_softcap=0.0, sliding_window=0, layer_types=(), norm_eps=1e-6,
              rope_base=10000.0)
  if family == "gemma2":
    text.update(attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=4096)
  return text


def config_from_shapes(shapes: dict, param_dtype: str = "float32",
                       variant: str | None = None) -> ml_collections.ConfigDict:
  """Our model config for arrays of these shapes (keys without PREFIX). `variant`
  ("pg2-3b-448", any configs/paligemma.py name) replaces what the shapes say; the table's row
  count is kept either way."""
  vocab, width = _shape(shapes, "llm/embedder/input_embedding", 2)
  image_token_id = min(vocab, IMAGE_TOKEN_ID)  # A padded Hugging Face table holds the image row.
  if variant is not None:
    try:
      preset = presets.get_config(variant)
    except ValueError as e:
      raise errors.InputError(f"--variant={variant}: {e}") from None
    preset.text.vocab_size = vocab
    return checkpoint.model_config(dict(
        variant=preset.variant, vision=preset.vision.to_dict(), text=preset.text.to_dict(),
        image_token_id=image_token_id, param_dtype=param_dtype))
  patch, patch2, channels, v_width = _shape(shapes, "img/embedding/kernel", 4)
  _, tokens, _ = _shape(shapes, "img/pos_embedding", 3)
  side = math.isqrt(tokens)
  if side * side != tokens or patch != patch2 or channels != 3:
    raise errors.InputError(f"arrays {PREFIX}img/pos_embedding {shapes['img/pos_embedding']} and "
                            f"{PREFIX}img/embedding/kernel {shapes['img/embedding/kernel']}: "
                            "expected a square grid of square RGB patches.")
  v_depth, _, v_mlp = _shape(shapes, _ENC + "MlpBlock_0/Dense_0/kernel", 3)
  _, _, v_heads, _ = _shape(shapes, _ATTN + "query/kernel", 4)
  vision = dict(width=v_width, depth=v_depth, mlp_dim=v_mlp, num_heads=v_heads, patch_size=patch,
                norm_eps=1e-6, image_size=side * patch)
  depth, heads, _, head_dim = _shape(shapes, "llm/layers/attn/q_einsum/w", 4)
  _, _, kv_heads, _, _ = _shape(shapes, "llm/layers/attn/kv_einsum/w", 5)
  _, _, _, mlp = _shape(shapes, "llm/layers/mlp/gating_einsum", 4)
  family = "gemma2" if "llm/layers/post_attention_norm/scale" in shapes else "gemma"
  text = dict(family=family, vocab_size=vocab, width=width, depth=depth, num_heads=heads,
              num_kv_heads=kv_heads, head_dim=head_dim, mlp_dim=mlp)
  name = "custom"
  for candidate in RELEASED:
    preset = presets.get_config(candidate)
    if all(preset.text[k] == v for k, v in text.items() if k != "vocab_size"):
      text = {**preset.text.to_dict(), "vocab_size": vocab}  # E.g. the 28B's query scale 144.
      same_vision = all(preset.vision[k] == v for k, v in vision.items() if k != "image_size")
      if same_vision and vision["image_size"] in presets.RESOLUTIONS:
        name = candidate
      break
  else:
    text.update(_family_defaults(family, head_dim))
  return checkpoint.model_config(dict(variant=name, vision=vision, text=text,
                                      image_token_id=image_token_id, param_dtype=param_dtype))


# The layout: big_vision arrays <-> our parameters.

def expected_shapes(config: ml_collections.ConfigDict) -> dict:
  """key (without PREFIX) -> shape, of the checkpoint of the model `config` describes."""
  v, t = config.vision, config.text
  vl, vd, vf, vh = v.depth, v.width, v.mlp_dim, v.num_heads
  tl, td, tf = t.depth, t.width, t.mlp_dim
  n = paligemma.num_image_tokens(config)
  shapes = {
      "img/embedding/kernel": (v.patch_size, v.patch_size, 3, vd), "img/embedding/bias": (vd,),
      "img/pos_embedding": (1, n, vd),
      "img/Transformer/encoder_norm/scale": (vd,), "img/Transformer/encoder_norm/bias": (vd,),
      "img/head/kernel": (vd, td), "img/head/bias": (td,),
      _ENC + "MlpBlock_0/Dense_0/kernel": (vl, vd, vf), _ENC + "MlpBlock_0/Dense_0/bias": (vl, vf),
      _ENC + "MlpBlock_0/Dense_1/kernel": (vl, vf, vd), _ENC + "MlpBlock_0/Dense_1/bias": (vl, vd),
      _ATTN + "out/kernel": (vl, vh, vd // vh, vd), _ATTN + "out/bias": (vl, vd),
      "llm/embedder/input_embedding": (t.vocab_size, td), "llm/final_norm/scale": (td,),
      "llm/layers/attn/q_einsum/w": (tl, t.num_heads, td, t.head_dim),
      "llm/layers/attn/kv_einsum/w": (tl, 2, t.num_kv_heads, td, t.head_dim),
      "llm/layers/attn/attn_vec_einsum/w": (tl, t.num_heads, t.head_dim, td),
      "llm/layers/mlp/gating_einsum": (tl, 2, td, tf), "llm/layers/mlp/linear": (tl, tf, td),
  }
  for i in "01":
    shapes[_ENC + f"LayerNorm_{i}/scale"] = shapes[_ENC + f"LayerNorm_{i}/bias"] = (vl, vd)
  for name in ("query", "key", "value"):
    shapes[_ATTN + f"{name}/kernel"] = (vl, vd, vh, vd // vh)
    shapes[_ATTN + f"{name}/bias"] = (vl, vh, vd // vh)
  norms = ["pre_attention_norm", "pre_ffw_norm"]
  norms += ["post_attention_norm", "post_ffw_norm"] * (t.family == "gemma2")
  for norm in norms:
    shapes[f"llm/layers/{norm}/scale"] = (tl, td)
  return shapes


def _same(x):
  return x


def _sources() -> dict:
  """key -> [(our parameter path, stacked array -> our leaf)]."""
  to_ours = lambda x: x.transpose(0, 2, 1, 3)  # [L, N, D, H] -> [L, D, N, H].
  src = {
      "img/pos_embedding": [("img/pos_embedding", lambda x: x[0])],
      "img/Transformer/encoder_norm/scale": [("img/norm/scale", _same)],
      "img/Transformer/encoder_norm/bias": [("img/norm/bias", _same)],
      "img/head/kernel": [("projector/kernel", _same)],
      "img/head/bias": [("projector/bias", _same)],
      "llm/layers/attn/q_einsum/w": [("llm/layers/attn/q/kernel", to_ours)],
      "llm/layers/attn/kv_einsum/w": [("llm/layers/attn/k/kernel", lambda x: to_ours(x[:, 0])),
                                      ("llm/layers/attn/v/kernel", lambda x: to_ours(x[:, 1]))],
      "llm/layers/attn/attn_vec_einsum/w": [("llm/layers/attn/o/kernel", _same)],
      "llm/layers/mlp/gating_einsum": [("llm/layers/mlp/gate/kernel", lambda x: x[:, 0]),
                                       ("llm/layers/mlp/up/kernel", lambda x: x[:, 1])],
      "llm/layers/mlp/linear": [("llm/layers/mlp/down/kernel", _same)],
  }
  for key in ("img/embedding/kernel", "img/embedding/bias", "llm/embedder/input_embedding",
              "llm/final_norm/scale"):
    src[key] = [(key, _same)]
  for norm in ("pre_attention_norm", "pre_ffw_norm", "post_attention_norm", "post_ffw_norm"):
    src[f"llm/layers/{norm}/scale"] = [(f"llm/layers/{norm}/scale", _same)]
  for theirs, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2"),
                       ("MlpBlock_0/Dense_0", "mlp/fc1"), ("MlpBlock_0/Dense_1", "mlp/fc2"),
                       (_MHA + "query", "attn/q"), (_MHA + "key", "attn/k"),
                       (_MHA + "value", "attn/v"), (_MHA + "out", "attn/o")):
    for p in ("scale", "bias") if theirs.startswith("LayerNorm") else ("kernel", "bias"):
      src[_ENC + f"{theirs}/{p}"] = [(f"img/layers/{ours}/{p}", _same)]
  return src


def check_shapes(npz: NpzFile, config: ml_collections.ConfigDict, why: str = ""):
  """Every array the model needs, of its shape, and nothing else; `why`: where the config came
  from, for the message."""
  want, got = expected_shapes(config), npz.shapes()
  for key, shape in want.items():
    if key not in got:
      raise errors.InputError(f"{npz.path}: no array {PREFIX}{key}{why}.")
    if got[key] != shape:
      raise errors.InputError(f"{npz.path}: array {npz.members[key].name} has shape {got[key]}, "
                              f"expected {shape}{why}.")
  extra = sorted(set(got) - set(want))
  if extra:
    raise errors.InputError(f"{npz.path}: unexpected array {npz.members[extra[0]].name}: not "
                            f"part of a {config.text.family} PaliGemma checkpoint.")


def read_params(npz: NpzFile, config: ml_collections.ConfigDict, progress: bool = False) -> dict:
  """Our parameter tree (numpy, config.param_dtype), one array read at a time."""
  shapes = flax.traverse_util.flatten_dict(paligemma.param_shapes(config), sep="/")
  out = {path: host_memory.aligned_empty(sds.shape, sds.dtype)  # Taken by JAX as is.
         for path, sds in shapes.items()}
  sources, filled = _sources(), set()
  for key in tqdm.tqdm(npz.members, unit="array", desc="Converting", disable=not progress):
    x = npz.read(key)
    for path, transform in sources[key]:
      out[path][...] = transform(x)  # Casts as it copies; bfloat16 -> float32 is exact.
      filled.add(path)
    del x  # Unmaps it.
  if filled != set(out):
    raise ValueError(f"No big_vision array fills {sorted(set(out) - filled)}.")  # A bug here.
  return flax.traverse_util.unflatten_dict(out, sep="/")


def check_table(npz: NpzFile, config: ml_collections.ConfigDict, vocab_size: int):
  """The embedding table has a row for each of the tokenizer's `vocab_size` ids, and at most
  MAX_PADDING_ROWS more: big_vision's has exactly as many (257,152: the image token lies past it),
  a Hugging Face one adds the <image> row and padding to a multiple of 64 (257,216). Fewer rows
  leave ids without an embedding; many more mean another tokenizer, or a file that only claims a
  huge table (a compressed member of zeros converts into gigabytes)."""
  rows = config.text.vocab_size
  if not vocab_size <= rows <= vocab_size + MAX_PADDING_ROWS:
    raise errors.InputError(
        f"{npz.path}: array {npz.members['llm/embedder/input_embedding'].name} has {rows} rows, "
        f"but the tokenizer has {vocab_size} ids: expected {vocab_size} to "
        f"{vocab_size + MAX_PADDING_ROWS} rows (one per id, plus at most {MAX_PADDING_ROWS} "
        "padding rows). Is it the tokenizer of this checkpoint?")


def load_npz(path: str, dtype: str | None = None, variant: str | None = None,
             progress: bool = False, vocab_size: int | None = None):
  """(params, config) of a big_vision .npz. dtype: the parameters' (default: the table's);
  variant: see config_from_shapes; vocab_size: the tokenizer's, checked against the table
  (`check_table`) before any weight is read."""
  if dtype is not None and dtype not in hf_config.DTYPES:
    raise errors.InputError(f"Unsupported dtype {dtype!r}; choose one of {hf_config.DTYPES}.")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such .npz file.")
  with NpzFile(path) as npz:
    shapes = npz.shapes()
    table = npz.members.get("llm/embedder/input_embedding")
    stored = table.dtype.name if table is not None else "float32"
    try:
      config = config_from_shapes(shapes, dtype or (stored if stored in hf_config.DTYPES
                                                     else "float32"), variant)
    except errors.InputError as e:
      raise errors.InputError(f"{path}: {e}") from None
    check_shapes(npz, config, f" (--variant={variant})" if variant else
                 " (for the model the other arrays describe)")
    if vocab_size is not None:
      check_table(npz, config, vocab_size)
    return read_params(npz, config, progress), config


def tokenizer_beside(path: str) -> str:
  """The tokenizer.model in the .npz file's directory."""
  return os.path.join(os.path.dirname(os.path.abspath(path)), checkpoint.TOKENIZER)
