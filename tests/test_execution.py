"""Execution choices (config.EXECUTION_FIELDS: unrolled vs scanned AF and AR layers, attention
implementation, causal query chunks, remat and its policy) change speed and memory, never the
function: each gives the default's loss and gradients (train step), latents, inverse (plain and
TARFlow-guided) and AR samples, to float rounding. The default is scan +
jax.nn.dot_product_attention without remat."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from farmer_jax.config.schema import ModelConfig, SamplerConfig
from farmer_jax.flow.patchify import patchify
from farmer_jax.model import Farmer, init_params, make_flow
from farmer_jax.sampling.sampler import sample_keys, sample_latents
from farmer_jax.train.step import make_loss

BASE = ModelConfig(image_size=16, channels=3, patch_size=2, num_classes=3, flow_blocks=2,
                   flow_layers=2, flow_width=32, flow_heads=2, flow_class_conditional=True,
                   ar_width=32, ar_depth=1, ar_heads=2, class_repeats=2, d_informative=4,
                   mixtures_informative=3, mixtures_redundant=3)
VARIANTS = {   # the first (the CPU configs' choice) runs in the default suite, the rest are slow
    "unroll-einsum-chunked": dict(unroll=True, attention="einsum", flow_attn_chunk=16),
    "unroll-xla": dict(unroll=True),
    "scan-einsum": dict(attention="einsum", flow_attn_chunk=0),
    "remat-nothing": dict(remat=True),
    "remat-dots-unrolled": dict(remat=True, remat_policy="dots_saveable", unroll=True,
                                attention="einsum"),
}
CASES = [pytest.param(n, marks=() if i == 0 else pytest.mark.slow)
         for i, n in enumerate(VARIANTS)]


@pytest.fixture(scope="module")
def reference():
  params = jax.jit(lambda r: init_params(BASE, r))(jax.random.key(0))
  # non-trivial flow and heads: perturb every leaf (zero-initialised proj_out/heads included)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape)
                                     for a, k in zip(leaves, keys)])
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
  y = jnp.asarray([0, 1, 2, 3], jnp.int32)       # 3 = the null class
  return params, x, y, _outputs(BASE, params, x, y)


def _outputs(m, params, x, y):
  loss = make_loss(Farmer(m), m)
  (val, _), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, x, y)
  flow = make_flow(m)
  tokens = patchify(x, m.patch_size)
  z, logdet = jax.jit(lambda p: flow.apply({"params": p}, tokens, y))(params["flow"])
  plain = flow.apply({"params": params["flow"]}, z, y, method=flow.inverse)
  guided = flow.apply({"params": params["flow"]}, z, y, 1.5, "ab", 0.8, True,
                      method=flow.inverse)
  zs = sample_latents(m, params, sample_keys(0, 0, 4), y % 3, SamplerConfig())
  return dict(loss=val, grads=grads, z=z, logdet=logdet, plain=plain, guided=guided,
              samples=zs)


@pytest.mark.parametrize("name", CASES)
def test_execution_choice_is_the_same_function(reference, name):
  params, x, y, want = reference
  m = dataclasses.replace(BASE, **VARIANTS[name])
  got = _outputs(m, params, x, y)
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
  chex.assert_trees_all_close(got["grads"], want["grads"], rtol=1e-4, atol=1e-6)
  for k in ("z", "logdet", "plain", "guided", "samples"):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=2e-5, err_msg=k)
  np.testing.assert_allclose(want["plain"], patchify(x, 2), atol=1e-4)   # the inverse is exact
