"""Our model -> a Hugging Face PaliGemma directory that transformers (and vLLM) load as it is.

  OUT/config.json                  hf_config.config_to_hf (PaliGemma 1 or 2, softcaps, window)
  OUT/model.safetensors            hub tensor names (hf.py's table, read in reverse); past
  OUT/model-0000i-of-0000n.safetensors + model.safetensors.index.json   `max_shard_size`
  OUT/generation_config.json       bos/eos/pad ids
  OUT/tokenizer.model, tokenizer_config.json, special_tokens_map.json, preprocessor_config.json
                                   what PaliGemmaProcessor.from_pretrained(OUT) needs
  OUT/tokenizer.json               where transformers is installed (else it is built at load)

Tensors are converted one at a time and written one shard at a time, so no second copy of the
model is held. OUT appears only once complete (written aside, renamed); a kill leaves at most a
temporary sibling, which the next export of OUT removes. Neither torch nor transformers is
needed (transformers only for tokenizer.json).
"""

import json
import math
import os
import re

from absl import logging
import huggingface_hub
import jax
import jax.numpy as jnp
import ml_collections
import safetensors.numpy
import tqdm
from flax import traverse_util

from paligemma_jax import errors
from paligemma_jax import files
from paligemma_jax import multihost
from paligemma_jax.checkpoints import checkpoint
from paligemma_jax.checkpoints import hf
from paligemma_jax.checkpoints import hf_config
from paligemma_jax.checkpoints import loading
from paligemma_jax.model import paligemma
from paligemma_jax.preprocess.tokenizer import Tokenizer

IMAGE_TOKEN = "<image>"
DEFAULT_MAX_SHARD_SIZE = "5GB"
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([KMGT]B)\s*", re.IGNORECASE)
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # As huggingface_hub reads them.


def shard_size_bytes(max_shard_size: int | str) -> int:
  """Bytes of `max_shard_size`: a positive integer, or a positive number with a unit KB, MB, GB
  or TB (huggingface_hub's spelling and decimal units). huggingface_hub itself takes "-5GB" (one
  shard per tensor) and fails on "1e400GB" with an OverflowError: both are InputErrors here."""
  size = None
  if isinstance(max_shard_size, str):
    match = _SIZE.fullmatch(max_shard_size)
    if match and math.isfinite(float(match[1])):
      size = int(float(match[1]) * _UNITS[match[2].upper()])
  elif isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool):
    size = max_shard_size
  if size is None or size < 1:
    raise errors.InputError(f"--max_shard_size={max_shard_size}: give a positive size with a unit, "
                            "e.g. 5GB, 500MB or 40KB.")
  return size


def _shards(targets, dtype, max_shard_size):
  """huggingface_hub's split into shards (file name -> tensor names), from shapes alone."""
  itemsize = jnp.dtype(dtype).itemsize
  sizes = {name: math.prod(t.shape) * itemsize for name, t in targets.items()}
  split = huggingface_hub.split_state_dict_into_shards_factory(
      sizes, get_storage_size=lambda size: size, max_shard_size=shard_size_bytes(max_shard_size),
      filename_pattern="model{suffix}.safetensors")
  return split, sum(sizes.values())


def _tokenizer_files(tokenizer: Tokenizer, config, directory: str):
  """tokenizer.model plus the JSON files PaliGemmaProcessor reads: a GemmaTokenizer with
  <image> at the model's image token id, and a SigLIP image processor (bicubic, [-1, 1])."""
  sp = tokenizer._sp  # pylint: disable=protected-access
  # As our Tokenizer reads it: with any <loc>/<seg> pieces the file lacked added at its ids.
  with files.open_for_writing(os.path.join(directory, checkpoint.TOKENIZER), "wb") as f:
    f.write(sp.serialized_model_proto())
  piece = sp.id_to_piece
  special = dict(bos_token=piece(tokenizer.bos_id), eos_token=piece(tokenizer.eos_id),
                 pad_token=piece(tokenizer.pad_id), unk_token=piece(tokenizer.unk_id),
                 additional_special_tokens=[IMAGE_TOKEN])
  image_token = dict(content=IMAGE_TOKEN, lstrip=False, normalized=False, rstrip=False,
                     single_word=False, special=True)
  size = config.vision.image_size
  documents = {
      "special_tokens_map.json": special,
      "tokenizer_config.json": dict(
          special, tokenizer_class="GemmaTokenizer", processor_class="PaliGemmaProcessor",
          add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False,
          spaces_between_special_tokens=False, sp_model_kwargs={},
          added_tokens_decoder={str(config.image_token_id): image_token}),
      "preprocessor_config.json": dict(
          image_processor_type="SiglipImageProcessor", processor_class="PaliGemmaProcessor",
          do_resize=True, size=dict(height=size, width=size), resample=3,  # PIL bicubic.
          do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3,
          image_std=[0.5] * 3, do_convert_rgb=None,
          image_seq_length=paligemma.num_image_tokens(config)),
      "generation_config.json": dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                                     pad_token_id=tokenizer.pad_id),
  }
  for name, document in documents.items():
    _write_json(os.path.join(directory, name), document)


def _add_tokenizer_json(directory: str):
  """tokenizer.json, the fast tokenizer transformers would otherwise rebuild from tokenizer.model
  at every load (slow for the real 257k vocabulary); only where transformers is installed."""
  try:
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError:
    logging.info("transformers is not installed: no tokenizer.json (transformers builds it from "
                 "tokenizer.model when it loads the directory).")
    return
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  tokenizer.backend_tokenizer.save(os.path.join(directory, "tokenizer.json"))


def _write_json(path, document):
  with files.open_for_writing(path) as f:
    f.write(json.dumps(document, indent=2, sort_keys=True) + "\n")


def check_arguments(output_dir: str, dtype: str | None, max_shard_size: int | str):
  """Refuses an existing output directory, an unknown dtype or shard size, before any work."""
  checkpoint.check_new(output_dir)
  if dtype is not None and dtype not in hf_config.DTYPES:
    raise errors.InputError(f"Unsupported dtype {dtype!r}; choose one of {hf_config.DTYPES}.")
  shard_size_bytes(max_shard_size)


def export(params, config: ml_collections.ConfigDict, tokenizer_path: str, output_dir: str, *,
           dtype: str | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
           progress: bool = True, tokenizer_json: bool = True):
  """Writes `output_dir` (new) from our params and config; `dtype` (default: config.param_dtype)
  is the dtype of the stored weights; `tokenizer_json`: also tokenizer.json (`_add_tokenizer_json`).
  On a multi-host job every process calls it (sharded
  parameters are gathered leaf by leaf); only process 0 writes."""
  dtype = dtype or config.param_dtype
  check_arguments(output_dir, dtype, max_shard_size)
  tokenizer = Tokenizer(tokenizer_path)
  document = hf_config.config_to_hf(config, dtype)
  targets = hf.hub_targets(config)
  split, total = _shards(targets, dtype, max_shard_size)
  flat = traverse_util.flatten_dict(params, sep="/")
  writer = multihost.is_writer()
  bar = tqdm.tqdm(total=len(targets), unit="tensor", desc="Exporting",
                  disable=not (progress and writer))
  with files.directory_aside(output_dir, writer=writer) as tmp, bar:
    host = {}  # Our leaves on the host, each dropped once its last tensor is written.
    last_use = {t.path: name for name, t in targets.items()}
    for filename, names in split.filename_to_tensors.items():
      tensors = {}
      for name in names:
        target = targets[name]
        if target.path not in host:
          host[target.path] = multihost.fetch(flat[target.path])
        tensors[name] = hf.to_hub(host[target.path], target).astype(jnp.dtype(dtype), copy=False)
        if last_use[target.path] == name:
          del host[target.path]
        bar.update()
      if writer:
        safetensors.numpy.save_file(tensors, os.path.join(tmp, filename),
                                    metadata={"format": "pt"})
      del tensors
    if writer:
      if split.is_sharded:
        _write_json(os.path.join(tmp, "model.safetensors.index.json"),
                    dict(metadata=dict(total_size=total), weight_map=split.tensor_to_filename))
      _write_json(os.path.join(tmp, "config.json"), document)
      _tokenizer_files(tokenizer, config, tmp)
      if tokenizer_json:
        _add_tokenizer_json(tmp)
  multihost.sync(f"hf_export {output_dir}: written")


def export_checkpoint(checkpoint_dir: str, output_dir: str, **kw):
  """`export` of a converted checkpoint (or anything `loading.load_model` takes), in its own
  parameter dtype unless `dtype` is given."""
  check_arguments(output_dir, kw.get("dtype"), kw.get("max_shard_size", DEFAULT_MAX_SHARD_SIZE))
  with jax.default_device(jax.devices("cpu")[0]):
    model = loading.load_model(checkpoint_dir, dtype="float32", param_dtype=loading.STORED)
  export(model.params, model.config, model.tokenizer.path, output_dir, **kw)
