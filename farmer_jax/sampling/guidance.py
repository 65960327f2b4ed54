"""Classifier-free guidance for Gaussian-mixture tokens: FARMER's resampling CFG and JetFormer's
naive CFG.

Shape letters: R draws, K components, D event dims, S = s_c + s_u candidates (per draw, or one pool
shared by the R draws: ``resample_shared``).

Target (paper Eq. 15): log p'(z) = log p_c(z) + w (log p_c(z) - log p_u(z)) + const.

Temperature convention (docs/sampling.md, one rule for every temperature):
  * T_pi, T_pi_v multiply mixture LOGITS (pi_k -> pi_k^T renormalised);
  * T_sigma, T_sigma_v multiply component STANDARD DEVIATIONS sigma_k (the paper's Eq. 11 sigma_k);
  * T_s multiplies the resampling LOG-WEIGHTS.

Resampling CFG (paper Algorithm 1), per draw: s_c candidates from p_c and s_u from p_u, both under
the proposal temperatures (T_pi, T_sigma); every candidate is scored with r = log p_c - log p_u
under the evaluation temperatures (T_pi_v, T_sigma_v); conditional candidates get log-weight w r,
unconditional ones (w + 1) r (Algorithm 1's two weights; Appendix A.2 writes w r for every
candidate); one candidate is drawn from softmax(T_s * log-weights). As s_c,
s_u -> infinity the drawn value has density

    f(z)  proportional to  s_c q_c(z) exp(T_s w r(z)) + s_u q_u(z) exp(T_s (w + 1) r(z)),

q_c, q_u the tempered proposals. Only when ALL five temperatures are 1 is this exactly p' (then both
terms equal p_c^{1+w} / p_u^w); Table 6 uses T_sigma = 0.9, T_pi_v = 0.2, T_s = 1.1, i.e. a
deliberately sharpened target. With few candidates the draw is biased by O(1/S) towards the
proposals. ``effective_sample_size`` of the weights (1 = one candidate takes all the weight,
S = uniform) tells how far a draw is from that limit.

Naive CFG (JetFormer): pick a component k from the conditional mixture, then sample every dimension
independently from N_c^{1+w} / N_u^w of component k by rejection sampling.
"""

import jax
import jax.numpy as jnp

from farmer_jax.config.schema import ResamplingCFG
from farmer_jax.prior import gmm


def candidates(key, g_c: gmm.GMM, g_u: gmm.GMM, p: ResamplingCFG, s_c: int, s_u: int):
  """One candidate set (S, D) for one draw; ``g_c``/``g_u`` are single mixtures ((K,) logits, (K, D)
  loc/scale).

  Randomness contract: ``k_c, k_u, k_pick = split(key, 3)``; the conditional candidates are
  ``gmm.sample(k_c, q_c, (s_c,))``, the unconditional ones ``gmm.sample(k_u, q_u, (s_u,))`` (see
  ``gmm.sample``).
  """
  k_c, k_u, _ = jax.random.split(key, 3)
  parts = []
  if s_c:
    parts.append(gmm.sample(k_c, gmm.with_temperature(g_c, p.t_pi, p.t_sigma), (s_c,)))
  if s_u:
    parts.append(gmm.sample(k_u, gmm.with_temperature(g_u, p.t_pi, p.t_sigma), (s_u,)))
  return jnp.concatenate(parts, 0)


def log_weights(z, g_c: gmm.GMM, g_u: gmm.GMM, p: ResamplingCFG, s_c: int, s_u: int, block=None):
  """Tempered resampling log-weights T_s * m * r for candidates z (..., S, D) -> (..., S) (m = w or
  w + 1); ``block``: see ``gmm.log_prob``."""
  r = (gmm.log_prob(gmm.with_temperature(g_c, p.t_pi_v, p.t_sigma_v), z, block)
       - gmm.log_prob(gmm.with_temperature(g_u, p.t_pi_v, p.t_sigma_v), z, block))
  mult = jnp.concatenate(
      [jnp.full((s_c,), p.w, jnp.float32),
       jnp.full((s_u,), p.w + 1.0, jnp.float32)])
  return p.t_s * mult * r


def effective_sample_size(logw):
  """Kish ESS of normalised weights, 1 / sum_j p_j^2: (..., S) -> (...), in [1, S]."""
  pr = jax.nn.softmax(logw, axis=-1)
  return 1.0 / jnp.sum(pr * pr, axis=-1)


def resample(keys,
             g_c: gmm.GMM,
             g_u: gmm.GMM,
             p: ResamplingCFG,
             s_c=None,
             s_u=None,
             chunk: int = 64,
             block=None):
  """R independent resampling-CFG draws from one pair of mixtures, each over its OWN fresh candidate
  set.

  keys (R,) -> (z (R, D), ess (R,)). ``s_c``/``s_u`` override the per-draw candidate counts (the
  redundant token uses its own). The draws are made ``chunk`` at a time (``lax.map``: candidates,
  log-weights and pick), and with ``block`` the mixtures' components are scored ``block`` at a time
  (``gmm.log_prob``), so memory stays bounded for the redundant token (R = N draws of S candidates
  against K_R x d_R densities) while the op stays vectorised. The pick of draw r is
  ``argmax(logw_r + gumbel(k_pick_r, (S,)))`` (Gumbel-max, i.e. a categorical draw).
  """
  s_c = p.s_c if s_c is None else int(s_c)
  s_u = p.s_u if s_u is None else int(s_u)

  def draw(key):
    z = candidates(key, g_c, g_u, p, s_c, s_u)                                          # (S, D)
    logw = log_weights(z, g_c, g_u, p, s_c, s_u, block)                                  # (S,)
    k_pick = jax.random.split(key, 3)[2]
    idx = jnp.argmax(logw + jax.random.gumbel(k_pick, (s_c + s_u,)))
    return z[idx], effective_sample_size(logw)

  return jax.lax.map(draw, keys, batch_size=min(chunk, keys.shape[0]))


def resample_shared(key, pick_keys, g_c: gmm.GMM, g_u: gmm.GMM, p: ResamplingCFG, s_c: int,
                    s_u: int, block=None):
  """Algorithm 1's redundant branch as written: ONE candidate pool (``candidates(key, ...)``, s_c
  from p_c and s_u from p_u), scored once, and R picks from it, ``idx_r ~ Categorical(softmax(
  log-weights))`` with replacement, pick r by Gumbel-max with ``pick_keys[r]``.

  pick_keys (R,) -> (z (R, D), ess (): the pool's effective sample size, idx (R,) the picked
  candidates). ``block``: see ``gmm.log_prob``.
  """
  z = candidates(key, g_c, g_u, p, s_c, s_u)                                            # (S, D)
  logw = log_weights(z, g_c, g_u, p, s_c, s_u, block)                                    # (S,)
  idx = jax.vmap(lambda k: jnp.argmax(logw + jax.random.gumbel(k, (s_c + s_u,))))(pick_keys)
  return z[idx], effective_sample_size(logw), idx


def naive_cfg_draw(rng,
                   g_c: gmm.GMM,
                   g_u: gmm.GMM,
                   w: float,
                   num_proposals: int = 1000,
                   grid: int = 1001,
                   t_pi: float = 1.0,
                   t_sigma: float = 1.0):
  """JetFormer-style CFG for one example: (K,) / (K, D) mixtures -> (D,).

  The component is drawn from the conditional weights and shared with the unconditional mixture;
  each dimension is then drawn from q(x) ~ N(x; mu_c, s_c)^{1+w} / N(x; mu_u, s_u)^w by rejection
  sampling from the proposal N(mu_c, (2 max(s_c, s_u))^2) with an envelope constant taken on a grid
  of +-10 proposal stds. Dimensions where no proposal is accepted fall back to a conditional draw.
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
  accept = jnp.log(jax.random.uniform(k_acc,
                                      props.shape)) < log_target(props) - log_q(props) - log_m
  first = jnp.argmax(accept, axis=0)  # first accepted per dim
  chosen = jnp.take_along_axis(props, first[None], 0)[0]
  fallback = mu_c + s_c * jax.random.normal(k_fb, mu_c.shape)
  return jnp.where(accept.any(0), chosen, fallback)
