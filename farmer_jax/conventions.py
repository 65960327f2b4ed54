"""Math conventions shared by training and evaluation (see docs/math.md).

Everything that turns pixels into model space, or a model log-density into a reported number, lives
here and nowhere else:

* pixel range: uint8 value v in {0..255} maps to the bin [v/128 - 1, (v+1)/128 - 1) of width
  ``BIN_WIDTH = 1/128`` in model space [-1, 1); the bin centre is ``(v + 0.5)/128 - 1``. That is
  the ``'farmer'`` mapping (``model.pixels``, the default); a model converted from TARFlow says
  ``'tarflow'``: bin centre ``2v/255 - 1`` (torchvision's ``Normalize(0.5, 0.5)``), bin width
  2/255. Every function below takes the mapping's name (``PIXEL_MAPPINGS``).
* dequantization: ``uniform`` puts x uniformly inside the bin (exact discrete-likelihood bound);
  ``gaussian`` adds N(0, sigma^2) noise around the bin centre (sigma in [-1, 1] units).
* log-det: the flow returns log|det dZ/dX| SUMMED over tokens and channels (never a per-dim mean),
  in nats.
* loss: nats per dimension, ``-(log p_prior(z) + logdet) / D`` with D = N*d = H*W*C.
* bits/dim: of the discrete image, ``(nats_per_dim - log(BIN_WIDTH)) / ln 2``; with uniform
  dequantization this is an upper bound on the true discrete NLL, with Gaussian noise it is the NLL
  of the noisy data.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from farmer_jax.config.schema import PIXELS

BIN_WIDTH = 1.0 / 128.0
LN2 = math.log(2.0)


class PixelMapping(NamedTuple):
  """uint8 value v owns the model-space bin [low + v*width, low + (v+1)*width)."""
  width: float     # bin width
  low: float       # lower edge of v = 0's bin


# model.pixels -> mapping. 'farmer': bins tile [-1, 1), centre (v + 0.5)/128 - 1. 'tarflow':
# centre 2v/255 - 1 (what TARFlow trains and samples with), bins tile [-1 - 1/255, 1 + 1/255).
PIXEL_MAPPINGS = {"farmer": PixelMapping(BIN_WIDTH, -1.0),
                  "tarflow": PixelMapping(2.0 / 255.0, -1.0 - 1.0 / 255.0)}
assert tuple(PIXEL_MAPPINGS) == PIXELS, "config.PIXELS names the mappings defined here"


def pixel_mapping(name: str) -> PixelMapping:
  if name not in PIXEL_MAPPINGS:
    raise ValueError(f"pixel mapping {name!r} is unknown; use one of {sorted(PIXEL_MAPPINGS)}")
  return PIXEL_MAPPINGS[name]


def log_bin_width(pixels: str = "farmer"):
  """log of the bin width (nats) of a pixel mapping: the dequantization term of bits/dim."""
  return math.log(pixel_mapping(pixels).width)


def uint8_to_centre(v, pixels: str = "farmer"):
  """uint8 pixels -> bin centres in model space, float32."""
  m = pixel_mapping(pixels)
  return (jnp.asarray(v, jnp.float32) + 0.5) * m.width + m.low


def to_uint8(x, pixels: str = "farmer"):
  """Model-space values -> uint8 pixels (inverse of the bin mapping; clips out-of-range values,
  NaN -> 0)."""
  m = pixel_mapping(pixels)
  x = np.nan_to_num(np.asarray(x, np.float64), nan=-1.0, posinf=1.0, neginf=-1.0)
  v = np.floor((x - m.low) / m.width)
  return np.clip(v, 0, 255).astype(np.uint8)


def dequantize(rng, v, kind: str, sigma=0.0, pixels: str = "farmer"):
  """Dequantize uint8 images ``v`` (any shape) into model space.

  Args:
    rng: PRNG key.
    v: uint8 (or integer-valued) pixels.
    kind: 'uniform' (x ~ U(bin)) or 'gaussian' (bin centre + sigma * N(0, 1)).
    sigma: noise std in model units, used by 'gaussian' (may be a traced scalar).
    pixels: the pixel mapping's name (``PIXEL_MAPPINGS``).
  """
  m = pixel_mapping(pixels)
  v = jnp.asarray(v, jnp.float32)
  if kind == "uniform":
    return (v + jax.random.uniform(rng, v.shape)) * m.width + m.low
  if kind == "gaussian":
    return (v + 0.5) * m.width + m.low + sigma * jax.random.normal(rng, v.shape)
  raise ValueError(f"dequantization kind must be 'uniform' or 'gaussian', got {kind!r}")


def cosine_noise_sigma(step, total_steps, sigma_max, sigma_min):
  """Cosine-annealed dequantization noise: sigma_max at step 0, sigma_min at step >= total_steps."""
  t = jnp.clip(jnp.asarray(step, jnp.float32) / max(int(total_steps), 1), 0.0, 1.0)
  return sigma_min + (sigma_max - sigma_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))


def nats_per_dim(log_prob_sum, num_dims):
  """Negative log-likelihood in nats per dimension from a summed log-density."""
  return -log_prob_sum / num_dims


def bits_per_dim(nats_dim, pixels: str = "farmer"):
  """Bits per dimension of the discrete 8-bit image from the model-space NLL in nats/dim."""
  return (nats_dim - log_bin_width(pixels)) / LN2
