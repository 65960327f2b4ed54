"""Ancestral sampling: shapes, determinism, batch-composition independence of the AR decode."""

import jax
import jax.numpy as jnp
import numpy as np

from farmer_jax.sampling.ancestral import sample_images, sample_latents


def test_sampling_shapes_and_determinism(tiny):
  cfg, _, params = tiny
  y = jnp.array([0, 2, cfg.null_class])
  f = jax.jit(lambda p, r, y: sample_images(cfg, p, r, y))
  a = f(params, jax.random.key(0), y)
  b = f(params, jax.random.key(0), y)
  c = f(params, jax.random.key(1), y)
  assert a.shape == (3, cfg.image_size, cfg.image_size, cfg.channels)
  assert bool(jnp.isfinite(a).all())
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - c).max()) > 0


def test_sampled_latents_decode_and_reencode(tiny):
  """The sampler's images map back (through the AF forward) to the sampled latents."""
  cfg, model, params = tiny
  from farmer_jax.model import Farmer, decode_latents
  y = jnp.array([1, 0])
  z = sample_latents(cfg, params, jax.random.key(3), y)
  x = decode_latents(cfg, params, z, y)
  z2, _ = model.apply({"params": params}, x, y, method=Farmer.encode)
  np.testing.assert_allclose(z2, z, atol=1e-4)
