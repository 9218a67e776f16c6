"""LoRA: adapter shapes, W + (alpha / r) A @ B on multi-axis kernels, zero start, gradients, export,
and adapters applied to activations in the loss (same loss and gradients, no merged kernel)."""

import functools

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.paligemma import get_config
from paligemma_jax import errors
from paligemma_jax.model import paligemma
from paligemma_jax.training import lora
from paligemma_jax.training import objective


@pytest.fixture(scope="module")
def base():
  """Random float32 parameters with the tiny PaliGemma 2 layout (3 layers, 4 heads x 16, 2 kv heads)."""
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                      paligemma.param_shapes(get_config("tiny-pg2")))


def _merge(base, adapters, alpha, dtype=None):
  return jax.jit(functools.partial(lora.merge, alpha=alpha, dtype=dtype))(base, adapters)


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def _with_random_b(adapters, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: rng.normal(size=x.shape).astype(np.float32) if p[-1].key == "b" else x, adapters)


def test_default_targets_and_shapes(base):
  adapters = _flat(lora.init(base, jax.random.PRNGKey(0), rank=4))
  names = ["attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down"]
  assert sorted(adapters) == sorted(f"llm/layers/{n}/kernel/{ab}" for n in names for ab in "ab")
  shapes = {p: x.shape for p, x in adapters.items()}
  assert shapes["llm/layers/attn/q/kernel/a"] == (3, 64, 4)  # [L, D, r]
  assert shapes["llm/layers/attn/q/kernel/b"] == (3, 4, 4 * 16)  # [L, r, heads * head_dim]
  assert shapes["llm/layers/attn/k/kernel/b"] == (3, 4, 2 * 16)
  assert shapes["llm/layers/attn/o/kernel/a"] == (3, 4 * 16, 4)  # [L, heads * head_dim, r]
  assert shapes["llm/layers/attn/o/kernel/b"] == (3, 4, 64)
  assert shapes["llm/layers/mlp/down/kernel/a"] == (3, 128, 4)
  assert all(x.dtype == jnp.float32 for x in adapters.values())
  assert all(not np.any(x) for p, x in adapters.items() if p.endswith("/b"))  # B starts at zero.
  assert lora.num_params(lora.init(base, jax.random.PRNGKey(0), rank=4)) == sum(
      int(np.prod(s)) for s in shapes.values())


def test_zero_b_merges_to_the_base_exactly(base):
  adapters = lora.init(base, jax.random.PRNGKey(0), rank=4, targets=r"llm/layers/attn/.*/kernel")
  merged = _merge(base, adapters, 8.0)
  jax.tree.map(np.testing.assert_array_equal, merged, base)


def test_multi_axis_kernels_act_as_matrices(base):
  """x @ W_eff == x @ W + (alpha / r) (x @ A) @ B with kernels flattened to [in, out] per layer."""
  alpha, rank = 6.0, 3
  adapters = _with_random_b(lora.init(base, jax.random.PRNGKey(0), rank=rank))
  merged, flat_adapters = _flat(_merge(base, adapters, alpha)), _flat(adapters)
  flat_base = _flat(base)
  merged, flat_adapters, flat_base = (jax.tree.map(np.asarray, t)
                                      for t in (merged, flat_adapters, flat_base))
  x = np.random.default_rng(2).normal(size=(5, 64)).astype(np.float32)
  xo = np.random.default_rng(3).normal(size=(5, 4, 16)).astype(np.float32)  # Attention heads.
  for layer in range(3):
    a, b = (flat_adapters[f"llm/layers/attn/q/kernel/{k}"][layer] for k in "ab")
    got = np.einsum("td,dnh->tnh", x, merged["llm/layers/attn/q/kernel"][layer])
    want = (np.einsum("td,dnh->tnh", x, flat_base["llm/layers/attn/q/kernel"][layer])
            + (alpha / rank) * (x @ a @ b).reshape(5, 4, 16))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    a, b = (flat_adapters[f"llm/layers/attn/o/kernel/{k}"][layer] for k in "ab")
    got = np.einsum("tnh,nhd->td", xo, merged["llm/layers/attn/o/kernel"][layer])
    want = (np.einsum("tnh,nhd->td", xo, flat_base["llm/layers/attn/o/kernel"][layer])
            + (alpha / rank) * xo.reshape(5, 64) @ a @ b)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  untouched = [p for p in flat_base if p not in {k.rsplit("/", 1)[0] for k in flat_adapters}]
  assert "llm/embedder/input_embedding" in untouched
  for p in untouched:
    np.testing.assert_array_equal(merged[p], flat_base[p])


def test_unscanned_kernel_and_axis_rules():
  assert lora.matrix_axes("llm/layers/attn/q/kernel", 4) == (1, 1, 2)
  assert lora.matrix_axes("llm/layers/attn/o/kernel", 4) == (1, 2, 1)
  assert lora.matrix_axes("llm/layers/mlp/up/kernel", 3) == (1, 1, 1)
  assert lora.matrix_axes("projector/kernel", 2) == (0, 1, 1)
  assert lora.matrix_axes("img/embedding/kernel", 4) == (0, 3, 1)  # Conv: [kh, kw, in, out].
  with pytest.raises(ValueError, match="matrix"):
    lora.matrix_axes("llm/layers/attn/q/kernel", 3)


def test_bad_settings_raise(base):
  with pytest.raises(ValueError, match="match no parameter"):
    lora.init(base, jax.random.PRNGKey(0), rank=4, targets="llm/nothing/.*")
  with pytest.raises(ValueError, match="rank"):
    lora.init(base, jax.random.PRNGKey(0), rank=0)


def test_gradients_reach_the_adapters_and_bf16_base_is_not_rounded(base):
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
  adapters = lora.init(bf16, jax.random.PRNGKey(0), rank=2, targets="projector/kernel")

  def loss(ad):
    kernel = lora.merge(bf16, ad, alpha=2.0)["projector"]["kernel"]
    return jnp.sum(jnp.tanh(jnp.ones((1, 32)) @ kernel))

  grads = _flat(jax.grad(loss)(adapters))
  assert np.any(grads["projector/kernel/b"])
  assert not np.any(grads["projector/kernel/a"])  # B = 0: A gets no gradient on the first step.

  tiny = jax.tree.map(lambda b: jnp.full_like(b, 1e-3), adapters)
  merged = _merge(bf16, tiny, 2.0)
  assert merged["projector"]["kernel"].dtype == jnp.float32  # 1e-6 updates survive in the loss.
  base_kernel = bf16["projector"]["kernel"].astype(jnp.float32)
  assert not np.array_equal(merged["projector"]["kernel"], base_kernel)
  assert merged["llm"]["embedder"]["input_embedding"].dtype == jnp.bfloat16  # Untouched leaves as is.
  exported = _merge(bf16, tiny, 2.0, jnp.bfloat16)
  assert exported["projector"]["kernel"].dtype == jnp.bfloat16


# Every kind of layer LoRA can adapt: scanned DenseGeneral (q, k, v: two output axes; o: two input
# axes) and Dense in both towers, the unscanned projector, the patch Conv, and a table (merged).
_EVERY_KIND = (r"llm/layers/.*/kernel|img/layers/(attn/q|mlp/fc1)/kernel|projector/kernel"
               r"|img/embedding/kernel|llm/embedder/input_embedding")


def _batch(config, rng):
  tokens, _, input_mask, prefix_mask = paligemma.dummy_inputs(config, batch=2)
  tokens = jnp.concatenate([tokens, jnp.asarray(rng.integers(3, 1000, (2, 6)), jnp.int32)], 1)
  ones = jnp.ones(tokens.shape, bool)
  s = config.vision.image_size
  return dict(tokens=tokens, images=jnp.asarray(rng.uniform(-1, 1, (2, s, s, 3)), jnp.float32),
              input_mask=ones, prefix_mask=ones.at[:, -6:].set(False),
              loss_mask=~ones.at[:, -6:].set(False))


def test_adapters_on_activations_match_merged_weights():
  """The loss and its gradients w.r.t. A and B equal those of the model on W + (alpha / r) A B.

  To float32 rounding, which the layers amplify: the gradients differ by under 1e-4 of their
  largest entry (a wrong scale or a skipped adapter is off by order 1).
  """
  config = get_config("tiny-pg2")
  config.remat = True  # As fine-tuning runs it: remat inside nn.scan.
  model = paligemma.PaliGemma(config)
  # Jitted: op by op, init's forward pass dispatches (and compiles) every operation on its own.
  base = jax.jit(lambda rng: paligemma.init_params(config, rng))(jax.random.PRNGKey(1))
  adapters = _with_random_b(lora.init(base, jax.random.PRNGKey(0), rank=3, targets=_EVERY_KIND))
  batch = _batch(config, np.random.default_rng(4))
  parametrization = objective.Parametrization(use_lora=True, lora_alpha=6.0)

  def merged_loss(ad):
    logits = model.apply({"params": lora.merge(base, ad, alpha=6.0)}, batch["tokens"],
                         batch["images"], batch["input_mask"], batch["prefix_mask"])
    return objective.token_loss(logits, batch["tokens"], batch["loss_mask"])[0]

  def activation_loss(ad):
    return objective.batch_loss(ad, base, batch, jax.random.PRNGKey(0), model=model,
                               parametrization=parametrization)[0]

  want, want_grads = jax.jit(jax.value_and_grad(merged_loss))(adapters)
  got, got_grads = jax.jit(jax.value_and_grad(activation_loss))(adapters)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  want_grads, got_grads = _flat(want_grads), _flat(got_grads)
  assert sorted(got_grads) == sorted(want_grads)
  for path, want_grad in want_grads.items():
    assert np.any(want_grad), path  # Every adapter, the Conv's too, is reached by the images.
    scale = np.max(np.abs(want_grad))
    np.testing.assert_allclose(got_grads[path] / scale, want_grad / scale, atol=2e-4, err_msg=path)


def test_no_merged_kernel_inside_the_loss(base):
  """The loss's program holds no float32 array the size of an adapted kernel (the old merge)."""
  config = get_config("tiny-pg2")
  config.remat = True  # Else the scan keeps each layer's float32-cast kernel for the backward pass.
  model = paligemma.PaliGemma(config)
  bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), base)
  adapters = lora.init(bf16, jax.random.PRNGKey(0), rank=2, targets=r"llm/layers/mlp/up/kernel")
  batch = _batch(config, np.random.default_rng(5))
  parametrization = objective.Parametrization(use_lora=True, lora_alpha=2.0)
  grad = jax.grad(lambda ad: objective.batch_loss(ad, bf16, batch, jax.random.PRNGKey(0),
                                                 model=model, parametrization=parametrization)[0])
  program = str(jax.make_jaxpr(grad)(adapters))
  assert "f32[3,64,128]" not in program  # [L, D, F]: the up kernel merged in float32.
  assert "bf16[3,64,128]" in program  # The frozen kernel itself.


def test_adapter_on_a_layer_that_is_not_dense_is_refused():
  class Table(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x @ self.param("kernel", nn.initializers.ones, (4, 4))

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Table(name="table")(x)

  params = Model().init(jax.random.PRNGKey(0), jnp.ones((1, 4)))["params"]
  adapters = lora.init(params, jax.random.PRNGKey(0), rank=2, targets="table/kernel")
  with pytest.raises(errors.InputError, match="lora.targets: table/kernel belongs to a Table"):
    lora.apply(Model(), params, adapters, jnp.ones((1, 4)), alpha=1.0)
