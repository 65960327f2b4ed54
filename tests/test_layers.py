"""The transformer's linear map (``tfm.Projection``): nn.Dense's function, every dim named, and
products whose weight gradients contract a single axis (the form XLA:CPU runs on its GEMM
library)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from farmer_jax.nn import transformer as tfm


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 4, 5), (2, 1, 5), (0, 4, 5)])
def test_projection_is_dense(shape):
  """Params (the same key: bitwise), outputs and gradients equal nn.Dense's with xavier-uniform
  init, for a single token, a batch of vectors, tokens, one token (decoding) and no tokens."""
  x = jax.random.normal(jax.random.key(1), shape)
  proj = tfm.Projection((7,), ("embed", "mlp"))
  dense = nn.Dense(7, kernel_init=nn.initializers.xavier_uniform())
  p = nn.unbox(proj.init(jax.random.key(0), x))
  assert jax.tree.all(jax.tree.map(np.array_equal, p, dense.init(jax.random.key(0), x)))
  p = jax.tree.map(lambda a: a + 0.1, p)                     # a non-zero bias too
  np.testing.assert_allclose(proj.apply(p, x), dense.apply(p, x), rtol=1e-6, atol=1e-6)
  loss = lambda m: jax.jit(jax.grad(lambda q, v: jnp.sum(jnp.sin(m.apply(q, v))), (0, 1)))
  for a, b in zip(jax.tree.leaves(loss(proj)(p, x)), jax.tree.leaves(loss(dense)(p, x))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_projection_contracts_named_dims():
  """n_in=2 (the attention's output projection) is the einsum over both dims; ``zero`` starts
  at zero; every kernel and bias dim carries its logical name."""
  x = jax.random.normal(jax.random.key(1), (2, 3, 4, 5))
  proj = tfm.Projection((6,), ("heads", "kv", "embed"), 2)
  boxed = proj.init(jax.random.key(0), x)
  spec = nn.get_partition_spec(boxed)["params"]
  assert tuple(spec["kernel"]) == ("heads", "kv", "embed") and tuple(spec["bias"]) == ("embed",)
  p = nn.unbox(boxed)
  want = jnp.einsum("bthd,hdc->btc", x, p["params"]["kernel"]) + p["params"]["bias"]
  np.testing.assert_allclose(proj.apply(p, x), want, rtol=1e-5, atol=1e-6)
  zero = nn.unbox(tfm.Projection((6,), ("heads", "kv", "embed"), 2, zero=True).init(
      jax.random.key(0), x))
  assert not np.any(zero["params"]["kernel"])


def test_projection_gradients_contract_one_axis():
  """Every product of a projection's forward and backward pass on (B, T, C) tokens contracts one
  axis: with batch and tokens both contracted (autodiff of a 3-D product), XLA:CPU runs the
  weight gradient as a generic loop instead of its GEMM library."""
  x = jnp.ones((2, 8, 5))
  proj = tfm.Projection((7,), ("embed", "mlp"))
  p = nn.unbox(proj.init(jax.random.key(0), x))
  text = jax.jit(jax.grad(lambda q, v: jnp.sum(proj.apply(q, v) ** 2), (0, 1))).lower(
      p, x).as_text()
  dims = re.findall(r"contracting_dims = \[([\d, ]*)\] x \[([\d, ]*)\]", text)
  assert len(dims) == 3, text          # forward, input gradient, weight gradient
  assert all(len(a.split(",")) == 1 and len(b.split(",")) == 1 for a, b in dims), dims
