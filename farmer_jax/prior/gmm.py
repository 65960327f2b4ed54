"""Diagonal Gaussian mixtures: head-output layout, log-density (fp32) and sampling.

Shape letters: ... leading batch dims, K mixture components, D event dims.

A head emits ``K + 2*K*D`` raw values per position, laid out as [K mixture logits | (K, 2, D) with
loc at [:, 0] and raw scale at [:, 1]] (JetFormer's layout). The scale is ``max(f(raw), floor)``
with f = squareplus ((r + sqrt(r^2 + 4))/2) or softplus shifted so f(0) = 1; a zero-initialised head
therefore gives K equal-weight N(0, I) components, i.e. exactly N(0, I).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

_SOFTPLUS_ONE = math.log(math.e - 1.0)     # softplus(x + c) = 1 at x = 0
_LOG_2PI = math.log(2.0 * math.pi)


class GMM(NamedTuple):
  logits: jax.Array   # (..., K) unnormalised mixture logits
  loc: jax.Array      # (..., K, D)
  scale: jax.Array    # (..., K, D) > 0


def num_outputs(k: int, d: int) -> int:
  return k + 2 * k * d


def scale_transform(raw, kind: str, floor: float):
  raw = raw.astype(jnp.float32)
  if kind == "squareplus":
    # Not jax.nn.squareplus(raw, 4): same values under jit, but its gradient rounds differently
    # (up to 128 ulp for raw < 0), so training steps would change; outside jit values differ too.
    s = 0.5 * (raw + jnp.sqrt(raw * raw + 4.0))
  elif kind == "softplus":
    s = jax.nn.softplus(raw + _SOFTPLUS_ONE)
  else:
    raise ValueError(f"unknown scale_fn {kind!r}; use 'squareplus' or 'softplus'")
  return jnp.maximum(s, floor)


def from_head(raw, k: int, d: int, scale_fn: str = "squareplus", floor: float = 1e-6) -> GMM:
  """Raw head output (..., K + 2KD) -> GMM in fp32."""
  raw = raw.astype(jnp.float32)
  if raw.shape[-1] != num_outputs(k, d):
    raise ValueError(
        f"head output has {raw.shape[-1]} values, expected K + 2KD = {num_outputs(k, d)}")
  logits = raw[..., :k]
  rest = raw[..., k:].reshape(raw.shape[:-1] + (k, 2, d))
  return GMM(logits, rest[..., 0, :], scale_transform(rest[..., 1, :], scale_fn, floor))


def component_log_prob(g: GMM, x):
  """log N(x; loc_k, diag(scale_k^2)) summed over D: x (..., D) -> (..., K)."""
  x = x.astype(jnp.float32)[..., None, :]
  u = (x - g.loc) / g.scale
  return jnp.sum(-0.5 * u * u - jnp.log(g.scale) - 0.5 * _LOG_2PI, axis=-1)


def log_prob(g: GMM, x, block=None):
  """Mixture log-density in nats: x (..., D) -> (...). ``block``: the components are evaluated
  ``block`` at a time (``lax.map``), so that the (..., K, D) terms are never held at once (many
  components of many dims, e.g. the redundant token's resampling weights); the same values."""
  if block is None:
    comp = component_log_prob(g, x)
  else:
    one = lambda ls: component_log_prob(GMM(None, ls[0][None], ls[1][None]), x)[..., 0]
    comp = jnp.moveaxis(jax.lax.map(one, (g.loc, g.scale), batch_size=block), 0, -1)
  return jax.scipy.special.logsumexp(jax.nn.log_softmax(g.logits, -1) + comp, axis=-1)


def with_temperature(g: GMM, t_pi: float = 1.0, t_sigma: float = 1.0) -> GMM:
  """Temperatures (docs/sampling.md): ``t_pi`` multiplies the mixture logits (weights
  pi_k -> pi_k^t_pi, renormalised); ``t_sigma`` multiplies the component STANDARD DEVIATIONS sigma_k
  (variances by t_sigma^2)."""
  return GMM(g.logits * t_pi, g.loc, g.scale * jnp.asarray(t_sigma, jnp.float32))


def scale_variance(g: GMM, factor, floor: float = 1e-6) -> GMM:
  """Multiplies the component variances by ``factor`` >= 0 (std by sqrt(factor)), keeping
  std >= ``floor`` so a zero factor gives (numerically) the component means instead of a 0/0
  density."""
  return GMM(g.logits, g.loc,
             jnp.maximum(g.scale * jnp.sqrt(jnp.asarray(factor, jnp.float32)), floor))


def sample(rng, g: GMM, shape=()):
  """Draws from ONE mixture (logits (K,), loc/scale (K, D)); vmap for batches of mixtures. Returns
  (*shape, D).

  Randomness contract (tests rebuild draws from it): ``rk, rn = split(rng)``; component
  ``k = argmax(logits + gumbel(rk, (*shape, K)))`` (Gumbel-max); value
  ``loc_k + scale_k * normal(rn, (*shape, D))``.
  """
  if g.logits.ndim != 1:
    raise ValueError(
        f"gmm.sample takes one mixture with logits of shape (K,), got {g.logits.shape}; "
        "vmap over batched mixtures")
  rk, rn = jax.random.split(rng)
  shape = tuple(shape)
  idx = jnp.argmax(g.logits + jax.random.gumbel(rk, shape + g.logits.shape), axis=-1)  # (*shape,)
  return g.loc[idx] + g.scale[idx] * jax.random.normal(rn, shape + g.loc.shape[-1:])


def standard_normal_log_prob(x):
  """Sum over the last axis of log N(x; 0, 1): (..., D) -> (...)."""
  x = x.astype(jnp.float32)
  return jnp.sum(-0.5 * x * x - 0.5 * _LOG_2PI, axis=-1)
