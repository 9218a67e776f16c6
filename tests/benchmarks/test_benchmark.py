"""The benchmark: flags defined only when run, the component tables, and the fine-tuning memory
report and speed table."""

import os
import re
import subprocess
import sys
import types

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.paligemma import get_config
from paligemma_jax import benchmark  # noqa: F401  Imported beside the converter below.
from paligemma_jax import errors
from paligemma_jax.benchmarks import components
from paligemma_jax.benchmarks import finetune_memory
from paligemma_jax.benchmarks import finetune_speed
from helpers import ROOT, assert_expected_failure


def test_importing_beside_the_converter_defines_no_flags():
  import checkpoints_convert.hf_to_orbax  # noqa: F401  Both once defined --dtype at import.
  assert "text_tokens" not in flags.FLAGS and "finetune_memory" not in flags.FLAGS


def test_finetune_memory_per_preset_lora_needs_less_and_qlora_least():
  """One layer at pg2-3b's text widths (tiny vocabulary and image): LoRA's adapters need no
  float32 gradient of the attention kernels, which `attn` trains; QLoRA's int4 base is passed in
  under a third of LoRA's float32 one. Each preset compiles twice (as compiled, per layer)."""
  config = get_config("pg2-3b")
  config.vision = get_config("tiny-pg2").vision
  config.text.update(depth=1, vocab_size=1600)
  config.image_token_id = config.text.vocab_size - 64
  records = finetune_memory.per_preset(
      config, dtype="float32", presets=(("attn", None), ("lora", None), ("qlora", "int4")))
  assert [sorted(r) for r in records] == [
      ["argument_gib", "preset", "quantize", "temp_gib", "temp_per_layer_gib"]] * 3
  attn, lora, qlora = records
  assert [r["preset"] for r in records] == ["attn", "lora", "qlora"]
  assert qlora["quantize"] == "int4" and lora["quantize"] is None
  assert attn["argument_gib"] > 0 and 0 < qlora["argument_gib"] < lora["argument_gib"] / 3
  assert 0 < lora["temp_gib"] < attn["temp_gib"], records
  assert all(0 < r["temp_per_layer_gib"] <= r["temp_gib"] * 1.01 for r in records), records


def test_out_of_range_flag_values_are_one_line():
  """--e2e_rounds=0 ended in statistics.median([]) after minutes of priming runs."""
  proc = subprocess.run([sys.executable, "-m", "paligemma_jax.benchmark", "--e2e",
                         "--e2e_rounds=0"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  assert assert_expected_failure(proc) == [
      "benchmark.py: error: flag --e2e_rounds=0: 0 is not an integer in the range [1, 1000]"]


def test_component_tables_run_end_to_end(capsys):
  """Every timed path (decode, beam search, scoring, compile) called as the benchmark calls it,
  on the tiny preset: a change to a jitted function's arguments breaks this, not a user's run."""
  f = types.SimpleNamespace(variant="tiny-pg1", vision_layers=1, text_layers=1, text_tokens=4,
                            new_tokens=3, batch_sizes=["1", "2"], repeats=1, beam_sizes=["2"],
                            choices=2, skip_transformers=False, dtype=None, quantize=None)
  components.run(f)
  out = capsys.readouterr().out
  assert out.count("| decode ms/token |") == 2 and out.count("| beam 2 |") == 2
  assert out.count("| decode / limit (") == 2
  assert "| batch | ours ms/step | bandwidth limit ms | arithmetic limit ms | ours / limit |" in out
  assert "score ms" in out and "compile time" in out


def test_decode_limits_read_every_weight_once_and_multiply_it_per_row():
  llm = {"w": np.zeros((1000, 500), np.float32), "norm": np.zeros(500, np.float32),
         "q": np.zeros((10, 20, 5), np.int8)}
  bandwidth_ms, arithmetic_ms = components.decode_limits_ms(llm, 4, 1.0, 1.0)  # GB/s, GFLOP/s.
  assert bandwidth_ms == (4 * 500_000 + 4 * 500 + 1000) / 1e6
  assert arithmetic_ms == 4 * 2 * (500_000 + 1000) / 1e6  # Norms are no products.


def test_matmul_flops_counts_each_scan_iteration():
  """XLA's cost analysis counts a loop body once; the layers of a scanned model are in one."""
  def layers(x, w):
    return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, w)[0]
  x, w = np.ones((4, 8), np.float32), np.ones((3, 8, 8), np.float32)
  assert finetune_speed.matmul_flops(layers, x, w) == 3 * 2 * 4 * 8 * 8
  grad = jax.grad(lambda x, w: layers(x, w).sum(), argnums=1)
  assert finetune_speed.matmul_flops(grad, x, w) == 3 * 3 * 2 * 4 * 8 * 8  # Forward, dx, dw.


def test_finetune_speed_table_runs_end_to_end(capsys):
  """Every timed step (ours, ours with the head at every position, ours with qwix's adapters and
  transformers + PEFT for LoRA; QLoRA against PEFT; transformers for `attn`) called as the
  benchmark calls it, on the tiny preset; the steps of a float preset start from the same loss,
  QLoRA's two of ours from theirs (its int4 base moves it from PEFT's float one)."""
  f = types.SimpleNamespace(variant="tiny-pg1", vision_layers=1, text_layers=1, repeats=1,
                            dtype=None, skip_transformers=False,
                            finetune_presets=["lora", "qlora", "attn"], finetune_batch_size=2,
                            finetune_text_len=12)
  finetune_speed.run(f)
  out = capsys.readouterr().out
  assert out.count("| lora |") == 4 and out.count("| qlora |") == 3 and out.count("| attn |") == 3
  assert "| lora | ours, qwix LoraProvider adapters |" in out
  assert "| lora | transformers + PEFT |" in out and "| qlora | transformers + PEFT |" in out
  assert "| attn | transformers |" in out
  assert "nominal FMA peak" in out and "batch 2 x (16 image + 12 text tokens" in out
  text = out.split("first-step losses (the same loss): ")[1].splitlines()[0]
  losses = dict(part.split(": ", 1) for part in text.split("; "))
  for preset, steps in (("lora", 4), ("qlora", 2), ("attn", 3)):
    values = [float(v) for v in re.findall(r" (\d+\.\d+)", " " + losses[preset])][:steps]
    assert len(values) == steps and max(values) - min(values) < 1e-3, losses


def test_finetune_speed_without_peft_is_one_line_before_any_work(monkeypatch):
  monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError.
  f = types.SimpleNamespace(finetune_presets=["lora"], skip_transformers=False)
  with pytest.raises(errors.InputError, match="pip install peft"):
    finetune_speed.run(f)
