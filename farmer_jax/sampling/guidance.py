"""Classifier-free guidance for Gaussian-mixture tokens: FARMER's resampling CFG and JetFormer's naive CFG.

Shape letters: B batch, K components, D event dims, S = s_c + s_u candidates, R draws from one weighted pool.

Target (paper Eq. 15): log p'(z) = log p_c(z) + w (log p_c(z) - log p_u(z)) + const.

Resampling CFG (paper Algorithm 1): draw s_c candidates from p_c and s_u from p_u (proposal temperatures T_pi on
mixture logits, T_sigma on variances), score every candidate with r = log p_c - log p_u under the evaluation
temperatures (T_pi_v, T_sigma_v), give conditional candidates log-weight w r and unconditional ones (w + 1) r, and
draw from softmax(T_s * log-weights). With T_s = 1 and unit evaluation temperatures this is sampling-importance-
resampling whose limit is exactly p' (each proposal group's weights are p'/proposal up to the same constant).

Naive CFG (JetFormer): pick a component k from the conditional mixture, then sample every dimension independently
from N_c^{1+w} / N_u^w of component k by rejection sampling.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from farmer_jax.prior import gmm


class ResamplingCFG(NamedTuple):
  """Hyper-parameters of resampling CFG (paper Table 6 names)."""
  w: float = 0.0
  s_c: int = 5
  s_u: int = 5
  t_pi: float = 1.0
  t_sigma: float = 1.0
  t_pi_v: float = 1.0
  t_sigma_v: float = 1.0
  t_s: float = 1.0


def _take(g: gmm.GMM, idx):
  return gmm.GMM(g.logits[idx], g.loc[idx], g.scale[idx])


def resample_draw(rng, g_c: gmm.GMM, g_u: gmm.GMM, p: ResamplingCFG, num_draws: int = 1, s_c=None, s_u=None):
  """One example (no batch dims in g_c / g_u: logits (K,), loc/scale (K, D)) -> (num_draws, D).

  ``s_c``/``s_u`` override the pool sizes (the redundant token uses a larger pool).
  """
  s_c = p.s_c if s_c is None else s_c
  s_u = p.s_u if s_u is None else s_u
  k_c, k_u, k_pick = jax.random.split(rng, 3)
  cands = []
  if s_c:
    cands.append(gmm.sample(k_c, gmm.with_temperature(g_c, p.t_pi, p.t_sigma), shape=(s_c,)))
  if s_u:
    cands.append(gmm.sample(k_u, gmm.with_temperature(g_u, p.t_pi, p.t_sigma), shape=(s_u,)))
  z = jnp.concatenate(cands, 0)                                             # (S, D)
  r = (gmm.log_prob(gmm.with_temperature(g_c, p.t_pi_v, p.t_sigma_v), z)
       - gmm.log_prob(gmm.with_temperature(g_u, p.t_pi_v, p.t_sigma_v), z))  # (S,)
  mult = jnp.concatenate([jnp.full((s_c,), p.w), jnp.full((s_u,), p.w + 1.0)])
  logw = p.t_s * mult * r
  idx = jax.random.categorical(k_pick, logw, shape=(num_draws,))
  return z[idx]


def naive_cfg_draw(rng, g_c: gmm.GMM, g_u: gmm.GMM, w: float, num_proposals: int = 1000, grid: int = 1001,
                   t_pi: float = 1.0, t_sigma: float = 1.0):
  """JetFormer-style CFG for one example: (K,) / (K, D) mixtures -> (D,).

  The component is drawn from the conditional weights and shared with the unconditional mixture; each dimension
  is then drawn from q(x) ~ N(x; mu_c, s_c)^{1+w} / N(x; mu_u, s_u)^w by rejection sampling from the proposal
  N(mu_c, (2 max(s_c, s_u))^2) with an envelope constant taken on a grid of +-10 proposal stds. Dimensions where no
  proposal is accepted fall back to a conditional draw.
  """
  g_c = gmm.with_temperature(g_c, t_pi, t_sigma)
  g_u = gmm.with_temperature(g_u, t_pi, t_sigma)
  k_comp, k_prop, k_acc, k_fb = jax.random.split(rng, 4)
  k = jax.random.categorical(k_comp, g_c.logits)
  mu_c, s_c, mu_u, s_u = g_c.loc[k], g_c.scale[k], g_u.loc[k], g_u.scale[k]      # (D,)
  s_q = 2.0 * jnp.maximum(s_c, s_u)

  def log_target(x):
    lc = -0.5 * ((x - mu_c) / s_c) ** 2 - jnp.log(s_c)
    lu = -0.5 * ((x - mu_u) / s_u) ** 2 - jnp.log(s_u)
    return (1.0 + w) * lc - w * lu

  log_q = lambda x: -0.5 * ((x - mu_c) / s_q) ** 2 - jnp.log(s_q)
  xs = mu_c + s_q * jnp.linspace(-10.0, 10.0, grid)[:, None]                    # (G, D)
  log_m = jnp.max(log_target(xs) - log_q(xs), axis=0)                           # envelope per dim
  props = mu_c + s_q * jax.random.normal(k_prop, (num_proposals,) + mu_c.shape)  # (P, D)
  accept = jnp.log(jax.random.uniform(k_acc, props.shape)) < log_target(props) - log_q(props) - log_m
  first = jnp.argmax(accept, axis=0)                                            # first accepted per dim
  chosen = jnp.take_along_axis(props, first[None], 0)[0]
  fallback = mu_c + s_c * jax.random.normal(k_fb, mu_c.shape)
  return jnp.where(accept.any(0), chosen, fallback)
