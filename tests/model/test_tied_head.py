"""The tied LM head (gemma.tied_head): the same logits in each of its two forms, and the
table-first form chosen exactly for 2..HEAD_TABLE_FIRST_MAX_ROWS rows on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paligemma_jax.model import gemma

LIMIT = gemma.HEAD_TABLE_FIRST_MAX_ROWS


@pytest.mark.parametrize("shape", [(1, 1), (2, 1), (8,), (3, 5), (1, LIMIT), (LIMIT + 1,)])
def test_tied_head_gives_hidden_times_table_transposed(shape):
  rng = np.random.RandomState(0)
  table = rng.normal(size=(300, 64)).astype(np.float32)
  hidden = rng.normal(size=(*shape, 64)).astype(np.float32)
  head = jax.jit(gemma.tied_head)
  got = head(hidden, table)
  assert got.shape == (*shape, 300) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, hidden.astype(np.float64) @ table.T.astype(np.float64),
                             rtol=1e-5, atol=1e-4)
  table_first = "optimization_barrier" in head.lower(hidden, table).as_text()
  assert table_first == (jax.default_backend() == "cpu" and 1 < np.prod(shape) <= LIMIT)
  if table_first:  # Each row as the other form gives it (one row: the matrix-vector product).
    row = head(hidden.reshape(-1, 64)[:1], table)[0]
    np.testing.assert_allclose(got.reshape(-1, 300)[0], row, rtol=1e-5, atol=1e-4)


def test_tied_head_is_differentiable():
  """Training losses read a few positions' logits through the same head."""
  rng = np.random.RandomState(1)
  table = jnp.asarray(rng.normal(size=(50, 16)), jnp.float32)
  hidden = jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.float32)
  loss = lambda h, t: jnp.sum(jnp.sin(gemma.tied_head(h, t)))
  want = jax.grad(lambda h, t: jnp.sum(jnp.sin(h @ t.T)), argnums=(0, 1))(hidden, table)
  for got, expected in zip(jax.grad(loss, argnums=(0, 1))(hidden, table), want):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
