"""Sampling: AR decode with a KV cache under one ``lax.scan`` (optionally guided), then the exact AF inverse.

Shape letters: B samples, M prefix length, N tokens, d_I / d_R informative / redundant dims, C AR width.

Guidance modes (``SamplerConfig.guidance``):
  * ``none``        ancestral sampling from p(z | y) with temperatures (t_pi on mixture logits, t_sigma on variances);
  * ``resampling``  FARMER's resampling CFG (paper Algorithm 1), see ``guidance.py``;
  * ``naive``       JetFormer's per-dimension rejection-sampled CFG.
Guided modes run the conditional and unconditional streams as ONE doubled batch [cond; uncond] sharing one KV
cache; the chosen token is written into both halves so the streams stay aligned.

Randomness is per sample: sample b uses ``keys[b]`` only (folded with the token index), so a sample depends on its
own key, not on the batch it was drawn in.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from farmer_jax.config import ModelConfig
from farmer_jax.model import decode_latents
from farmer_jax.nn.transformer import init_cache
from farmer_jax.prior import gmm
from farmer_jax.prior.ar import ARPrior
from farmer_jax.reduction.split import merge_channels
from farmer_jax.sampling.guidance import ResamplingCFG, naive_cfg_draw, resample_draw

GUIDANCE_MODES = ("none", "resampling", "naive")


class SamplerConfig(NamedTuple):
  guidance: str = "none"
  cfg: ResamplingCFG = ResamplingCFG()   # w and temperatures; proposal temps also used by 'none' and 'naive'
  redundant_candidates: int = 256        # per-group pool size for the shared redundant GMM (resampling CFG)
  redundant_var_scale: float = 1.0       # paper Fig. 7: scales the redundant group's variances before sampling
  naive_proposals: int = 1000


def _scale_var(g: gmm.GMM, s):
  return gmm.GMM(g.logits, g.loc, g.scale * jnp.sqrt(jnp.asarray(s, jnp.float32)))


def _split(g: gmm.GMM, b):
  return (gmm.GMM(g.logits[:b], g.loc[:b], g.scale[:b]), gmm.GMM(g.logits[b:], g.loc[b:], g.scale[b:]))


def validate_sampler(s: SamplerConfig):
  if s.guidance not in GUIDANCE_MODES:
    raise ValueError(f"guidance={s.guidance!r} is unknown; use one of {GUIDANCE_MODES}")
  c = s.cfg
  if c.w < 0:
    raise ValueError(f"cfg={c.w} must be >= 0 (0 = no guidance strength)")
  for name in ("t_pi", "t_sigma", "t_pi_v", "t_sigma_v", "t_s"):
    if not getattr(c, name) > 0:
      raise ValueError(f"temperature {name}={getattr(c, name)} must be > 0")
  if s.guidance == "resampling" and (c.s_c < 0 or c.s_u < 0 or c.s_c + c.s_u < 1):
    raise ValueError(f"candidate counts s_c={c.s_c}, s_u={c.s_u} must be >= 0 with s_c + s_u >= 1")
  if s.redundant_var_scale < 0:
    raise ValueError(f"redundant_var_scale={s.redundant_var_scale} must be >= 0")


def _draw_token(keys, g, b, s: SamplerConfig, num_draws=None, pool=None):
  """keys (B,), g batched over B (none) or 2B (guided) -> (B, D) or (B, num_draws, D)."""
  c = s.cfg
  if s.guidance == "none":
    gt = gmm.with_temperature(g, c.t_pi, c.t_sigma)
    shape = () if num_draws is None else (num_draws,)
    return jax.vmap(lambda k, gl: gmm.sample(k, gl, shape))(keys, gt)
  g_c, g_u = _split(g, b)
  if s.guidance == "resampling":
    nd = 1 if num_draws is None else num_draws
    out = jax.vmap(lambda k, gc, gu: resample_draw(k, gc, gu, c, nd, pool, pool))(keys, g_c, g_u)
    return out[:, 0] if num_draws is None else out
  draw = lambda k, gc, gu: naive_cfg_draw(k, gc, gu, c.w, s.naive_proposals, t_pi=c.t_pi, t_sigma=c.t_sigma)
  if num_draws is None:
    return jax.vmap(draw)(keys, g_c, g_u)
  return jax.vmap(lambda k, gc, gu: jax.vmap(lambda kk: draw(kk, gc, gu))(jax.random.split(k, num_draws)))(
      keys, g_c, g_u)


def sample_latents(cfg: ModelConfig, params, keys, y, s: SamplerConfig = SamplerConfig()):
  """keys (B,) PRNG keys, y (B,) labels -> z (B, N, d) in AR order."""
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

  def step(carry, i):
    h, cache = carry
    g = prior.apply(pp, h, method=ARPrior.gmm_informative)
    tok = _draw_token(jax.vmap(lambda k: jax.random.fold_in(k, i))(keys), g, b, s)      # (B, d_I)
    feed = jnp.concatenate([tok, tok]) if guided else tok
    h, cache = prior.apply(pp, feed[:, None], i, cache, method=ARPrior.decode_step)
    return (h, cache), tok

  (h, _), z_i = jax.lax.scan(step, (h, cache), jnp.arange(cfg.num_tokens))
  z_i = jnp.swapaxes(z_i, 0, 1)                                                   # (B, N, d_I)
  if cfg.dimred == "none":
    return z_i
  rkeys = jax.vmap(lambda k: jax.random.fold_in(k, cfg.num_tokens))(keys)
  if cfg.dimred == "jetformer":
    std = jnp.sqrt(s.cfg.t_sigma * s.redundant_var_scale)
    z_r = std * jax.vmap(lambda k: jax.random.normal(k, (cfg.num_tokens, cfg.d_r)))(rkeys)
  else:
    g = _scale_var(prior.apply(pp, h, method=ARPrior.gmm_redundant), s.redundant_var_scale)
    z_r = _draw_token(rkeys, g, b, s, num_draws=cfg.num_tokens, pool=s.redundant_candidates)  # N draws, 1 pool
  return merge_channels(z_i, z_r)


def sample_images(cfg: ModelConfig, params, keys, y, s: SamplerConfig = SamplerConfig()):
  """Images (B, H, W, c) in model space."""
  z = sample_latents(cfg, params, keys, y, s)
  return decode_latents(cfg, params, z, y)


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
  get = lambda k, default, typ: typ(sc.get(k, default))
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
