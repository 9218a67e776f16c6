"""Shared test fixtures."""

import os
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `paligemma_jax`, `tests.x`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import spm_fixture`.

import spm_fixture  # noqa: E402

# One on-disk compilation cache for the whole run (xdist workers and CLI subprocesses inherit the
# environment): the tiny models compile the same programs in many tests.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="paligemma-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def _xla_knows(flag):
  """Whether this jaxlib's XLA takes `flag`: an unknown flag in XLA_FLAGS aborts the process."""
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                         env=dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu"))
  return probe.returncode == 0


def _add_xla_flags(*flags, probe=False):
  """Appends each flag not yet set in XLA_FLAGS (xdist workers inherit the controller's; so do
  subprocesses); `probe`: only if XLA knows it (one short process, once a session)."""
  current = os.environ.get("XLA_FLAGS", "").split()
  for flag in flags:
    is_set = any(f.split("=")[0] == flag.split("=")[0] for f in current)
    if not is_set and (not probe or _xla_knows(flag)):
      current.append(flag)
  os.environ["XLA_FLAGS"] = " ".join(current)


# Compiling dominates these tiny models' tests: less LLVM optimisation of the CPU code (the same
# HLO; every tolerance holds) makes test_autoregressive.py 26% faster.
_add_xla_flags("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
# At that level XLA's older fused-kernel emitters compile 2-2.5x faster than its MLIR fusion
# emitters (a tiny train step: 8.2 -> 3.0 s; the decode loop: 4.0 -> 2.3 s) with the same
# results. Probed: a jaxlib that dropped the flag would abort every process.
_add_xla_flags("--xla_cpu_use_fusion_emitters=false", probe=True)


@pytest.fixture(scope="session")
def spm_model_path(tmp_path_factory):
  """A small Gemma-style tokenizer.model with loc/seg tokens (ids as in tests/spm_fixture.py)."""
  return str(spm_fixture.build_spm_model(tmp_path_factory.mktemp("spm") / "tokenizer.model"))


@pytest.fixture(scope="session")
def converted_checkpoint(tmp_path_factory, spm_model_path):
  """converted_checkpoint(version) -> (checkpoint dir, transformers model): a tiny random PaliGemma
  `version` (1 or 2) saved by transformers, converted by our converter, with the test tokenizer."""
  from paligemma_jax.checkpoints import checkpoint  # Imported late: jax start-up is not needed by all tests.
  from paligemma_jax.checkpoints import hf
  import hf_fixtures
  built = {}

  def get(version=1):
    if version not in built:
      root = tmp_path_factory.mktemp(f"paligemma{version}")
      reference = hf_fixtures.make_hf_paligemma(str(root / "hf"), version=version,
                                                tokenizer_model=spm_model_path)
      params, config, tokenizer = hf.load_hf(reference.path)
      checkpoint.save(str(root / "checkpoint"), params, config, tokenizer)
      built[version] = (str(root / "checkpoint"), reference.model)
    return built[version]

  return get


# Real widths: SigLIP So400m and Gemma 2 2B widths (one layer each), the 257,216-token vocabulary.
ATTENTION_GAIN = 30  # See `real_width_model`.


# The tests that use these are marked xdist_group("real_width"): one worker builds the model once
# (`--dist loadgroup`; two workers each built one, and each ran the float model's generation).


@pytest.fixture(scope="session")
def real_width_checkpoint(tmp_path_factory):
  """The directory of a real-width random PaliGemma 2 as transformers saves it (2.8 GB): the
  parity test and `real_width_model` share it. transformers loads it back in under a second
  (from_pretrained maps the file), so the model is not kept in memory for the session."""
  import hf_fixtures
  return hf_fixtures.make_hf_paligemma(str(tmp_path_factory.mktemp("hf") / "ckpt"), version=2,
                                       real_widths=True).path


@pytest.fixture(scope="session")
def real_width_model(real_width_checkpoint):
  """(params, config) of a real-width random PaliGemma 2, its post-attention norm scaled by
  ATTENTION_GAIN: the model the int8 KV cache and quantized weights are judged on. As built, the
  random model's residual is dominated by the tied embedding: it repeats its last input token with
  log-prob -0.03 whatever it attends to, so no precision could show. Scaled, the attention brings
  them to -0.2..-0.6 (greedy tokens still clear: top-2 margins over 2). The teacher-forced error
  of an int8 cache, measured at other gains: 2e-5 (x1), 0.010 (x30), 0.03-0.06 (x40-x70), 0.11
  (x100, where attention alone decides among near-ties of a random model's flat distributions)."""
  import numpy as np
  from paligemma_jax.checkpoints import hf
  params, config, _ = hf.load_hf(real_width_checkpoint)
  layers = dict(params["llm"]["layers"])
  scale = np.asarray(layers["post_attention_norm"]["scale"])
  layers["post_attention_norm"] = {"scale": (1 + scale) * ATTENTION_GAIN - 1}  # RMSNorm's 1 + w.
  return {**params, "llm": {**params["llm"], "layers": layers}}, config


REAL_WIDTH_NEW_TOKENS = 16


@pytest.fixture(scope="session")
def real_width_greedy(real_width_model):
  """greedy(params=None, config=None, cache_dtype=None) -> the greedy Generation of
  `real_width_model` (or of `params`, `config`: its quantized weights) for prompts of 3, 11 and 20
  text tokens, REAL_WIDTH_NEW_TOKENS new tokens each (any id below the image token; no <eos>).
  The float model's run with the float cache, the reference of both the int8 cache
  (test_kv_cache.py) and the quantized weights (test_quantize.py), is made once."""
  from paligemma_jax.decoding import autoregressive
  import hf_fixtures
  float_params, float_config = real_width_model
  tokens, images, mask = hf_fixtures.text_prompts(float_config, [3, 11, 20])
  runs = {}

  def greedy(params=None, config=None, cache_dtype=None):
    reference = params is None and cache_dtype is None
    if reference and "float" in runs:
      return runs["float"]
    generator = autoregressive.Generator(
        float_params if params is None else params, config or float_config, eos_id=-1,
        vocab_size=float_config.image_token_id, cache_dtype=cache_dtype)
    out = generator.generate(tokens, images, mask, mask, max_new_tokens=REAL_WIDTH_NEW_TOKENS)
    if reference:
      runs["float"] = out
    return out

  return greedy
