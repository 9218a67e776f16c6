"""The training computation: what trains, the loss, the optimizer and one pure train step.

The parameters are split into two trees: `trainable` (float32; gradients and optimizer state
exist only for it) and `frozen` (any dtype, e.g. bfloat16). With LoRA, `trainable` holds the
adapters and `frozen` the whole base model. `Parametrization.apply` runs the model on the two
(LoRA without merged kernels); `Parametrization.full` rebuilds the model's tree (export).

A train state is a plain dict, so Orbax saves and restores it as it is:
  params     the trainable tree
  opt_state  the optax state for it
  step       completed optimizer steps (int32)
  rng        PRNG key, split once per step (passed to the model as the `dropout` stream)
"""

import dataclasses
import re

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import optax

from paligemma_jax import errors
from paligemma_jax.model import paligemma
from paligemma_jax.training import lora

PRESETS = {
    "all": r".*",
    "llm": r"llm/.*",
    "attn": r"llm/layers/attn/.*",  # q, k, v and o kernels of every language-model layer.
    "lora": None,  # Only the adapters train.
}


def trainable_regex(spec: str) -> str | None:
  """A preset name or a regex over '/'-joined paths -> the regex (None: nothing of the base)."""
  return PRESETS[spec] if spec in PRESETS else spec


def split(params, regex: str | None):
  """(trainable, frozen): the leaves whose path fully matches `regex`, and the rest."""
  flat = traverse_util.flatten_dict(params, sep="/")
  chosen = {p for p in flat if regex is not None and re.fullmatch(regex, p)}
  pick = lambda keep: traverse_util.unflatten_dict(
      {p: x for p, x in flat.items() if (p in chosen) == keep}, sep="/")
  return pick(True), pick(False)


def combine(*trees):
  """The union of disjoint parameter trees."""
  flat = {}
  for tree in trees:
    flat.update(traverse_util.flatten_dict(tree, sep="/"))
  return traverse_util.unflatten_dict(flat, sep="/")


@dataclasses.dataclass(frozen=True)
class Parametrization:
  """How (trainable, frozen) make the model's parameter tree."""
  use_lora: bool = False
  lora_alpha: float = 1.0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict):
    """The parametrization a fine-tuning config asks for (shape-only callers need no weights)."""
    if trainable_regex(config.trainable) is None:
      return cls(True, config.lora.alpha)
    return cls()

  def full(self, trainable, frozen, dtype=None):
    """The model's tree; `dtype` casts the result (export), else trainable leaves stay float32."""
    if self.use_lora:
      params = lora.merge(frozen, trainable, alpha=self.lora_alpha, dtype=dtype)
    else:
      params = combine(trainable, frozen)
    return params if dtype is None else jax.tree.map(lambda x: x.astype(dtype), params)

  def apply(self, model, trainable, frozen, *args, **kwargs):
    """`model.apply` on the parameters; LoRA acts on activations, so no merged kernel exists."""
    if self.use_lora:
      return lora.apply(model, frozen, trainable, *args, alpha=self.lora_alpha, **kwargs)
    return model.apply({"params": combine(trainable, frozen)}, *args, **kwargs)


def init_trainable(config: ml_collections.ConfigDict, params, rng, frozen_dtype):
  """(Parametrization, trainable float32 tree, frozen tree's float leaves cast to `frozen_dtype`)."""
  parametrization = Parametrization.from_config(config)
  trainable, frozen = split(params, trainable_regex(config.trainable))
  # Float leaves only: a quantized base keeps its int8 / int4 values (their scales are cast).
  frozen = jax.tree.map(
      lambda x: x.astype(frozen_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)
  if parametrization.use_lora:  # Adapters on the frozen base.
    adapters = lora.init(frozen, rng, rank=config.lora.rank, targets=config.lora.targets)
    return parametrization, adapters, frozen
  if not jax.tree.leaves(trainable):
    raise errors.InputError(f"--config.trainable={config.trainable!r} matches no parameter.")
  return parametrization, jax.tree.map(lambda x: x.astype(jnp.float32), trainable), frozen


OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(config: ml_collections.ConfigDict):
  """Linear warmup from 0 to `lr`, then cosine | linear decay to lr * end_lr_factor, or constant."""
  total, peak = config.total_steps, config.lr
  warmup = int(round(config.warmup_percent * total))
  end = peak * config.end_lr_factor
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total, warmup + 1), end)
  decay = {"linear": optax.linear_schedule(peak, end, max(total - warmup, 1)),
           "constant": optax.constant_schedule(peak)}
  if config.schedule not in decay:
    raise errors.InputError(f"--config.schedule={config.schedule!r}: choose one of {SCHEDULES}.")
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay[config.schedule]],
                              [warmup])


def _decay_mask(params):
  """Weight decay on matrices only: kernels, embeddings and LoRA factors, not norms or biases."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {p: p[-1] in ("kernel", "input_embedding", "a", "b") for p in flat})


def make_optimizer(config: ml_collections.ConfigDict):
  """(optax transformation, schedule): optional global-norm clipping, then AdamW or SGD."""
  schedule = make_schedule(config)
  if config.optimizer == "adamw":
    opt = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                      weight_decay=config.weight_decay, mask=_decay_mask)
  elif config.optimizer == "sgd":
    opt = optax.sgd(schedule, momentum=config.momentum or None)
  else:
    raise errors.InputError(f"--config.optimizer={config.optimizer!r}: choose one of {OPTIMIZERS}.")
  if config.grad_clip:
    opt = optax.chain(optax.clip_by_global_norm(config.grad_clip), opt)
  return opt, schedule


def init_state(trainable, tx, rng):
  return dict(params=trainable, opt_state=tx.init(trainable), step=jnp.zeros((), jnp.int32), rng=rng)


def token_loss(logits, tokens, loss_mask, weight=None):
  """(summed cross-entropy, number of target tokens); position t predicts token t + 1."""
  return _summed_cross_entropy(logits[:, :-1], tokens[:, 1:], loss_mask[:, 1:], weight)


def _summed_cross_entropy(logits, targets, mask, weight=None):
  """(summed cross-entropy of `logits` [B, W, V] against `targets` [B, W] where `mask`, number
  of those targets); `weight` [B] bool leaves rows out."""
  if weight is not None:
    mask = mask & weight[:, None]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(ce * mask), jnp.sum(mask).astype(jnp.float32)


def loss_positions(loss_mask, window: int):
  """[B, W] positions whose logits a row's loss reads, W = min(window, T - 1): the one before
  the row's first target (position t predicts token t + 1) and those after it, kept inside the
  row. They hold every target of a row whose targets lie within `window` consecutive positions,
  as in training rows: [K * N image tokens][max_text_len text tokens], window = max_text_len
  (rows with fewer images than K hold their text earlier, hence a start per row)."""
  t = loss_mask.shape[1]
  window = min(window, t - 1)
  first = jnp.argmax(loss_mask[:, 1:], axis=1)  # 0 for a row without targets.
  start = jnp.minimum(first, t - 1 - window)
  return start[:, None] + jnp.arange(window)


def batch_loss(trainable, frozen, batch, rng, *, model, parametrization: Parametrization,
               max_text_len: int | None = None):
  """(summed loss, target tokens) of one batch.

  max_text_len: the layout's (data.Layout), so that the LM head runs over that many positions
  per row (`loss_positions`) instead of all K * N + max_text_len of them; the same loss. None:
  logits at every position (any model with PaliGemma's call signature).
  """
  images, image_index = paligemma.images_per_row(batch["images"])
  tokens, loss_mask = batch["tokens"], batch["loss_mask"]
  at = None if max_text_len is None else loss_positions(loss_mask, max_text_len)
  logits = parametrization.apply(model, trainable, frozen, tokens, images, batch["input_mask"],
                                 batch["prefix_mask"], image_index, rngs={"dropout": rng},
                                 **({} if at is None else {"logits_at": at}))
  if at is None:
    return token_loss(logits, tokens, loss_mask, batch.get("weight"))
  targets = lambda x: jnp.take_along_axis(x, at + 1, axis=1)
  return _summed_cross_entropy(logits, targets(tokens), targets(loss_mask), batch.get("weight"))


def train_step(state, frozen, batch, *, model, parametrization: Parametrization, tx, schedule,
               accum_steps: int = 1, max_text_len: int | None = None):
  """One optimizer update on `batch`, computed in `accum_steps` micro-batches -> (state, metrics).

  The loss is the mean over the batch's target tokens whatever the accumulation: micro-batch
  gradients of the summed loss are added up and divided by the total token count once.
  max_text_len: the layout's, as `batch_loss` takes it.
  """
  rng, step_rng = jax.random.split(state["rng"])
  grad_fn = jax.value_and_grad(
      lambda p, b, r: batch_loss(p, frozen, b, r, model=model, parametrization=parametrization,
                                 max_text_len=max_text_len),
      has_aux=True)

  if accum_steps == 1:
    (loss_sum, count), grads = grad_fn(state["params"], batch, step_rng)
  else:
    micro = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)

    def accumulate(carry, inputs):
      b, i = inputs
      (l, n), g = grad_fn(state["params"], b, jax.random.fold_in(step_rng, i))
      return jax.tree.map(jnp.add, carry, (l, n, g)), None

    zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state["params"]))
    (loss_sum, count, grads), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(accum_steps)))

  count = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / count, grads)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = dict(loss=loss_sum / count, lr=schedule(state["step"]), grad_norm=optax.tree.norm(grads),
                 tokens=count)
  return dict(params=params, opt_state=opt_state, step=state["step"] + 1, rng=rng), metrics


def eval_step(trainable, frozen, batch, *, model, parametrization: Parametrization,
              max_text_len: int | None = None):
  """(summed loss, target tokens) over the rows with weight 1."""
  return batch_loss(trainable, frozen, batch, jax.random.PRNGKey(0), model=model,
                    parametrization=parametrization, max_text_len=max_text_len)
