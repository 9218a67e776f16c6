r"""Fine-tuning config for `python -m paligemma_jax.finetune`.

`--config=configs/finetune.py:PRESET`, PRESET naming what trains (default `attn`):

  attn  the language model's attention kernels (llm/layers/attn/{q,k,v,o}), SGD; the official
        recipe for small accelerators
  llm   the whole language model (embedding table included), AdamW
  all   every parameter, the image encoder too, AdamW
  lora  low-rank adapters on the language model's attention and MLP kernels, base frozen, AdamW
  qlora lora over an int4 base (QLoRA: the frozen weights quantized as they load, a quarter of
        bfloat16's memory; --config.quantize=int8 for int8)

Any field can be overridden on the command line, e.g. `--config.lr=3e-4 --config.lora.rank=8`.
"""

import ml_collections

PRESETS = {
    "attn": dict(optimizer="sgd", lr=0.03),
    "llm": dict(optimizer="adamw", lr=1e-5),
    "all": dict(optimizer="adamw", lr=1e-5),
    "lora": dict(optimizer="adamw", lr=3e-4),
    "qlora": dict(optimizer="adamw", lr=3e-4),
}


def get_config(preset: str = "attn") -> ml_collections.ConfigDict:
  preset = preset or "attn"
  if preset not in PRESETS:
    raise ValueError(f"Unknown fine-tuning preset {preset!r}; choose one of {sorted(PRESETS)}.")
  c = ml_collections.ConfigDict()
  c.seed = 0  # Shuffling, LoRA initialisation and the per-step PRNG key.

  # What trains: all | llm | attn | lora, or a regex fully matching '/'-joined parameter paths
  # (e.g. "llm/layers/attn/.*|projector/.*"). Trainable parameters are kept in float32.
  c.trainable = "lora" if preset == "qlora" else preset
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 16
  c.lora.alpha = 16.0  # Updates are scaled by alpha / rank.
  c.lora.targets = r"llm/layers/(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel"  # Regex over paths.
  # The frozen base's weights with LoRA: "" = as stored (float, or a quantized checkpoint's), or
  # "int8" | "int4" (QLoRA: quantized as they load; model/quantize.py). Only adapters train over
  # a quantized base. The export is the float model (dequantized base + adapters) unless
  # `export_quantize` names a type to quantize it to (converted checkpoints only).
  c.quantize = "int4" if preset == "qlora" else ""
  c.export_quantize = ""

  # Optimisation. One step = one optimizer update on `batch_size` examples, computed as
  # `accum_steps` micro-batches of batch_size / accum_steps (gradients summed, then averaged
  # over the batch's target tokens, so accumulation does not change the update).
  c.total_steps = 1000
  c.batch_size = 8
  c.accum_steps = 1
  c.optimizer = PRESETS[preset]["optimizer"]  # adamw | sgd
  c.lr = PRESETS[preset]["lr"]  # Peak learning rate.
  c.b1, c.b2, c.eps = 0.9, 0.999, 1e-8  # AdamW.
  c.weight_decay = 0.0  # AdamW, decoupled (scaled by the learning rate); kernels and embeddings only.
  c.momentum = 0.0  # SGD; 0 = plain SGD.
  c.schedule = "cosine"  # cosine | linear | constant, after a linear warmup from 0.
  c.warmup_percent = 0.1  # Of total_steps.
  c.end_lr_factor = 0.0  # Final learning rate as a fraction of `lr` (cosine, linear).
  c.grad_clip = 1.0  # Global-norm clipping; 0 disables.

  # Data: JSONL lines {"image": path, "prefix": str, "suffix": str}; relative image paths are
  # resolved against `image_root`, by default the JSONL file's directory.
  # Text tokens after the image tokens (<bos> prefix \n suffix <eos>); longer examples are cut.
  c.max_text_len = 128
  c.image_root = ""
  c.num_threads = 8  # Image decoding threads.

  # Numerics: "" = float32 on CPU, bfloat16 elsewhere. `param_dtype` is for the frozen
  # parameters and the export; trainable ones are always float32.
  c.dtype = ""
  c.param_dtype = ""
  c.remat = True  # Recompute layer activations in the backward pass to save memory.

  # Bookkeeping.
  c.log_every = 10
  c.checkpoint_every = 100  # Also at the end (and when --max_steps_this_run stops early).
  c.keep_checkpoints = 2
  c.eval_every = 0  # 0 = only at the end (when --eval_jsonl is given).
  c.eval_batch_size = 8
  c.eval_max_new_tokens = 64
  c.eval_num_generate = 256  # Held-out examples scored by greedy exact match (loss uses all; 0:
  # none, and no merged float model for generation: QLoRA on a small accelerator).
  return c
