"""farmer_jax.flops: the analytic matmul FLOPs against XLA's own count.

XLA's ``cost_analysis()`` counts a while-loop body once whatever its trip count (``nn.scan`` over
blocks and layers lowers to one), so the cross-check uses one block, one flow layer and one AR
layer, where XLA counts the whole program. XLA also counts elementwise work (LayerNorm, GELU,
softmax, exp, GMM terms) that the analytic matmul count leaves out, so XLA's number must be at
least ours and at most 10% above it (measured 1.3-4.4% at widths 128-512).
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from farmer_jax import flops
from farmer_jax.config.schema import ModelConfig
from farmer_jax.model import Farmer, init_params
from farmer_jax.train.step import make_loss

ONE = ModelConfig(flow_blocks=1, flow_layers=1, ar_depth=1, flow_width=128, ar_width=128)


def _xla_train_flops(m, batch):
  model, params = Farmer(m), jax.jit(lambda r: init_params(m, r))(jax.random.key(0))
  loss = make_loss(model, m)
  x = jnp.zeros((batch, m.image_size, m.image_size, m.channels))
  y = jnp.zeros((batch,), jnp.int32)
  cost = jax.jit(jax.grad(lambda p: loss(p, x, y)[0])).lower(params).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize("m,batch", [
    (ONE, 4),
    pytest.param(dataclasses.replace(ONE, flow_width=256, flow_heads=4, channels=3,
                                     prior="standard_normal"), 2, marks=pytest.mark.slow),
], ids=["farmer-128", "standard-normal-256-rgb"])
def test_train_step_flops_match_xla(m, batch):
  ours = flops.train_step_flops(m, batch)
  xla = _xla_train_flops(m, batch)
  assert 1.0 <= xla / ours <= 1.10, (xla, ours)


def test_flops_scale_with_depth_and_batch():
  deep = dataclasses.replace(ONE, flow_blocks=3, flow_layers=2, ar_depth=4)
  one_layer = flops.transformer_flops(ONE.num_tokens, 128, 1, 4)
  assert flops.flow_flops(deep) - 3 * flops.flow_flops(ONE) == 3 * one_layer
  assert flops.prior_flops(deep) - flops.prior_flops(ONE) == 3 * flops.transformer_flops(
      ONE.class_repeats + ONE.num_tokens, 128, 1, 4)
  assert flops.train_step_flops(deep, 8) == 8 * flops.flops_per_image(deep)
  assert flops.prior_flops(dataclasses.replace(ONE, prior="standard_normal")) == 0
