"""Autoregressive flow: patchify, exact inverse, log-det vs brute-force Jacobian, per-block
causality."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, perturb
from farmer_jax.flow.autoregressive_flow import AFBlock, AutoregressiveFlow
from farmer_jax.flow.patchify import patchify, unpatchify
from farmer_jax.model import make_flow


def test_patchify_roundtrip_and_feature_order():
  x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
  t = patchify(x, 4)
  chex.assert_shape(t, (2, 4, 48))
  # token 1 is the top-right patch; features ordered (ph, pw, c)
  np.testing.assert_array_equal(t[0, 1].reshape(4, 4, 3), x[0, :4, 4:8])
  np.testing.assert_array_equal(unpatchify(t, 4, 8, 3), x)
  with pytest.raises(ValueError, match="patch size 3"):
    patchify(x, 3)


@pytest.fixture(scope="module")
def flow_and_params():
  flow = make_flow(TINY)
  x = jnp.zeros((1, TINY.num_tokens, TINY.token_dim))
  p = nn.unbox(jax.jit(flow.init)(jax.random.key(0), x))["params"]
  p = perturb(p, jax.random.key(1), 0.05)          # non-zero output projections (a, b far from 0)
  return flow, p


@pytest.fixture(scope="module")
def inverse(flow_and_params):
  """One jitted exact inverse shared by the tests below (batch 3 everywhere, so it compiles
  once)."""
  flow, _ = flow_and_params
  return jax.jit(lambda p, z: flow.apply({"params": p}, z, method=AutoregressiveFlow.inverse))


def test_zero_init_is_identity():
  flow = make_flow(TINY)
  x = jax.random.normal(jax.random.key(3), (2, TINY.num_tokens, TINY.token_dim))
  p = nn.unbox(flow.init(jax.random.key(0), x))["params"]
  z, logdet = flow.apply({"params": p}, x)
  np.testing.assert_array_equal(z, x)
  np.testing.assert_array_equal(logdet, 0.0)


def test_inverse_exact(flow_and_params, inverse):
  flow, p = flow_and_params
  x = jax.random.normal(jax.random.key(2), (3, TINY.num_tokens, TINY.token_dim))
  z, logdet = flow.apply({"params": p}, x)
  assert float(jnp.abs(z - x).max()) > 0.05, "perturbed flow should not be near identity"
  assert float(jnp.abs(logdet).min()) > 0.1
  xr = inverse(p, z)
  assert float(jnp.abs(xr - x).max()) <= 1e-5


def test_jacobi_inverse(flow_and_params, inverse):
  """The parallel (Jacobi) inverse: capped at N - 1 iterations it equals the sequential inverse;
  with a tolerance it stops early, reports its iterations per block, and is close; one iteration
  is not enough (so the test could fail)."""
  flow, p = flow_and_params
  n = TINY.num_tokens
  jac = jax.jit(lambda p, z, cap, tol: flow.apply(
      {"params": p}, z, max_iters=cap, tol=tol, method=AutoregressiveFlow.inverse_jacobi),
                static_argnums=(2,))
  x = jax.random.normal(jax.random.key(4), (3, n, TINY.token_dim))
  z, _ = flow.apply({"params": p}, x)
  exact = inverse(p, z)
  xj, iters = jac(p, z, None, 0.0)
  assert iters.shape == (TINY.flow_blocks,) and int(iters.max()) <= n - 1
  assert float(jnp.abs(xj - exact).max()) <= 1e-5
  xt, it_tol = jac(p, z, None, 1e-4)
  assert int(it_tol.max()) < n - 1, it_tol          # converged well before the cap
  assert float(jnp.abs(xt - exact).max()) <= 1e-3
  x1, _ = jac(p, z, 1, 0.0)
  assert float(jnp.abs(x1 - exact).max()) > 1e-3


def test_flipped_block_flips_position_embedding(flow_and_params, inverse):
  """A flipped block is the unflipped block run on the reversed tokens with an explicitly reversed
  position embedding: flipped(x) == reverse(unflipped(reverse(x); pos_embed[::-1])). With the
  original pos_embed that identity fails, so this sees a forward pass that forgot to flip the
  embedding. The inverse must flip it the same way: the 2-block flow (block 1 flipped) with this
  embedding inverts exactly, and does not with it reversed."""
  flow, p = flow_and_params
  n, d = TINY.num_tokens, TINY.token_dim
  pos = np.random.default_rng(0).normal(0.0, 0.5,
                                        (n, flow.width)).astype(np.float32)  # strong, asymmetric
  assert np.abs(pos - pos[::-1]).max() > 0.5
  rev_pos = np.ascontiguousarray(pos[::-1])
  block = AFBlock(**flow.block_kwargs())
  bp = jax.tree.map(lambda a: a[1], p["blocks"])
  run = jax.jit(lambda q, v, flip: block.apply({"params": q}, (v, jnp.zeros(
      (v.shape[0],))), flip)[0])
  x = jax.random.normal(jax.random.key(6), (3, n, d))
  z_flip, ld_flip = run({**bp, "pos_embed": pos}, x, True)
  z_ref, ld_ref = run({**bp, "pos_embed": rev_pos}, x[:, ::-1], False)
  np.testing.assert_allclose(z_flip, z_ref[:, ::-1], atol=1e-5)
  np.testing.assert_allclose(ld_flip, ld_ref, rtol=1e-5)
  z_orig, _ = run({**bp, "pos_embed": pos}, x[:, ::-1], False)
  assert float(jnp.abs(z_flip -
                       z_orig[:, ::-1]).max()) > 1e-2, "the test cannot see the embedding's order"

  with_pos = lambda e: {
      "blocks": {
          **p["blocks"], "pos_embed": p["blocks"]["pos_embed"].at[1].set(e)
      }
  }
  z, _ = flow.apply({"params": with_pos(pos)}, x)
  assert float(jnp.abs(inverse(with_pos(pos), z) - x).max()) <= 1e-5
  assert float(jnp.abs(inverse(with_pos(rev_pos), z) - x).max()) > 1e-2


def test_logdet_matches_jacobian(flow_and_params):
  flow, p = flow_and_params
  shape = (1, TINY.num_tokens, TINY.token_dim)
  x = jax.random.normal(jax.random.key(4), shape)
  f = lambda v: flow.apply({"params": p}, v.reshape(shape))[0].reshape(-1)
  jac = jax.jit(jax.jacfwd(f))(x.reshape(-1))
  _, brute = jnp.linalg.slogdet(jac.astype(jnp.float64) if jax.config.jax_enable_x64 else jac)
  _, logdet = flow.apply({"params": p}, x)
  rel = abs(float(logdet[0]) - float(brute)) / abs(float(brute))
  assert rel <= 1e-4, (float(logdet[0]), float(brute))


@pytest.mark.parametrize("flip", [False, True])
def test_block_causality(flow_and_params, flip):
  """In a block's own order, the (a, b) of token i depend only on tokens < i: perturbing token j
  moves only outputs i > j (natural order for even blocks; reversed order for odd, flipped
  blocks)."""
  flow, p = flow_and_params
  block = AFBlock(**flow.block_kwargs())
  bp = jax.tree.map(lambda a: a[int(flip)], p["blocks"])
  n = TINY.num_tokens
  x = jax.random.normal(jax.random.key(5), (1, n, TINY.token_dim))
  run = lambda v: block.apply({"params": bp}, (v, jnp.zeros((1,))), jnp.asarray(flip))[0][0]
  z0 = run(x)
  for j in (0, 5, n - 1):
    z1 = run(x.at[:, j].add(1.0))
    moved = np.asarray(jnp.abs(z1 - z0).max(-1)[0] > 0)
    expect = np.zeros(n, bool)
    expect[j] = True                    # the token itself always moves (z_j = (x_j - b) e^{-a})
    if flip:
      expect[:j] = True  # flipped order: later-processed tokens are the ones before j
    else:
      expect[j + 1:] = True
    np.testing.assert_array_equal(moved, expect)


@pytest.mark.slow  # moved out of the default suite to keep it <= 10 min on 2 cores
def test_class_conditional_af_uses_mean_for_unlabelled():
  flow = AutoregressiveFlow(num_tokens=4, token_dim=2, width=16, num_blocks=2, layers_per_block=1,
                            num_heads=2, num_classes=3)
  x = jax.random.normal(jax.random.key(0), (3, 4, 2))
  p = perturb(nn.unbox(jax.jit(flow.init)(jax.random.key(0), x, jnp.array([0, 1, 2])))["params"],
              jax.random.key(1), 0.1)
  fwd = jax.jit(lambda p, x, y: flow.apply({"params": p}, x, y))
  z_lab, _ = fwd(p, x, jnp.array([0, 1, 2]))
  z_unl, _ = fwd(p, x, jnp.array([-1, -1, -1]))
  z_none, _ = jax.jit(lambda p, x: flow.apply({"params": p}, x, None))(p, x)
  np.testing.assert_allclose(z_unl, z_none, atol=1e-6)
  assert float(jnp.abs(z_lab - z_unl).max()) > 1e-4
  inv = jax.jit(lambda p, z, y: flow.apply({"params": p}, z, y, method=AutoregressiveFlow.inverse))
  xr = inv(p, z_lab, jnp.array([0, 1, 2]))
  assert float(jnp.abs(xr - x).max()) <= 1e-5


@pytest.mark.slow  # compiles the remat and block-remat gradients of a 3-block model (about 15 s)
def test_block_remat_changes_memory_only():
  """model.remat_blocks (each scanned AF block rematerialised whole) is execution only: the same
  params from the same key, the same loss and gradients to the last bit."""
  import dataclasses
  from farmer_jax.config.schema import ModelConfig
  from farmer_jax.model import Farmer, init_params
  from farmer_jax.train.step import make_loss
  m = ModelConfig(flow_blocks=3, flow_layers=2, ar_depth=1, flow_width=64, ar_width=64,
                  remat=True)
  mb = dataclasses.replace(m, remat_blocks=True)
  p, pb = (jax.jit(lambda r, c=c: init_params(c, r))(jax.random.key(0)) for c in (m, mb))
  chex.assert_trees_all_equal(p, pb, strict=True)
  x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 1)) * 2 - 1
  y = jnp.arange(4)
  grads = [jax.jit(jax.value_and_grad(lambda q, c=c: make_loss(Farmer(c), c)(q, x, y)[0]))(p)
           for c in (m, mb)]
  assert float(grads[0][0]) == float(grads[1][0])
  chex.assert_trees_all_equal(grads[0][1], grads[1][1], strict=True)
