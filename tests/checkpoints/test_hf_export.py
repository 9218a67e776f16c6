"""Export to transformers: Hugging Face -> ours -> Hugging Face is exact, and transformers runs
the export (plain, sharded, bfloat16, a LoRA fine-tune merged) with the logits ours gives."""

import json
import os
import re
import subprocess
import sys
import types

import jax
import ml_dtypes
import numpy as np
from PIL import Image
import pytest
import safetensors
import safetensors.numpy
import transformers

import hf_fixtures
from hf_fixtures import max_error, padded_batch, reference_logits
from configs import finetune as finetune_config
from paligemma_jax import errors
from paligemma_jax.checkpoints import hf
from paligemma_jax.checkpoints import hf_config
from paligemma_jax.checkpoints import hf_export
from paligemma_jax.checkpoints import loading
from paligemma_jax.model import paligemma
from paligemma_jax.preprocess.tokenizer import Tokenizer
from paligemma_jax.training import objective
from paligemma_jax.training import trainer
from helpers import ROOT, assert_expected_failure

RTOL = 1e-4  # Of the logit scale, as in test_parity.py.


def _tensors(directory):
  """Every stored tensor by hub name (the tied head dropped), as numpy."""
  out = {}
  for path in hf.safetensors_files(directory):
    with safetensors.safe_open(path, "numpy") as f:
      for name in f.keys():
        if hf.canonical_name(name) is not None:
          out[hf.canonical_name(name)] = f.get_tensor(name)
  return out


def _structure(config):
  return {k: v for k, v in config.to_dict().items() if k not in ("dtype", "remat", "scan_layers")}


@pytest.mark.parametrize("version, naming", [(1, "hub"), (2, "transformers5")])
def test_hf_to_ours_to_hf_is_exact(tmp_path, spm_model_path, version, naming):
  source = hf_fixtures.make_hf_paligemma(str(tmp_path / "hf"), version=version, naming=naming)
  params, config, _ = hf.load_hf(source.path)
  hf_export.export(params, config, spm_model_path, str(tmp_path / "out"), progress=False,
                   tokenizer_json=False)
  want, got = _tensors(source.path), _tensors(str(tmp_path / "out"))
  assert sorted(got) == sorted(want)
  for name, x in want.items():
    assert got[name].dtype == x.dtype and np.array_equal(got[name], x), name
  assert _structure(hf_config.read_config(str(tmp_path / "out"))) == _structure(config)

  hf_export.export(params, config, spm_model_path, str(tmp_path / "bf16"), dtype="bfloat16",
                   progress=False, tokenizer_json=False)
  got = _tensors(str(tmp_path / "bf16"))
  for name, x in want.items():
    assert np.array_equal(got[name], x.astype(ml_dtypes.bfloat16)), name
  assert hf_config.read_config(str(tmp_path / "bf16")).param_dtype == "bfloat16"


def _check_logits(out_dir, config, params=None, reference=None):
  """transformers loads `out_dir` and gives our logits for `params`, or (cheaper: no compiling)
  those of the transformers model `reference` that ours matches (test_parity.py)."""
  model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(out_dir).eval()
  batch = padded_batch(config, lengths=[config.vision.image_size + 6, 20], prefix_lengths=[20, 18])
  if reference is None:
    apply = jax.jit(paligemma.PaliGemma(config).apply)  # One compiled program, not op by op.
    ours = np.asarray(apply({"params": params}, *batch))
  else:
    ours = reference_logits(reference, *batch)
  theirs = reference_logits(model, *batch)
  assert theirs.shape[-1] == config.text.vocab_size
  assert max_error(ours, theirs, batch[2]) < RTOL


def _check_processor(out_dir, config, tokenizer_path):
  """PaliGemmaProcessor loads `out_dir` and prepares inputs as ours does."""
  processor = transformers.PaliGemmaProcessor.from_pretrained(out_dir)
  n = paligemma.num_image_tokens(config)
  image = Image.fromarray(np.full((20, 30, 3), 200, np.uint8))
  inputs = processor(images=image, text="<image>caption en", return_tensors="np")
  tokenizer = Tokenizer(tokenizer_path)
  want = [config.image_token_id] * n + [tokenizer.bos_id] + tokenizer.encode("caption en\n")
  assert inputs["input_ids"][0].tolist() == want
  assert processor.image_token_id == config.image_token_id
  s = config.vision.image_size
  assert inputs["pixel_values"].shape == (1, 3, s, s)
  assert np.allclose(inputs["pixel_values"], 200 / 255 * 2 - 1, atol=1e-6)


@pytest.mark.parametrize("version, sharded", [(1, True), (2, False)])
def test_transformers_runs_an_exported_checkpoint(tmp_path, converted_checkpoint, spm_model_path,
                                                  version, sharded):
  checkpoint_dir, reference = converted_checkpoint(version)
  out = str(tmp_path / "out")
  hf_export.export_checkpoint(checkpoint_dir, out, max_shard_size="40KB" if sharded else "5GB",
                              progress=False, tokenizer_json=not sharded)
  assert ("tokenizer.json" in os.listdir(out)) == (not sharded)
  names = os.listdir(out)
  shards = [n for n in names if n.endswith(".safetensors")]
  assert ("model.safetensors.index.json" in names) == sharded and (len(shards) > 2) == sharded
  if sharded:
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
      index = json.load(f)
    assert sorted(set(index["weight_map"].values())) == sorted(shards)
    for n in shards:  # At most the limit (plus the header), unless one tensor alone is more.
      alone = list(index["weight_map"].values()).count(n) == 1
      assert alone or os.path.getsize(os.path.join(out, n)) < 40_000 + 8_000, n
  config = loading.load_model(checkpoint_dir).config
  _check_logits(out, config, reference=reference)
  if not sharded:  # Once: PaliGemmaProcessor takes seconds to load.
    _check_processor(out, config, spm_model_path)


def test_lora_finetune_exports_merged_weights(tmp_path, converted_checkpoint, monkeypatch):
  """The fine-tune's own export step (trainer._export) on LoRA adapters as training leaves them
  (B no longer zero): transformers runs the merged model with our logits. Training itself is
  test_finetune.py's."""
  monkeypatch.setattr(hf_export, "_add_tokenizer_json", lambda directory: None)  # Seconds; tested.
  checkpoint_dir, _ = converted_checkpoint(1)
  config = finetune_config.get_config("lora")
  base, model_config, tokenizer = loading.load_model(checkpoint_dir, dtype="float32",
                                                     param_dtype=loading.STORED)
  parametrization, adapters, frozen = objective.init_trainable(config, base, jax.random.PRNGKey(0),
                                                              np.float32)
  rng = np.random.default_rng(0)
  adapters = jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape, np.float32), adapters)
  run = types.SimpleNamespace(model=paligemma.PaliGemma(model_config), tokenizer=tokenizer,
                              parametrization=parametrization, frozen=frozen)
  out = str(tmp_path / "export")
  trainer._export(run, {"params": adapters}, out, "hf")
  merged = parametrization.full(adapters, frozen, dtype=np.float32)
  get = lambda tree: np.asarray(tree["llm"]["layers"]["attn"]["q"]["kernel"])
  assert not np.allclose(get(merged), get(base), atol=1e-3)  # The adapters change the model.
  _check_logits(out, model_config, params=merged)
  with pytest.raises(errors.InputError, match="--export_format=npz"):
    trainer.validate(config, base=checkpoint_dir, train_jsonl=os.path.join(out, "config.json"),
                     workdir=str(tmp_path / "work"), export_format="npz")


def test_export_is_atomic(tmp_path, converted_checkpoint, monkeypatch):
  checkpoint_dir, _ = converted_checkpoint(1)
  out = tmp_path / "out"
  real_save = safetensors.numpy.save_file
  calls = []

  def save_then_fail(tensors, path, **kw):
    calls.append(path)
    if len(calls) == 2:
      raise OSError(28, "No space left on device", path)
    real_save(tensors, path, **kw)

  monkeypatch.setattr(safetensors.numpy, "save_file", save_then_fail)
  with pytest.raises(OSError):
    hf_export.export_checkpoint(checkpoint_dir, str(out), max_shard_size="40KB", progress=False,
                                tokenizer_json=False)
  assert os.listdir(tmp_path) == []  # Neither OUT nor its temporary.
  out.mkdir()
  with pytest.raises(FileExistsError):
    hf_export.export_checkpoint(checkpoint_dir, str(out), progress=False)
  with pytest.raises(errors.InputError, match="max_shard_size=lots"):
    hf_export.export_checkpoint(checkpoint_dir, str(tmp_path / "new"), max_shard_size="lots")


@pytest.mark.parametrize("size", ["-5GB", "0MB", "0.0001KB", "1e400GB", "5", 0, -1])
def test_a_shard_size_must_be_a_positive_size(size, tmp_path):
  """huggingface_hub took -5GB (a shard per tensor) and failed on 1e400GB with an OverflowError."""
  message = re.escape(f"--max_shard_size={size}: give a positive")
  with pytest.raises(errors.InputError, match=message):
    hf_export.check_arguments(str(tmp_path / "out"), None, size)
  assert (hf_export.shard_size_bytes("40KB"), hf_export.shard_size_bytes(" 1.5 gb")) == (
      40_000, 1_500_000_000)


def test_command_line_refuses_a_negative_shard_size_before_loading(tmp_path):
  run = subprocess.run(
      [sys.executable, "-m", "checkpoints_convert.orbax_to_hf", "--checkpoint=/nonexistent",
       f"--output_dir={tmp_path / 'out'}", "--max_shard_size=-5GB"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
  assert assert_expected_failure(run) == [
      "orbax_to_hf.py: error: --max_shard_size=-5GB: give a positive size with a unit, e.g. 5GB, "
      "500MB or 40KB."], run.stderr
  assert os.listdir(tmp_path) == []


def test_command_line(tmp_path, converted_checkpoint):
  checkpoint_dir, _ = converted_checkpoint(2)
  out = tmp_path / "out"
  run = subprocess.run(
      [sys.executable, "-m", "checkpoints_convert.orbax_to_hf", f"--checkpoint={checkpoint_dir}",
       f"--output_dir={out}", "--dtype=bfloat16", "--max_shard_size=40KB"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
  assert run.returncode == 0, run.stderr
  assert "model.safetensors.index.json" in os.listdir(out) and "tokenizer.json" in os.listdir(out)
  assert hf_config.read_config(str(out)).param_dtype == "bfloat16"
  # As a user runs it (no JAX_PLATFORMS): JAX's note about the TPU plugin it could not open stays
  # out of the one line.
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  failed = subprocess.run(
      [sys.executable, "-m", "checkpoints_convert.orbax_to_hf", "--checkpoint=no-org/no-model",
       f"--output_dir={tmp_path / 'out2'}"], cwd=ROOT, capture_output=True, text=True,
      timeout=300, env=dict(env, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path)))
  assert failed.returncode == 1 and failed.stderr.strip().splitlines() == [
      "orbax_to_hf.py: error: " + failed.stderr.split("error: ", 1)[1].strip()], failed.stderr
