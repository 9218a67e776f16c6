r"""Generation speed, ours against transformers, on the same machine and checkpoint, in one run.

  python -m paligemma_jax.benchmark --variant=pg1-3b --vision_layers=2 --text_layers=2

Builds a random-weight transformers PaliGemma at the variant's real widths with reduced depth,
converts it with our converter, and times both on the same prompt (image + text tokens):
prefill latency, decode ms/token at each batch size, decode tokens/s, the teacher-forced scoring
of --choices answers to the prompt (evaluate --task=score), and our compile time, each
with the ratio transformers / ours (> 1 means we are faster). Decode at every batch size is also
reported against its limit, the larger of two: bytes of decoder weights read per step / measured
bandwidth (a step reads every weight once, whatever the batch), and 2 FLOPs per weight and row /
the measured matrix-product peak (with enough rows a step is arithmetic, not reads).
Beam search at each of --beam_sizes (decode ms per generated token, against transformers'
num_beams and against our greedy decode at the same batch) follows in a second table.
Medians over --repeats. Results go to docs/benchmarks.md by hand. --quantize=int8|int4 times ours
with those weights (transformers stays float32).

  python -m paligemma_jax.benchmark --e2e

instead times whole processes, the generate CLI against a transformers script (whole_process.py).

  python -m paligemma_jax.benchmark --finetune_memory --variant=pg2-3b

instead compiles the fine-tuning train step of each preset for the full-depth variant from shapes
alone (no weights allocated) and prints one JSON line per preset with XLA's memory analysis:
{"preset": ..., "temp_gib": ..., "argument_gib": ...}. Results go to docs/finetuning.md by hand.

  python -m paligemma_jax.benchmark --finetune_speed --variant=pg1-3b --vision_layers=2 \
    --text_layers=2

instead times fine-tuning train steps, ours against transformers + PEFT LoRA (and transformers for
the other presets of --finetune_presets) on one batch, float32, no remat (finetune_speed.py).
Results go to docs/finetuning.md by hand.
"""

import json

from absl import flags

from configs import paligemma as presets
from paligemma_jax import cli
from paligemma_jax import errors
from paligemma_jax.benchmarks import components
from paligemma_jax.benchmarks import finetune_memory
from paligemma_jax.benchmarks import finetune_speed
from paligemma_jax.benchmarks import whole_process


def define_flags():
  """The command-line flags; defined only when this module runs as a program."""
  flags.DEFINE_string("variant", "pg1-3b", "Preset whose widths to use (configs/paligemma.py).")
  flags.DEFINE_integer("vision_layers", 2, "SigLIP depth (real: 27).")
  flags.DEFINE_integer("text_layers", 2, "Gemma depth (real: 18/26/42/46).")
  flags.DEFINE_integer("text_tokens", 12, "Prompt tokens after the image tokens.")
  flags.DEFINE_integer("new_tokens", 32, "Tokens generated per row.")
  flags.DEFINE_list("batch_sizes", ["1", "4", "8", "16"], "Batch sizes to time decode at "
                    "(each against the bandwidth and arithmetic limits).")
  flags.DEFINE_integer("repeats", 3, "Timed repetitions (medians are reported).", lower_bound=1)
  flags.DEFINE_list("beam_sizes", ["2", "3"], "Beam sizes to time beam search at, against greedy "
                    "(at each batch size; empty: none).")
  flags.DEFINE_integer("choices", 4, "Suffixes scored per example (multiple choice).")
  flags.DEFINE_bool("skip_transformers", False, "Time ours only (e.g. on a GPU host).")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Our compute/param dtype (default: "
                    "float32; with --finetune_memory bfloat16, also the frozen weights' dtype).")
  flags.DEFINE_enum("quantize", None, ["int8", "int4"], "Time ours with int8 or int4 weights "
                    "(quantize.py).")
  flags.DEFINE_bool("finetune_memory", False, "Instead of timing generation, print the compiled "
                    "memory of each fine-tuning preset's train step for the full --variant.")
  flags.DEFINE_bool("finetune_speed", False, "Instead of timing generation, time fine-tuning train "
                    "steps, ours against transformers (+ PEFT for LoRA).")
  flags.DEFINE_list("finetune_presets", ["lora"], "--finetune_speed: presets of "
                    "configs/finetune.py to time (lora, qlora, attn, llm, all).")
  flags.DEFINE_integer("finetune_batch_size", 2, "--finetune_speed: rows per step.", lower_bound=1,
                       upper_bound=cli.MAX_BATCH_SIZE)
  flags.DEFINE_integer("finetune_text_len", 32, "--finetune_speed: text tokens per row after the "
                       f"image tokens (max_text_len), {finetune_speed.PROMPT_TOKENS} of them the "
                       "prompt, the rest loss targets.",
                       lower_bound=finetune_speed.PROMPT_TOKENS + 1, upper_bound=8192)
  flags.DEFINE_string("compilation_cache", "", "Persistent XLA cache for this process (cli.py); "
                      "off by default here, since the benchmark times compiles.")
  whole_process.define_flags()


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    model_config = presets.get_config(f.variant)
  except ValueError as e:
    raise errors.InputError(f"--variant: {e}") from e
  if f.e2e:
    return whole_process.main(f)
  if f.finetune_memory:
    for record in finetune_memory.per_preset(model_config, f.dtype or "bfloat16"):
      print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}))
    return
  if f.finetune_speed:
    return finetune_speed.run(f)
  components.run(f)


if __name__ == "__main__":
  cli.run(main, define_flags)
