"""Sampling: AR decode with a KV cache under one ``lax.scan`` (optionally guided), then the exact AF
inverse.

Shape letters: B samples, N tokens, d_I / d_R informative / redundant dims.

Guidance modes (``SamplerConfig.guidance``):
  * ``none``        ancestral sampling from p(z | y) with temperatures (t_pi on mixture logits,
                    t_sigma on stds);
  * ``resampling``  FARMER's resampling CFG (paper Algorithm 1), see ``guidance.py``;
  * ``naive``       JetFormer's per-dimension rejection-sampled CFG.
Guided modes run the conditional and unconditional streams as ONE doubled batch [cond; uncond]
sharing one KV cache; the chosen token is written into both halves so the streams stay aligned.

Randomness is per sample: sample b uses ``keys[b]`` only (folded with the token index), so a sample
depends on its own key, not on the batch it was drawn in.
"""

import dataclasses

import jax
import jax.numpy as jnp

from farmer_jax.config.schema import ModelConfig, SamplerConfig
from farmer_jax.model import Farmer, decode_latents, null_labels
from farmer_jax.prior import gmm
from farmer_jax.reduction.split import merge_channels
from farmer_jax.sampling.guidance import naive_cfg_draw, resample, resample_shared


# The redundant token's resampling weights score its K_R components this many at a time: with the
# ImageNet presets' K_R = 200 and d_R = 640, scoring all at once held 3.2 GB per sample.
REDUNDANT_BLOCK = 8


def _split(g: gmm.GMM, b):
  """[cond; uncond] mixtures batched (2B,) -> (cond (B,), uncond (B,))."""
  return jax.tree.map(lambda a: a[:b], g), jax.tree.map(lambda a: a[b:], g)


def _naive(s: SamplerConfig):
  """JetFormer's CFG draw for one token under ``s``: (key, g_c, g_u) -> (D,)."""
  c = s.cfg
  return lambda k, gc, gu: naive_cfg_draw(k, gc, gu, c.w, s.naive_proposals, t_pi=c.t_pi,
                                          t_sigma=c.t_sigma)


def draw_informative(keys, g: gmm.GMM, b: int, s: SamplerConfig):
  """One informative token per sample. keys (B,); g batched (B,) [none] or (2B,) [cond; uncond]
  [guided].

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
  return jax.vmap(_naive(s))(keys, g_c, g_u), None


def token_keys(keys, n):
  """keys (B,) -> (B, n): token i of sample b draws with ``fold_in(keys[b], i)``."""
  return jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(n)))(keys)


def draw_redundant(keys, n, g: gmm.GMM, s: SamplerConfig, floor: float = 1e-6):
  """The n redundant tokens of each sample, i.i.d. given the shared GMM (the model's factorisation).

  keys (B,), one per sample (token i draws with ``fold_in(keys[b], i)``); g the shared redundant
  GMM batched (B,) [none] or (2B,) [cond; uncond] [guided]. ``redundant_var_scale`` first
  multiplies the variances of both mixtures (std floored at ``floor``). Under resampling CFG
  (``redundant_candidates`` per group):
    * ``redundant_pool='shared'`` (Algorithm 1 as written): ONE pool per sample, drawn with
      ``keys[b]`` itself, and every token picks its candidate from it (``resample_shared``);
    * ``'per_token'``: every token is its own draw over its own fresh pool.
  Returns (z_r (B, n, d_R), stats): {} unguided; under resampling CFG ``ess_redundant`` (B,), the
  pool's effective sample size (shared) or its mean over the tokens (per_token), and
  ``redundant_distinct`` (B,), the distinct candidates the n tokens picked (shared only; n per
  token).
  """
  b = keys.shape[0]
  c = s.cfg
  g = gmm.scale_variance(g, s.redundant_var_scale, floor)
  tkeys = token_keys(keys, n)                                                    # (B, n)
  if s.guidance == "none":
    gt = gmm.with_temperature(g, c.t_pi, c.t_sigma)
    return jax.vmap(lambda kk, gl: jax.vmap(lambda k: gmm.sample(k, gl))(kk))(tkeys, gt), {}
  g_c, g_u = _split(g, b)
  m = s.redundant_candidates
  if s.guidance == "resampling" and s.redundant_pool == "shared":
    z, ess, idx = jax.vmap(
        lambda k, kk, gc, gu: resample_shared(k, kk, gc, gu, c, m, m, block=REDUNDANT_BLOCK))(
            keys, tkeys, g_c, g_u)
    return z, {"ess_redundant": ess, "redundant_distinct": distinct_count(idx, 2 * m)}
  if s.guidance == "resampling":
    z, ess = jax.vmap(lambda kk, gc, gu: resample(kk, gc, gu, c, m, m, block=REDUNDANT_BLOCK))(
        tkeys, g_c, g_u)
    return z, {"ess_redundant": jnp.mean(ess, axis=-1)}
  draw = _naive(s)
  return jax.vmap(lambda kk, gc, gu: jax.vmap(lambda k: draw(k, gc, gu))(kk))(tkeys, g_c, g_u), {}


def distinct_count(idx, size):
  """Distinct values per row of integer indices idx (B, n) in [0, size) -> (B,) int32."""
  hits = jax.vmap(lambda i: jnp.zeros((size,), jnp.int32).at[i].set(1))(idx)
  return jnp.sum(hits, axis=-1)


def standard_normal_latents(cfg: ModelConfig, keys, s: SamplerConfig, latent_var=None):
  """The latents of a ``prior='standard_normal'`` model: z (B, N, d) in AR order, sample b drawn
  from ``keys[b]`` as t_sigma * sqrt(latent_var) * N(0, I). ``latent_var`` (N, d) in the AF's
  output order (TARFlow's VP models keep it as the ``var`` buffer; None = ones)."""
  shape = (cfg.num_tokens, cfg.token_dim)
  z = s.cfg.t_sigma * jax.vmap(lambda k: jax.random.normal(k, shape))(keys)
  if latent_var is not None:
    z = z * jnp.sqrt(jnp.asarray(latent_var, jnp.float32))
  return z[:, ::-1] if cfg.ar_flip else z


def sample_latents(cfg: ModelConfig, params, keys, y, s: SamplerConfig = SamplerConfig(),
                   return_stats=False, latent_var=None):
  """keys (B,) PRNG keys, y (B,) labels -> z (B, N, d) in AR order [, stats].

  Keys: token i (0-based) of sample b draws with ``fold_in(keys[b], i)``; the redundant token i with
  ``fold_in(fold_in(keys[b], N), i)``, and a shared redundant pool with ``fold_in(keys[b], N)``.
  ``stats`` (resampling CFG only; empty otherwise): ``ess_informative`` (B,) = mean over the N
  informative draws of the weights' effective sample size (out of s_c + s_u), and those of
  ``draw_redundant`` (``ess_redundant`` out of 2 * redundant_candidates).
  """
  s.check()
  s.check_model(cfg)
  if cfg.prior == "standard_normal":
    z = standard_normal_latents(cfg, keys, s, latent_var)
    return (z, {}) if return_stats else z
  model = Farmer(cfg)
  run = lambda method, *args: model.apply({"params": params}, *args, method=method)
  b = y.shape[0]
  guided = s.guidance != "none"
  y_run = jnp.concatenate([y, null_labels(cfg, b)]) if guided else y
  h, cache = run(Farmer.ar_prefill, y_run)
  n = cfg.num_tokens

  def step(carry, i):
    h, cache = carry
    g = run(Farmer.gmm_informative, h)
    keys_i = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
    tok, ess = draw_informative(keys_i, g, b, s)                                # (B, d_I)
    feed = jnp.concatenate([tok, tok]) if guided else tok
    h, cache = run(Farmer.ar_step, feed[:, None], i, cache)
    return (h, cache), (tok, ess)

  (h, _), (z_i, ess_i) = jax.lax.scan(step, (h, cache), jnp.arange(n))
  z_i = jnp.swapaxes(z_i, 0, 1)                                                   # (B, N, d_I)
  stats = {}
  if ess_i is not None:
    stats["ess_informative"] = jnp.mean(ess_i, axis=0)
  if cfg.dimred == "none":
    z = z_i
  else:
    rkeys = jax.vmap(lambda k: jax.random.fold_in(k, n))(keys)                    # (B,)
    if cfg.dimred == "jetformer":
      # z^R ~ N(0, I) scaled like any other component: std * t_sigma * sqrt(redundant_var_scale)
      std = s.cfg.t_sigma * jnp.sqrt(jnp.float32(s.redundant_var_scale))
      z_r = std * jax.vmap(jax.vmap(lambda k: jax.random.normal(k, (cfg.d_r,))))(
          token_keys(rkeys, n))
    else:
      z_r, r_stats = draw_redundant(rkeys, n, run(Farmer.gmm_redundant, h), s, cfg.scale_floor)
      stats.update(r_stats)
    z = merge_channels(z_i, z_r)
  return (z, stats) if return_stats else z


def sample_images(cfg: ModelConfig, params, keys, y, s: SamplerConfig = SamplerConfig(),
                  return_stats=False, student_params=None, latent_var=None):
  """Images (B, H, W, c) in model space [, stats of ``sample_latents``]: the latents through
  ``invert`` (``s.inverse``), then ``denoise``."""
  z, stats = sample_latents(cfg, params, keys, y, s, return_stats=True, latent_var=latent_var)
  x, iters = invert(cfg, params, z, y, s, student_params)
  if iters is not None:   # per block, shared by the batch: one row per sample
    stats = dict(stats, jacobi_iters=jnp.broadcast_to(iters, (x.shape[0],) + iters.shape))
  x = denoise(cfg, params, x, y, s.denoise_sigma)
  return (x, stats) if return_stats else x


def invert(cfg: ModelConfig, params, z, y, s: SamplerConfig = SamplerConfig(),
           student_params=None):
  """Latents z (B, N, d) in AR order -> (images (B, H, W, c) in model space, Jacobi iterations per
  block or None) by the AF inverse ``s.inverse``: exact or Jacobi computing in ``s.decode_dtype``,
  guided when ``s.af_guidance`` > 0 (TARFlow's guided reverse), or the distilled student's."""
  if s.inverse == "student":
    if student_params is None:
      raise ValueError("inverse='student' needs the distilled student's params (an export made "
                       "with `farmer_jax export --student=DISTILL_RUN`)")
    from farmer_jax.distill.student import student_decode
    return student_decode(cfg, student_params, z, y), None
  return decode_latents(decode_config(cfg, s.decode_dtype), params, z, y, s.inverse,
                        s.jacobi_tol, s.jacobi_max_iters, s.af_guide)


def decode_config(cfg: ModelConfig, dtype: str):
  """The model config the AF inverse runs with: ``cfg`` computing in ``dtype`` (the params are
  fp32 either way; cuDNN's fused attention takes bf16 only, so in fp32 XLA's attention)."""
  if cfg.dtype == dtype:
    return cfg
  attention = "xla" if dtype == "float32" and cfg.attention == "cudnn" else cfg.attention
  return dataclasses.replace(cfg, dtype=dtype, attention=attention)


def denoise(cfg: ModelConfig, params, x, y, sigma):
  """TARFlow's self-denoising (apple/ml-tarflow sample.ipynb, evaluate_fid.py): a model trained on
  images plus N(0, sigma^2) noise denoises its samples by one Tweedie step, x + sigma^2
  grad_x log p(x | y), the gradient through the exact likelihood (one forward + backward). x (B, H,
  W, c) in model space; sigma 0 returns x unchanged."""
  if not sigma:
    return x
  model = Farmer(cfg)
  log_p = lambda xx: jnp.sum(model.apply({"params": params}, xx, y)["log_prob"])
  return x + jnp.float32(sigma) ** 2 * jax.grad(log_p)(x.astype(jnp.float32))


def sample_keys(seed: int, start: int, count: int):
  """Per-sample keys: sample j of a run with ``seed`` always gets fold_in(key(seed), j)."""
  base = jax.random.key(seed)
  return jax.vmap(lambda j: jax.random.fold_in(base, j))(jnp.arange(start, start + count))
