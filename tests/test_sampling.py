"""Sampling: guidance maths (moment tests against closed forms), doubled-batch decode == slow reference decode,
per-sample determinism independent of the batch, and sampled latents re-encode through the AF."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from farmer_jax.model import Farmer, decode_latents
from farmer_jax.nn.transformer import init_cache
from farmer_jax.prior import gmm
from farmer_jax.prior.ar import ARPrior
from farmer_jax.sampling.guidance import ResamplingCFG, naive_cfg_draw, resample_draw
from farmer_jax.sampling.sampler import SamplerConfig, sample_images, sample_keys, sample_latents


def _gauss(mu, sd):
  mu, sd = jnp.atleast_1d(jnp.asarray(mu, jnp.float32)), jnp.atleast_1d(jnp.asarray(sd, jnp.float32))
  return gmm.GMM(jnp.zeros((1,)), mu[None], sd[None])


def _many(draw, n, seed=0):
  return np.asarray(jax.jit(jax.vmap(draw))(jax.random.split(jax.random.key(seed), n)))


def test_resampling_w0_samples_the_conditional_mixture():
  """w = 0: conditional candidates get weight 1, unconditional ones p_c/p_u, so the resampled law is p_c."""
  g_c = gmm.GMM(jnp.log(jnp.array([0.3, 0.7])), jnp.array([[-1.0, 2.0], [1.5, -0.5]]),
                jnp.array([[0.4, 0.6], [0.5, 0.3]]))
  g_u = gmm.GMM(jnp.zeros((1,)), jnp.zeros((1, 2)), jnp.full((1, 2), 2.0))
  p = ResamplingCFG(w=0.0, s_c=256, s_u=256)
  z = _many(lambda k: resample_draw(k, g_c, g_u, p)[0], 50_000)
  w = np.array([0.3, 0.7])
  loc = np.array([[-1.0, 2.0], [1.5, -0.5]])
  sd = np.array([[0.4, 0.6], [0.5, 0.3]])
  mean = (w[:, None] * loc).sum(0)
  var = (w[:, None] * (sd ** 2 + loc ** 2)).sum(0) - mean ** 2
  # The pool is an exact sample of p_c only as s -> inf (sampling-importance-resampling is biased by O(1/s); at
  # s_c = s_u = 8 the mean is off by ~0.07, at 256 by ~0.005). Sampling std of the mean at 5e4 draws: ~0.006.
  # Tolerances: 0.03 on the mean (~2.5% of the std), 5% on the variance.
  np.testing.assert_allclose(z.mean(0), mean, atol=0.03)
  np.testing.assert_allclose(z.var(0), var, rtol=0.05)


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_resampling_cfg_approaches_guided_target(w):
  """p_c = N(1, 1), p_u = N(0, 1.5^2): p_c^{1+w} / p_u^w is Gaussian with precision (1+w) - w/2.25 and mean
  (1+w)/precision. With 64 + 64 candidates per draw, SIR bias is small; 60k draws give sampling std ~0.005."""
  g_c, g_u = _gauss(1.0, 1.0), _gauss(0.0, 1.5)
  lam = (1 + w) - w / 2.25
  mean, var = (1 + w) / lam, 1 / lam
  p = ResamplingCFG(w=w, s_c=64, s_u=64)
  z = _many(lambda k: resample_draw(k, g_c, g_u, p)[0, 0], 60_000)
  assert abs(z.mean() - mean) < 0.03 * (1 + mean)
  assert abs(z.var() - var) / var < 0.08
  assert z.mean() > 1.2            # guidance moves mass away from p_u, beyond p_c's mean


def test_naive_cfg_matches_closed_form():
  w = 2.0
  g_c, g_u = _gauss([1.0, -1.0], [1.0, 0.5]), _gauss([0.0, 0.0], [1.5, 1.0])
  z = _many(lambda k: naive_cfg_draw(k, g_c, g_u, w), 40_000)
  for j, (mc, sc, mu, su) in enumerate([(1.0, 1.0, 0.0, 1.5), (-1.0, 0.5, 0.0, 1.0)]):
    lam = (1 + w) / sc ** 2 - w / su ** 2
    mean = ((1 + w) * mc / sc ** 2 - w * mu / su ** 2) / lam
    assert abs(z[:, j].mean() - mean) < 0.03 * (1 + abs(mean))
    assert abs(z[:, j].var() * lam - 1.0) < 0.06


def _reference_guided_decode(cfg, params, keys, y, s):
  """Slow reference: per sample, separate batch-1 conditional and unconditional streams with their own caches,
  Python loop over tokens, drawing with the same per-sample/per-token keys as the sampler."""
  prior = ARPrior(cfg)
  pp = {"params": params["prior"]}
  prefill = jax.jit(lambda lab, c: prior.apply(pp, lab, c, method=ARPrior.prefill))
  head = jax.jit(lambda h: prior.apply(pp, h, method=ARPrior.gmm_informative))
  decode = jax.jit(lambda tok, i, c: prior.apply(pp, tok, i, c, method=ARPrior.decode_step))
  draw = jax.jit(lambda k, gc, gu: resample_draw(k, gc, gu, s.cfg, 1))
  out = []
  for b in range(y.shape[0]):
    caches, hs = [], []
    for lab in (y[b:b + 1], jnp.array([cfg.null_class])):
      c = init_cache(cfg.ar_depth, 1, cfg.class_repeats + cfg.num_tokens, cfg.ar_heads, cfg.ar_width // cfg.ar_heads)
      h, c = prefill(lab, c)
      hs.append(h)
      caches.append(c)
    toks = []
    for i in range(cfg.num_tokens):
      g_c, g_u = [jax.tree.map(lambda a: a[0], head(h)) for h in hs]
      tok = draw(jax.random.fold_in(keys[b], i), g_c, g_u)
      toks.append(tok[0])
      for j in range(2):
        hs[j], caches[j] = decode(tok[None], i, caches[j])
    out.append(jnp.stack(toks))
  return jnp.stack(out)


def test_doubled_batch_decode_equals_slow_reference(tiny):
  cfg, _, params = tiny
  s = SamplerConfig(guidance="resampling", cfg=ResamplingCFG(w=2.0, s_c=3, s_u=2, t_sigma=0.9, t_pi_v=0.5, t_s=1.1))
  y = jnp.array([0, 2])
  keys = sample_keys(7, 0, 2)
  z = jax.jit(lambda p, k, y: sample_latents(cfg, p, k, y, s))(params, keys, y)
  ref = _reference_guided_decode(cfg, params, keys, y, s)
  np.testing.assert_allclose(z[..., :cfg.d_i], ref, atol=1e-4)


@pytest.mark.parametrize("guidance", ["none", "resampling", "naive"])
def test_sampling_deterministic_and_batch_independent(tiny, guidance):
  cfg, _, params = tiny
  s = SamplerConfig(guidance=guidance, cfg=ResamplingCFG(w=1.5), redundant_candidates=16, naive_proposals=64)
  f = jax.jit(lambda p, k, y: sample_images(cfg, p, k, y, s))
  y = jnp.array([0, 2, 1])
  keys = sample_keys(0, 0, 3)
  a = f(params, keys, y)
  assert a.shape == (3, cfg.image_size, cfg.image_size, cfg.channels) and bool(jnp.isfinite(a).all())
  np.testing.assert_array_equal(a, f(params, keys, y))
  single = jax.jit(lambda p, k, y: sample_images(cfg, p, k, y, s))(params, keys[1:2], y[1:2])
  np.testing.assert_allclose(single[0], a[1], atol=1e-4)        # same key -> same sample, whatever the batch
  other = f(params, sample_keys(1, 0, 3), y)
  assert float(jnp.abs(other - a).max()) > 0


def test_sampled_latents_decode_and_reencode(tiny):
  """The sampler's images map back (through the AF forward) to the sampled latents."""
  cfg, model, params = tiny
  y = jnp.array([1, 0])
  z = sample_latents(cfg, params, sample_keys(3, 0, 2), y)
  x = decode_latents(cfg, params, z, y)
  z2, _ = model.apply({"params": params}, x, y, method=Farmer.encode)
  np.testing.assert_allclose(z2, z, atol=1e-4)


def test_bad_sampler_settings_raise():
  from farmer_jax.sampling.sampler import validate_sampler
  with pytest.raises(ValueError, match="cfg=-1"):
    validate_sampler(SamplerConfig(guidance="resampling", cfg=ResamplingCFG(w=-1.0)))
  with pytest.raises(ValueError, match="t_sigma=0"):
    validate_sampler(SamplerConfig(cfg=ResamplingCFG(t_sigma=0.0)))
  with pytest.raises(ValueError, match=r"guidance='cfg\+\+' is unknown"):
    validate_sampler(SamplerConfig(guidance="cfg++"))
