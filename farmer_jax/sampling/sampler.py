"""Sampling: AR decode with a KV cache under one ``lax.scan`` (optionally guided), then the exact AF inverse.

Shape letters: B samples, M prefix length, N tokens, d_I / d_R informative / redundant dims, C AR width.

Guidance modes (``SamplerConfig.guidance``):
  * ``none``        ancestral sampling from p(z | y) with temperatures (t_pi on mixture logits, t_sigma on stds);
  * ``resampling``  FARMER's resampling CFG (paper Algorithm 1), see ``guidance.py``;
  * ``naive``       JetFormer's per-dimension rejection-sampled CFG.
Guided modes run the conditional and unconditional streams as ONE doubled batch [cond; uncond] sharing one KV
cache; the chosen token is written into both halves so the streams stay aligned.

Randomness is per sample: sample b uses ``keys[b]`` only (folded with the token index), so a sample depends on its
own key, not on the batch it was drawn in.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from farmer_jax.config import ModelConfig
from farmer_jax.model import decode_latents
from farmer_jax.nn.transformer import init_cache
from farmer_jax.prior import gmm
from farmer_jax.prior.ar import ARPrior
from farmer_jax.reduction.split import merge_channels
from farmer_jax.sampling.guidance import ResamplingCFG, naive_cfg_draw, resample

GUIDANCE_MODES = ("none", "resampling", "naive")


class SamplerConfig(NamedTuple):
  guidance: str = "none"
  cfg: ResamplingCFG = ResamplingCFG()   # w and temperatures; proposal temps also used by 'none' and 'naive'
  redundant_candidates: int = 16         # resampling CFG: candidates per group (cond, uncond) for EACH z^R_i
  redundant_var_scale: float = 1.0       # paper Fig. 7: multiplies the redundant group's variances before sampling
  naive_proposals: int = 1000


def _split(g: gmm.GMM, b):
  return (gmm.GMM(g.logits[:b], g.loc[:b], g.scale[:b]), gmm.GMM(g.logits[b:], g.loc[b:], g.scale[b:]))


def _is_int(v):
  return isinstance(v, int) and not isinstance(v, bool)


def validate_sampler(s: SamplerConfig):
  if s.guidance not in GUIDANCE_MODES:
    raise ValueError(f"guidance={s.guidance!r} is unknown; use one of {GUIDANCE_MODES}")
  c = s.cfg
  if not (c.w >= 0 and math.isfinite(c.w)):
    raise ValueError(f"cfg={c.w} must be a finite number >= 0 (0 = no guidance strength)")
  for name in ("t_pi", "t_sigma", "t_pi_v", "t_sigma_v", "t_s"):
    v = getattr(c, name)
    if not (v > 0 and math.isfinite(v)):
      raise ValueError(f"temperature {name}={v} must be a finite number > 0")
  if s.guidance == "resampling" and (not (_is_int(c.s_c) and _is_int(c.s_u)) or c.s_c < 0 or c.s_u < 0
                                     or c.s_c + c.s_u < 1):
    raise ValueError(f"candidate counts s_c={c.s_c}, s_u={c.s_u} must be integers >= 0 with s_c + s_u >= 1")
  if not _is_int(s.redundant_candidates) or s.redundant_candidates < 1:
    raise ValueError(f"redundant_candidates={s.redundant_candidates} must be an integer >= 1 (candidates per "
                     "group for each redundant token)")
  if not (s.redundant_var_scale >= 0 and math.isfinite(s.redundant_var_scale)):
    raise ValueError(f"redundant_var_scale={s.redundant_var_scale} must be a finite number >= 0")
  if not _is_int(s.naive_proposals) or s.naive_proposals < 1:
    raise ValueError(f"naive_proposals={s.naive_proposals} must be an integer >= 1")


def draw_informative(keys, g: gmm.GMM, b: int, s: SamplerConfig):
  """One informative token per sample. keys (B,); g batched (B,) [none] or (2B,) [cond; uncond] [guided].

  Returns (z (B, D), ess (B,) or None): ESS of the resampling weights (resampling CFG only).
  """
  c = s.cfg
  if s.guidance == "none":
    gt = gmm.with_temperature(g, c.t_pi, c.t_sigma)
    return jax.vmap(gmm.sample)(keys, gt), None
  g_c, g_u = _split(g, b)
  if s.guidance == "resampling":
    z, ess = jax.vmap(lambda k, gc, gu: resample(k[None], gc, gu, c))(keys, g_c, g_u)
    return z[:, 0], ess[:, 0]
  draw = lambda k, gc, gu: naive_cfg_draw(k, gc, gu, c.w, s.naive_proposals, t_pi=c.t_pi, t_sigma=c.t_sigma)
  return jax.vmap(draw)(keys, g_c, g_u), None


def draw_redundant(keys, g: gmm.GMM, s: SamplerConfig, floor: float = 1e-6):
  """The N redundant tokens of each sample, i.i.d. given the shared GMM (the model's factorisation).

  keys (B, N), one per token; g the shared redundant GMM batched (B,) [none] or (2B,) [cond; uncond] [guided].
  ``redundant_var_scale`` first multiplies the variances of both mixtures (std floored at ``floor``). Under
  resampling CFG every token is drawn over its OWN fresh candidate set (``redundant_candidates`` per group).
  Returns (z_r (B, N, d_R), ess (B,) mean over tokens, or None).
  """
  b = keys.shape[0]
  c = s.cfg
  g = gmm.scale_variance(g, s.redundant_var_scale, floor)
  if s.guidance == "none":
    gt = gmm.with_temperature(g, c.t_pi, c.t_sigma)
    return jax.vmap(lambda kk, gl: jax.vmap(lambda k: gmm.sample(k, gl))(kk))(keys, gt), None
  g_c, g_u = _split(g, b)
  if s.guidance == "resampling":
    n = s.redundant_candidates
    z, ess = jax.vmap(lambda kk, gc, gu: resample(kk, gc, gu, c, n, n))(keys, g_c, g_u)
    return z, jnp.mean(ess, axis=-1)
  draw = lambda k, gc, gu: naive_cfg_draw(k, gc, gu, c.w, s.naive_proposals, t_pi=c.t_pi, t_sigma=c.t_sigma)
  return jax.vmap(lambda kk, gc, gu: jax.vmap(lambda k: draw(k, gc, gu))(kk))(keys, g_c, g_u), None


def sample_latents(cfg: ModelConfig, params, keys, y, s: SamplerConfig = SamplerConfig(), return_stats=False):
  """keys (B,) PRNG keys, y (B,) labels -> z (B, N, d) in AR order [, stats].

  Keys: token i (0-based) of sample b draws with ``fold_in(keys[b], i)``; the redundant token i with
  ``fold_in(fold_in(keys[b], N), i)``. ``stats`` (resampling CFG only; empty otherwise): ``ess_informative``
  (B,) = mean over the N informative draws of the weights' effective sample size (out of s_c + s_u), and
  ``ess_redundant`` (B,) = the same over the N redundant draws (out of 2 * redundant_candidates).
  """
  validate_sampler(s)
  prior = ARPrior(cfg)
  pp = {"params": params["prior"]}
  b = y.shape[0]
  guided = s.guidance != "none"
  y_run = jnp.concatenate([y, jnp.full_like(y, cfg.null_class)]) if guided else y
  rows = y_run.shape[0]
  cache = init_cache(cfg.ar_depth, rows, cfg.class_repeats + cfg.num_tokens, cfg.ar_heads,
                     cfg.ar_width // cfg.ar_heads, cfg.jnp_dtype)
  h, cache = prior.apply(pp, y_run, cache, method=ARPrior.prefill)
  n = cfg.num_tokens

  def step(carry, i):
    h, cache = carry
    g = prior.apply(pp, h, method=ARPrior.gmm_informative)
    tok, ess = draw_informative(jax.vmap(lambda k: jax.random.fold_in(k, i))(keys), g, b, s)      # (B, d_I)
    feed = jnp.concatenate([tok, tok]) if guided else tok
    h, cache = prior.apply(pp, feed[:, None], i, cache, method=ARPrior.decode_step)
    return (h, cache), (tok, ess)

  (h, _), (z_i, ess_i) = jax.lax.scan(step, (h, cache), jnp.arange(n))
  z_i = jnp.swapaxes(z_i, 0, 1)                                                   # (B, N, d_I)
  stats = {}
  if ess_i is not None:
    stats["ess_informative"] = jnp.mean(ess_i, axis=0)
  if cfg.dimred == "none":
    z = z_i
  else:
    rkeys = jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(k, n), i))(
        jnp.arange(n)))(keys)                                                     # (B, N)
    if cfg.dimred == "jetformer":
      # z^R ~ N(0, I) scaled like any other component: std * t_sigma * sqrt(redundant_var_scale)
      std = s.cfg.t_sigma * jnp.sqrt(jnp.float32(s.redundant_var_scale))
      z_r = std * jax.vmap(jax.vmap(lambda k: jax.random.normal(k, (cfg.d_r,))))(rkeys)
    else:
      g = prior.apply(pp, h, method=ARPrior.gmm_redundant)
      z_r, ess_r = draw_redundant(rkeys, g, s, cfg.scale_floor)
      if ess_r is not None:
        stats["ess_redundant"] = ess_r
    z = merge_channels(z_i, z_r)
  return (z, stats) if return_stats else z


def sample_images(cfg: ModelConfig, params, keys, y, s: SamplerConfig = SamplerConfig(), return_stats=False):
  """Images (B, H, W, c) in model space [, stats of ``sample_latents``]."""
  z, stats = sample_latents(cfg, params, keys, y, s, return_stats=True)
  x = decode_latents(cfg, params, z, y)
  return (x, stats) if return_stats else x


def sample_keys(seed: int, start: int, count: int):
  """Per-sample keys: sample j of a run with ``seed`` always gets fold_in(key(seed), j)."""
  base = jax.random.key(seed)
  return jax.vmap(lambda j: jax.random.fold_in(base, j))(jnp.arange(start, start + count))


# Keys of ``config.sample`` (and of the CLI's --sampler) that configure sampling; others (per_class, seed) do not.
SAMPLER_KEYS = ("guidance", "cfg", "s_c", "s_u", "t_pi", "t_sigma", "t_pi_v", "t_sigma_v", "t_s",
                "redundant_candidates", "redundant_var_scale", "naive_proposals")


def sampler_from_config(sc) -> SamplerConfig:
  """``config.sample`` (ConfigDict or dict) -> SamplerConfig; missing keys take the SamplerConfig defaults."""
  sc = dict(sc)
  ds, dc = SamplerConfig(), ResamplingCFG()

  def get(k, default, typ):
    v = sc.get(k, default)
    if typ is int:
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v):
        raise ValueError(f"{k}={v!r} must be an integer")
      return int(v)
    return typ(v)

  cfg = ResamplingCFG(w=get("cfg", dc.w, float), s_c=get("s_c", dc.s_c, int), s_u=get("s_u", dc.s_u, int),
                      t_pi=get("t_pi", dc.t_pi, float), t_sigma=get("t_sigma", dc.t_sigma, float),
                      t_pi_v=get("t_pi_v", dc.t_pi_v, float), t_sigma_v=get("t_sigma_v", dc.t_sigma_v, float),
                      t_s=get("t_s", dc.t_s, float))
  s = SamplerConfig(guidance=get("guidance", ds.guidance, str), cfg=cfg,
                    redundant_candidates=get("redundant_candidates", ds.redundant_candidates, int),
                    redundant_var_scale=get("redundant_var_scale", ds.redundant_var_scale, float),
                    naive_proposals=get("naive_proposals", ds.naive_proposals, int))
  validate_sampler(s)
  return s
