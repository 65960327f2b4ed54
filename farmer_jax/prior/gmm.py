"""Diagonal Gaussian mixtures: head-output layout, log-density (fp32) and sampling.

Shape letters: ... leading batch dims, K mixture components, D event dims.

A head emits ``K + 2*K*D`` raw values per position, laid out as [K mixture logits | (K, 2, D) with loc at [:, 0]
and raw scale at [:, 1]] (JetFormer's layout). The scale is ``max(f(raw), floor)`` with f = squareplus
((r + sqrt(r^2 + 4))/2) or softplus shifted so f(0) = 1; a zero-initialised head therefore gives K equal-weight
N(0, I) components, i.e. exactly N(0, I).
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
    raise ValueError(f"head output has {raw.shape[-1]} values, expected K + 2KD = {num_outputs(k, d)}")
  logits = raw[..., :k]
  rest = raw[..., k:].reshape(raw.shape[:-1] + (k, 2, d))
  return GMM(logits, rest[..., 0, :], scale_transform(rest[..., 1, :], scale_fn, floor))


def component_log_prob(g: GMM, x):
  """log N(x; loc_k, diag(scale_k^2)) summed over D: x (..., D) -> (..., K)."""
  x = x.astype(jnp.float32)[..., None, :]
  u = (x - g.loc) / g.scale
  return jnp.sum(-0.5 * u * u - jnp.log(g.scale) - 0.5 * _LOG_2PI, axis=-1)


def log_prob(g: GMM, x):
  """Mixture log-density in nats: x (..., D) -> (...)."""
  return jax.scipy.special.logsumexp(jax.nn.log_softmax(g.logits, -1) + component_log_prob(g, x), axis=-1)


def with_temperature(g: GMM, t_pi: float = 1.0, t_sigma: float = 1.0) -> GMM:
  """Temperatures: ``t_pi`` multiplies the mixture logits, ``t_sigma`` multiplies the component variances."""
  return GMM(g.logits * t_pi, g.loc, g.scale * jnp.sqrt(jnp.asarray(t_sigma, jnp.float32)))


def sample(rng, g: GMM, shape=()):
  """Draws ``shape + batch`` samples: returns (*shape, ..., D)."""
  rk, rn = jax.random.split(rng)
  batch = g.logits.shape[:-1]
  idx = jax.random.categorical(rk, g.logits, axis=-1, shape=tuple(shape) + batch)      # (*shape, ...)
  loc = jnp.take_along_axis(jnp.broadcast_to(g.loc, tuple(shape) + g.loc.shape), idx[..., None, None], -2)[..., 0, :]
  scale = jnp.take_along_axis(jnp.broadcast_to(g.scale, tuple(shape) + g.scale.shape),
                              idx[..., None, None], -2)[..., 0, :]
  return loc + scale * jax.random.normal(rn, loc.shape)


def standard_normal_log_prob(x):
  """Sum over the last axis of log N(x; 0, 1): (..., D) -> (...)."""
  x = x.astype(jnp.float32)
  return jnp.sum(-0.5 * x * x - 0.5 * _LOG_2PI, axis=-1)
