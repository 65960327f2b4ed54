"""The training loss is exactly the negative log-density, checked against a separate slow reference
path: brute-force Jacobian log-det of the AF, token-by-token KV-cache decoding of the AR prior, and
scipy densities. Also: a fresh model is an identity flow under an N(0, I) prior; the AR prior's
token order relative to the last AF block (model.ar_order), found on spatial positions."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from conftest import init_farmer, perturb, variant
from farmer_jax.flow.patchify import patchify
from farmer_jax.model import Farmer, flow_label, make_flow


def _scipy_gmm_logpdf(g, b, x):
  """log density of GMM g (batch index b) at x, computed with scipy in float64."""
  w = np.asarray(jax.nn.log_softmax(g.logits[b]), np.float64)
  loc, scale = np.asarray(g.loc[b], np.float64), np.asarray(g.scale[b], np.float64)
  comps = [
      w[k] + stats.norm.logpdf(np.asarray(x, np.float64), loc[k], scale[k]).sum()
      for k in range(len(w))
  ]
  return logsumexp(comps)


def reference_log_prob(cfg, model, params, x, y):
  b = x.shape[0]
  n, d, di = cfg.num_tokens, cfg.token_dim, cfg.d_i
  flow_only = lambda m, t, y: m.flow(t, flow_label(m.cfg, y))
  flow_apply = jax.jit(lambda t, y: model.apply({"params": params}, t, y, method=flow_only))
  tokens = patchify(x, cfg.patch_size)
  z, _ = flow_apply(tokens, y)
  jac = jax.jit(jax.jacfwd(lambda v, yy: flow_apply(v.reshape(1, n, d), yy)[0].reshape(-1)))
  out = []
  for e in range(b):
    _, logdet = np.linalg.slogdet(np.asarray(jac(tokens[e].reshape(-1), y[e:e + 1]), np.float64))
    out.append(logdet)
  logdet = np.array(out)
  if cfg.ar_flip:
    z = z[:, ::-1]
  run = lambda method, *args: model.apply({"params": params}, *args, method=method)
  head = jax.jit(lambda h: run(Farmer.gmm_informative, h))
  decode = jax.jit(lambda t, i, c: run(Farmer.ar_step, t, i, c))
  h, cache = run(Farmer.ar_prefill, y)
  lp = np.zeros(b)
  for i in range(n):
    g = head(h)
    lp += [_scipy_gmm_logpdf(g, e, z[e, i, :di]) for e in range(b)]
    h, cache = decode(z[:, i:i + 1, :di], i, cache)
  if cfg.dimred == "farmer":
    g = run(Farmer.gmm_redundant, h)
    lp += [sum(_scipy_gmm_logpdf(g, e, z[e, i, di:]) for i in range(n)) for e in range(b)]
  elif cfg.dimred == "jetformer":
    lp += stats.norm.logpdf(np.asarray(z[:, :, di:], np.float64)).sum((1, 2))
  return lp + logdet


@functools.lru_cache(maxsize=None)
def _built(dimred):
  """(cfg, model, fresh params, jitted apply) per dimred mode, shared by the tests below so each
  compiles once."""
  cfg = variant(dimred=dimred, flow_class_conditional=(dimred == "farmer"))
  model, params = init_farmer(cfg, seed=7, scale=0.0)
  return cfg, model, params, jax.jit(model.apply)


@pytest.mark.parametrize("dimred", ["farmer", pytest.param("jetformer", marks=pytest.mark.slow),
                                    pytest.param("none", marks=pytest.mark.slow)])
def test_loss_is_exact_negative_log_density(dimred):
  cfg, model, params, apply = _built(dimred)
  params = perturb(params, jax.random.key(107), 0.05)
  x = jax.random.uniform(
      jax.random.key(0), (2, cfg.image_size, cfg.image_size, cfg.channels), minval=-1, maxval=1)
  y = jnp.array([1, cfg.null_class])
  out = apply({"params": params}, x, y)
  ref = reference_log_prob(cfg, model, params, x, y)
  np.testing.assert_allclose(np.asarray(out["log_prob"], np.float64), ref, rtol=2e-5, atol=2e-3)
  # and the components are what the loss says they are
  np.testing.assert_allclose(
      out["log_prob"], out["log_prob_i"] + out["log_prob_r"] + out["logdet"], rtol=1e-6)


@pytest.mark.slow  # moved out of the default suite to keep it <= 10 min on 2 cores
def test_dtypes_bf16_compute_fp32_params_and_remat():
  """Params are fp32 whatever the compute dtype; bf16 compute stays close to fp32; remat changes
  nothing."""
  cfg = variant()
  model, params = init_farmer(cfg, seed=1, scale=0.05)
  x = jax.random.uniform(
      jax.random.key(0), (2, cfg.image_size, cfg.image_size, cfg.channels), minval=-1, maxval=1)
  y = jnp.array([0, 2])
  loss = lambda m, p: -jnp.mean(m.apply({"params": p}, x, y)["log_prob"]) / cfg.num_dims
  ref, g_ref = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)

  bf_model, bf_params = init_farmer(variant(dtype="bfloat16"), seed=1, scale=0.05)
  chex.assert_type(jax.tree.leaves(bf_params), jnp.float32)
  out = jax.jit(bf_model.apply)({"params": params}, x, y)
  chex.assert_type([out["log_prob"], out["logdet"]], jnp.float32)
  np.testing.assert_allclose(-jnp.mean(out["log_prob"]) / cfg.num_dims, ref, rtol=0.02)

  rm_model, _ = init_farmer(variant(remat=True), seed=1, scale=0.0)
  val, g = jax.jit(jax.value_and_grad(lambda p: loss(rm_model, p)))(params)
  np.testing.assert_allclose(val, ref, rtol=1e-6)
  chex.assert_trees_all_close(g, g_ref, rtol=1e-4, atol=1e-6)


def _flow_params(cfg, flow, random_blocks, seed):
  """AF params: every leaf random, except that ``proj_out`` (kernel and bias) is zero in the blocks
  not listed in ``random_blocks``, which makes those blocks the identity. Built from shapes only, so
  nothing is compiled."""
  shapes = nn.unbox(
      jax.eval_shape(flow.init, jax.random.key(0), jnp.zeros((1, cfg.num_tokens, cfg.token_dim))))
  rng = np.random.default_rng(seed)
  p = jax.tree.map(lambda s: rng.normal(0.0, 0.1, s.shape).astype(np.float32), shapes["params"])
  keep = np.isin(np.arange(cfg.flow_blocks), random_blocks)
  for k in ("kernel", "bias"):
    w = p["blocks"]["proj_out"][k]
    p["blocks"]["proj_out"][k] = w * keep.reshape((-1,) + (1,) * (w.ndim - 1))
  return p


def _last_block_order(cfg, flow):
  """Raster positions in the order the LAST AF block processes them, found by probing, not from the
  flip code.

  All blocks but the last are the identity. Output token i moves with input token j iff the last
  block processes j no later than i, so the number of outputs that perturbing input j moves is j's
  rank counted from the end.
  """
  n, d = cfg.num_tokens, cfg.token_dim
  probe = _flow_params(cfg, flow, random_blocks=[cfg.flow_blocks - 1], seed=cfg.flow_blocks)
  x = np.random.default_rng(1).normal(size=(1, n, d)).astype(np.float32)
  xs = np.concatenate([x, x + 0.5 * np.eye(n, dtype=np.float32)[:, :, None]],
                      axis=0)  # 1 + j: token j moved
  z = np.asarray(jax.jit(flow.apply)({"params": probe}, xs)[0])
  moves = np.abs(z[1:] - z[:1]).max(-1) > 0  # [j, i]: output i moved by input j
  moved = moves.sum(1)
  np.testing.assert_array_equal(
      np.sort(moved), np.arange(1, n + 1), err_msg="the last block is not a total order")
  return np.argsort(
      -moved)  # first processed (moves every output) ... last processed (moves only itself)


@pytest.mark.parametrize("blocks", [3, 2])
def test_ar_order_relative_to_last_af_block(blocks):
  """model.ar_order, checked on spatial positions for an odd and an even block count: the AR prior's
  first token is the one the last AF block processes last ('alternate': the AR prior continues the
  alternation as block n + 1) or first ('same'); in fact the whole AR order is the last block's
  order reversed ('alternate') or unchanged."""
  cfg = variant(flow_blocks=blocks)
  flow = make_flow(cfg)
  block_order = _last_block_order(cfg, flow)
  # an image whose patch at raster position p (row-major over the (H/P, W/P) patch grid) holds the
  # value p
  g, pz = cfg.image_size // cfg.patch_size, cfg.patch_size
  img = np.kron(np.arange(g * g, dtype=np.float32).reshape(g, g), np.ones((pz, pz), np.float32))
  img = np.repeat(img[None, :, :, None], cfg.channels, axis=-1)
  identity = {"flow": _flow_params(cfg, flow, random_blocks=[], seed=0)}
  y = jnp.zeros((1,), jnp.int32)
  for order, expect in (("alternate", block_order[::-1]), ("same", block_order)):
    model = Farmer(variant(flow_blocks=blocks, ar_order=order))
    z, _ = jax.jit(lambda p: model.apply({"params": p}, img, y, method=Farmer.encode))(identity)
    ar_positions = np.asarray(z[0, :, 0])
    np.testing.assert_array_equal(
        np.asarray(z[0]), np.broadcast_to(ar_positions[:, None], z.shape[1:]))
    print(f"blocks={blocks} ar_order={order}: last AF block order {block_order.tolist()}, "
          f"AR order {ar_positions.astype(int).tolist()}")
    assert ar_positions[0] == expect[0], (order, ar_positions[0], block_order)
    np.testing.assert_array_equal(ar_positions, expect)


@pytest.mark.parametrize("dimred", ["farmer", "jetformer", "none"])
def test_fresh_model_is_identity_flow_with_standard_normal_prior(dimred):
  """Zero-init AF and GMM heads: log_prob_i + log_prob_r is the N(0, I) log-density of all N * d
  latent dims (computed here in float64 from the pixels, since the identity flow only permutes
  tokens), the log-det is exactly 0, and so log_prob equals that density too."""
  cfg, _, params, apply = _built(dimred)
  x = jax.random.uniform(
      jax.random.key(6), (2, cfg.image_size, cfg.image_size, cfg.channels), minval=-1, maxval=1)
  x = x * jnp.array([1.0, 3.0])[:, None, None, None]         # the second example reaches |x| = 3
  out = apply({"params": params}, x, jnp.array([1, cfg.null_class]))
  ref = stats.norm.logpdf(np.asarray(x, np.float64)).sum((1, 2, 3))
  np.testing.assert_array_equal(out["logdet"], 0.0)
  np.testing.assert_allclose(
      np.asarray(out["log_prob_i"] + out["log_prob_r"], np.float64), ref, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out["log_prob"], np.float64), ref, rtol=1e-6)
  if dimred != "none":
    assert float(jnp.abs(
        out["log_prob_r"]).min()) > 1.0  # the redundant term is really part of the sum
