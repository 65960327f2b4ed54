"""The training loss is exactly the negative log-density, checked against a separate slow reference path:
brute-force Jacobian log-det of the AF, token-by-token KV-cache decoding of the AR prior, and scipy densities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from conftest import init_farmer, variant
from farmer_jax.flow.patchify import patchify
from farmer_jax.nn.transformer import init_cache
from farmer_jax.prior.ar import ARPrior


def _scipy_gmm_logpdf(g, b, x):
  """log density of GMM g (batch index b) at x, computed with scipy in float64."""
  w = np.asarray(jax.nn.log_softmax(g.logits[b]), np.float64)
  loc, scale = np.asarray(g.loc[b], np.float64), np.asarray(g.scale[b], np.float64)
  comps = [w[k] + stats.norm.logpdf(np.asarray(x, np.float64), loc[k], scale[k]).sum() for k in range(len(w))]
  return logsumexp(comps)


def reference_log_prob(cfg, model, params, x, y):
  b = x.shape[0]
  n, d, di = cfg.num_tokens, cfg.token_dim, cfg.d_i
  flow_apply = jax.jit(lambda t, y: model.apply({"params": params}, t, y,
                                                method=lambda m, t, y: m.flow(t, m.flow_label(y))))
  tokens = patchify(x, cfg.patch_size)
  z, _ = flow_apply(tokens, y)
  jac = jax.jit(jax.jacfwd(lambda v, yy: flow_apply(v.reshape(1, n, d), yy)[0].reshape(-1)))
  out = []
  for e in range(b):
    _, logdet = np.linalg.slogdet(np.asarray(jac(tokens[e].reshape(-1), y[e:e + 1]), np.float64))
    out.append(logdet)
  logdet = np.array(out)
  if cfg.final_flip:
    z = z[:, ::-1]
  prior = ARPrior(cfg)
  pp = {"params": params["prior"]}
  cache = init_cache(cfg.ar_depth, b, cfg.class_repeats + n, cfg.ar_heads, cfg.ar_width // cfg.ar_heads)
  head = jax.jit(lambda h: prior.apply(pp, h, method=ARPrior.gmm_informative))
  decode = jax.jit(lambda t, i, c: prior.apply(pp, t, i, c, method=ARPrior.decode_step))
  h, cache = prior.apply(pp, y, cache, method=ARPrior.prefill)
  lp = np.zeros(b)
  for i in range(n):
    g = head(h)
    lp += [_scipy_gmm_logpdf(g, e, z[e, i, :di]) for e in range(b)]
    h, cache = decode(z[:, i:i + 1, :di], i, cache)
  if cfg.dimred == "farmer":
    g = prior.apply(pp, h, method=ARPrior.gmm_redundant)
    lp += [sum(_scipy_gmm_logpdf(g, e, z[e, i, di:]) for i in range(n)) for e in range(b)]
  elif cfg.dimred == "jetformer":
    lp += stats.norm.logpdf(np.asarray(z[:, :, di:], np.float64)).sum((1, 2))
  return lp + logdet


@pytest.mark.parametrize("dimred", ["farmer", "jetformer", "none"])
def test_loss_is_exact_negative_log_density(dimred):
  cfg = variant(dimred=dimred, flow_class_conditional=(dimred == "farmer"))
  model, params = init_farmer(cfg, seed=7, scale=0.05)
  x = jax.random.uniform(jax.random.key(0), (2, cfg.image_size, cfg.image_size, cfg.channels), minval=-1, maxval=1)
  y = jnp.array([1, cfg.null_class])
  out = jax.jit(model.apply)({"params": params}, x, y)
  ref = reference_log_prob(cfg, model, params, x, y)
  np.testing.assert_allclose(np.asarray(out["log_prob"], np.float64), ref, rtol=2e-5, atol=2e-3)
  # and the components are what the loss says they are
  np.testing.assert_allclose(out["log_prob"], out["log_prob_i"] + out["log_prob_r"] + out["logdet"], rtol=1e-6)


def test_dtypes_bf16_compute_fp32_params_and_remat():
  """Params are fp32 whatever the compute dtype; bf16 compute stays close to fp32; remat changes nothing."""
  cfg = variant()
  model, params = init_farmer(cfg, seed=1, scale=0.05)
  x = jax.random.uniform(jax.random.key(0), (2, cfg.image_size, cfg.image_size, cfg.channels), minval=-1, maxval=1)
  y = jnp.array([0, 2])
  loss = lambda m, p: -jnp.mean(m.apply({"params": p}, x, y)["log_prob"]) / cfg.num_dims
  ref, g_ref = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)

  bf_model, bf_params = init_farmer(variant(dtype="bfloat16"), seed=1, scale=0.05)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(bf_params))
  out = jax.jit(bf_model.apply)({"params": params}, x, y)
  assert out["log_prob"].dtype == jnp.float32 and out["logdet"].dtype == jnp.float32
  np.testing.assert_allclose(-jnp.mean(out["log_prob"]) / cfg.num_dims, ref, rtol=0.02)

  rm_model, _ = init_farmer(variant(remat=True), seed=1, scale=0.0)
  val, g = jax.jit(jax.value_and_grad(lambda p: loss(rm_model, p)))(params)
  np.testing.assert_allclose(val, ref, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, g_ref)
