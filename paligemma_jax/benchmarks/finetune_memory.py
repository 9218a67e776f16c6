"""How much memory fine-tuning needs, per preset, measured on the compiled train step.

`python -m paligemma_jax.benchmark --finetune_memory --variant=V` prints `per_preset`'s records;
the table for pg2-3b and pg2-10b is in docs/finetuning.md. Compiled from shapes alone: nothing
the size of the model is allocated, so the largest variants measure on a laptop.
"""

import functools

import jax
import jax.numpy as jnp

from configs import finetune as finetune_configs
from paligemma_jax.model import paligemma
from paligemma_jax.training import data
from paligemma_jax.training import objective


# (preset of configs/finetune.py, the frozen base's quantization or None for the preset's own).
PRESETS = (("lora", None), ("qlora", "int8"), ("qlora", "int4"), ("attn", None), ("llm", None),
           ("all", None))
# XLA:CPU hoists the dequantization (or bfloat16 -> float32 conversion) of a scanned stack's
# frozen weights out of the layer loop: a float copy of every layer at once, which GPU and TPU
# compilers, fusing the convert into each layer's dot, never make. Compiled without that pass,
# each layer's weights are converted inside its own iteration, as accelerators do.
PER_LAYER = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def per_preset(model_config, dtype: str = "bfloat16", presets=PRESETS):
  """Per fine-tuning preset, XLA's memory analysis of its compiled train step, in GiB.

  The step `finetune` runs (`objective.train_step` under jax.jit, state donated), with remat, batch
  1 at the text length of configs/finetune.py and the model's compute and frozen weights in
  `dtype` (a QLoRA base: int8 / int4 with scales in `dtype`), compiled from jax.ShapeDtypeStruct
  inputs: no weight is allocated. `temp_gib` is the step as XLA:CPU compiles it,
  `temp_per_layer_gib` the same step with frozen weights converted layer by layer (PER_LAYER).
  """
  float_config = model_config.copy_and_resolve_references()
  float_config.update(dtype=dtype, param_dtype=dtype, remat=True)
  rng = jax.random.PRNGKey(0)
  records = []
  for preset, qtype in presets:
    config = finetune_configs.get_config(preset)
    if qtype:
      config.quantize = qtype
    model_config = float_config.copy_and_resolve_references()
    model_config.quantize = config.quantize or None
    model = paligemma.PaliGemma(model_config)
    shapes = paligemma.param_shapes(model_config)
    layout = data.Layout(paligemma.num_image_tokens(model_config), model_config.image_token_id,
                         model_config.vision.image_size, config.max_text_len)
    parametrization = objective.Parametrization.from_config(config)
    trainable, frozen = jax.eval_shape(
        lambda p: objective.init_trainable(config, p, rng, jnp.dtype(dtype))[1:], shapes)
    tx, schedule = objective.make_optimizer(config)
    state = jax.eval_shape(lambda t: objective.init_state(t, tx, rng), trainable)
    step = jax.jit(functools.partial(objective.train_step, model=model,
                                     parametrization=parametrization, tx=tx, schedule=schedule,
                                     accum_steps=config.accum_steps,
                                     max_text_len=config.max_text_len), donate_argnums=0)
    lowered = step.lower(state, frozen, _batch_shapes(layout))
    memory = lowered.compile().memory_analysis()
    per_layer = lowered.compile(PER_LAYER).memory_analysis()
    records.append(dict(preset=preset, quantize=config.quantize or None,
                        temp_gib=memory.temp_size_in_bytes / 2**30,
                        temp_per_layer_gib=per_layer.temp_size_in_bytes / 2**30,
                        argument_gib=memory.argument_size_in_bytes / 2**30))
  return records


def _batch_shapes(layout: data.Layout, batch_size: int = 1) -> dict:
  """The shapes of a training batch (`data.TrainLoader`'s arrays)."""
  tokens = jax.ShapeDtypeStruct((batch_size, layout.length), jnp.int32)
  masks = {k: jax.ShapeDtypeStruct(tokens.shape, bool)
           for k in ("input_mask", "prefix_mask", "loss_mask")}
  images = jax.ShapeDtypeStruct((batch_size, layout.image_size, layout.image_size, 3), jnp.float32)
  return dict(tokens=tokens, images=images, **masks)
