"""Products with a weight stored [out, in] (gemma.dot_out_in: the tied head, the CPU decoding
layout's MLP): the same values in each of its two forms, the weight-first form chosen exactly for
1..WEIGHT_FIRST_MAX_ROWS rows on CPU; and the decoding layout that stores the MLP that way."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.paligemma import get_config
from paligemma_jax.model import gemma
from paligemma_jax.model import paligemma

LIMIT = gemma.WEIGHT_FIRST_MAX_ROWS


@pytest.mark.parametrize("shape", [(1, 1), (2, 1), (8,), (3, 5), (1, LIMIT), (LIMIT + 1,)])
def test_dot_out_in_gives_x_times_w_transposed(shape):
  rng = np.random.RandomState(0)
  w = rng.normal(size=(300, 64)).astype(np.float32)
  x = rng.normal(size=(*shape, 64)).astype(np.float32)
  product = jax.jit(gemma.dot_out_in)
  got = product(x, w)
  assert got.shape == (*shape, 300) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, x.astype(np.float64) @ w.T.astype(np.float64),
                             rtol=1e-5, atol=1e-4)
  weight_first = "optimization_barrier" in product.lower(x, w).as_text()
  assert weight_first == (jax.default_backend() == "cpu" and np.prod(shape) <= LIMIT)


def test_dot_out_in_is_differentiable():
  """Training losses read a few positions' logits through the same head."""
  rng = np.random.RandomState(1)
  w = jnp.asarray(rng.normal(size=(50, 16)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.float32)
  loss = lambda x, w: jnp.sum(jnp.sin(gemma.dot_out_in(x, w)))
  want = jax.grad(lambda x, w: jnp.sum(jnp.sin(x @ w.T)), argnums=(0, 1))(x, w)
  for got, expected in zip(jax.grad(loss, argnums=(0, 1))(x, w), want):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", [None, "int8"])
def test_decoding_layout_is_the_unscanned_model_s_tree_with_float_mlp_kernels_transposed(qtype):
  config = get_config("tiny-pg2")
  params = paligemma.init_params(config, jax.random.PRNGKey(0))
  if qtype:
    params, config = paligemma.quantize_params(params, config, qtype)
  apart = config.copy_and_resolve_references()
  apart.scan_layers = False
  layout = paligemma.decoding_layout(params)
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert shapes(layout) == shapes(paligemma.param_shapes(apart))  # What the module reads.
  stacked, first = params["llm"]["layers"], layout["llm"]["layers_1"]
  for name in ("gate", "up", "down"):
    kernel = stacked["mlp"][name]["kernel"][1]
    if qtype:  # Quantized kernels keep [in, out] and their scales.
      assert set(first["mlp"][name]) == {"kernel", "kernel_scale"}
      np.testing.assert_array_equal(first["mlp"][name]["kernel"], kernel)
    else:
      np.testing.assert_array_equal(first["mlp"][name]["kernel_out_in"], kernel.T)
  np.testing.assert_array_equal(first["attn"]["q"]["kernel"], stacked["attn"]["q"]["kernel"][1])
  # Host arrays (a mapped checkpoint): views, transposed too.
  host = paligemma.decoding_layout(jax.tree.map(np.asarray, params))
  assert shapes(host) == shapes(layout)
