"""FARMER: autoregressive flow + AR GMM prior over the flow's latents, trained on the exact NLL.

Shape letters: B batch, H W image size, c channels, N tokens, d token dim, d_I / d_R informative /
redundant dims, C AR width.

    x (B, H, W, c) in model space --patchify--> (B, N, d) --AF--> z, logdet
      --[flip if cfg.ar_flip]--> z^I, z^R
    log p(x) = sum_i log p(z^I_i | z^I_<i, y) + sum_i log p(z^R_i | z^I, y) + logdet          (nats)

With ``cfg.prior == 'standard_normal'`` (TARFlow: a converted TARFlow checkpoint is exactly this)
there is no AR prior and no params besides the flow's: log p(x) = sum log N(z; 0, I) + logdet, the
whole prior term reported as ``log_prob_i`` and ``log_prob_r`` = 0.

Labels: AR labels are 0..num_classes-1 plus ``cfg.null_class`` (no class: the unconditional model,
CFG's unconditional stream, label drop); ``null_labels`` builds null labels, ``flow_label`` maps AR
labels to the AF's.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from farmer_jax.config.schema import ModelConfig
from farmer_jax.flow.autoregressive_flow import NO_LABEL, AutoregressiveFlow
from farmer_jax.flow.patchify import patchify, unpatchify
from farmer_jax.prior import gmm
from farmer_jax.prior.ar import ARPrior
from farmer_jax.reduction.split import redundant_token_log_prob, split_channels


def make_flow(c: ModelConfig, cls=AutoregressiveFlow):
  """The AF of a model config; ``cls``: another module with the same fields (``FlowShape``), e.g.
  the distilled student."""
  return cls(
      num_tokens=c.num_tokens, token_dim=c.token_dim, width=c.flow_width,
      num_blocks=c.flow_blocks, layers_per_block=c.flow_layers, num_heads=c.flow_heads,
      num_classes=c.num_classes if c.flow_class_conditional else 0, mlp_ratio=c.mlp_ratio,
      dtype=c.jnp_dtype, remat=c.remat, final_norm=c.flow_final_norm, unroll=c.unroll,
      attn_chunk=c.flow_attn_chunk, attention=c.attention, remat_policy=c.remat_policy,
      remat_blocks=c.remat_blocks)


def standard_normal_log_prob(z):
  """sum of log N(z; 0, I) over all but the batch axis: z (B, ...) -> (B,) fp32 nats."""
  z = z.astype(jnp.float32)
  lp = -0.5 * (jnp.square(z) + jnp.log(2 * jnp.pi))
  return jnp.sum(lp.reshape(z.shape[0], -1), axis=-1)


def null_labels(cfg: ModelConfig, n: int):
  """(n,) int32 labels of the null class."""
  return jnp.full((n,), cfg.null_class, jnp.int32)


def flow_label(cfg: ModelConfig, y):
  """AR labels (B,) -> labels for the AF: None if it is unconditional; the null class becomes
  ``NO_LABEL`` (the mean class embedding; TARFlow's convention)."""
  if not cfg.flow_class_conditional:
    return None
  return jnp.where(y == cfg.null_class, NO_LABEL, y)


class Farmer(nn.Module):
  """__call__(x (B, H, W, c), y (B,) int) -> dict of per-example terms, all (B,) fp32 nats:

  log_prob_i (informative AR NLL term), log_prob_r (redundant term), logdet (AF), log_prob (their
  sum), and z (B, N, d), the latents in AR order. ``token_log_probs`` gives the same terms per
  token (B, N), in raster order.

  The reverse path (sampling), each a method for ``apply(..., method=...)``:
    ar_prefill(y (B,)) -> (h (B, C), cache)          class prefix into a fresh KV cache
    ar_step(z_tok (B, 1, d_I), i, cache) -> (h, cache)  feeds informative token i (0-based)
    gmm_informative(h) -> GMM of the next z^I_i;  gmm_redundant(h after z^I_N) -> the shared z^R GMM
    decode(z (B, N, d) in AR order, y (B,)) -> images (B, H, W, c), the exact AF inverse
  """
  cfg: ModelConfig

  def setup(self):
    self.flow = make_flow(self.cfg)
    if self.cfg.prior == "ar":
      self.prior = ARPrior(self.cfg)

  def encode(self, x, y, per_token=False):
    """Images -> (z in AR order (B, N, d), logdet (B,)); with ``per_token`` logdet (B, N) per
    token in raster order (``AutoregressiveFlow.token_logdet``)."""
    flow = self.flow.token_logdet if per_token else self.flow
    z, logdet = flow(patchify(x, self.cfg.patch_size), flow_label(self.cfg, y))
    if self.cfg.ar_flip:
      z = z[:, ::-1]
    return z, logdet

  def __call__(self, x, y):
    c = self.cfg
    z, logdet = self.encode(x, y)
    if c.prior == "standard_normal":
      lp = standard_normal_log_prob(z)
      return dict(z=z, logdet=logdet, log_prob_i=lp, log_prob_r=jnp.zeros_like(lp),
                  log_prob=lp + logdet)
    lp_i, lp_r = self._prior_tokens(z, y)
    lp_i, lp_r = jnp.sum(lp_i, axis=-1), jnp.sum(lp_r, axis=-1)
    return dict(z=z, logdet=logdet, log_prob_i=lp_i, log_prob_r=lp_r, log_prob=lp_i + lp_r + logdet)

  def _prior_tokens(self, z, y):
    """The AR prior's terms of each token, z (B, N, d) in AR order -> (log p(z^I_i | z^I_<i, y),
    log p(z^R_i | z^I, y)) each (B, N) fp32 nats, in AR order."""
    z_i, z_r = split_channels(z, self.cfg.d_i)
    g_i, g_r = self.prior(z_i, y)
    return gmm.log_prob(g_i, z_i), redundant_token_log_prob(self.cfg.dimred, z_r, g_r)

  def token_log_probs(self, x, y):
    """The terms of ``__call__`` per token: x (B, H, W, c), y (B,) -> dict of (B, N) fp32 nats
    (logdet, log_prob_i, log_prob_r, log_prob), token i the patch at raster position i
    (``patchify``'s order, whatever the AR order); summed over tokens they are ``__call__``'s."""
    c = self.cfg
    z, logdet = self.encode(x, y, per_token=True)
    if c.prior == "standard_normal":
      lp_i = gmm.standard_normal_log_prob(z)
      lp_r = jnp.zeros_like(lp_i)
    else:
      lp_i, lp_r = self._prior_tokens(z, y)
    if c.ar_flip:     # AR order -> raster order
      lp_i, lp_r = lp_i[:, ::-1], lp_r[:, ::-1]
    return dict(logdet=logdet, log_prob_i=lp_i, log_prob_r=lp_r, log_prob=lp_i + lp_r + logdet)

  def ar_prefill(self, y):
    """Labels (B,) -> (h (B, C) predicting z^I_1, KV cache with the class prefix written)."""
    return self.prior.prefill(y)

  def ar_step(self, z_tok, i, cache):
    """Feeds informative token i (0-based), (B, 1, d_I) -> (h (B, C) predicting i+1, cache)."""
    return self.prior.decode_step(z_tok, i, cache)

  def gmm_informative(self, h):
    """h (B, C) -> the GMM of the next informative token (batch (B,))."""
    return self.prior.gmm_informative(h)

  def gmm_redundant(self, h):
    """h (B, C) after z^I_N -> the GMM shared by every redundant token (dimred='farmer')."""
    return self.prior.gmm_redundant(h)

  def decode(self, z, y, inverse="exact", tol=0.0, max_iters=0, guide=None):
    """Latents in AR order (B, N, d) -> (images (B, H, W, c), Jacobi iterations per block (n,)
    or None) via the AF inverse: 'exact' (sequential over tokens) or 'jacobi' (parallel
    fixed-point iterations, ``AutoregressiveFlow.inverse_jacobi``; ``max_iters`` 0 = N - 1).
    ``guide``: None, or the static kwargs of the exact inverse's guidance (TARFlow's guided
    reverse: ``guidance``, ``guide_what``, ``attn_temp``, ``annealed``; exact inverse only)."""
    c = self.cfg
    if c.ar_flip:
      z = z[:, ::-1]
    iters = None
    if inverse == "jacobi":
      if guide:
        raise ValueError("AF guidance (af_guidance > 0) needs inverse='exact'")
      tokens, iters = self.flow.inverse_jacobi(z, flow_label(c, y), max_iters=max_iters or None,
                                               tol=tol)
    elif inverse == "exact":
      tokens = self.flow.inverse(z, flow_label(c, y), **(guide or {}))
    else:
      raise ValueError(f"inverse={inverse!r} is unknown; use 'exact' or 'jacobi'")
    return unpatchify(tokens, c.patch_size, c.image_size, c.channels), iters


def decode_latents(cfg: ModelConfig, params, z, y, inverse="exact", tol=0.0, max_iters=0,
                   guide=None):
  """``Farmer.decode`` with the model's params: z (B, N, d) in AR order -> (images (B, H, W, c),
  Jacobi iterations per block or None)."""
  return Farmer(cfg).apply({"params": params}, z, y, inverse, tol, max_iters, guide,
                           method=Farmer.decode)


def init_params(cfg: ModelConfig, rng, boxed: bool = False):
  """The one place a Farmer is initialised (dummy (1, H, W, c) image and label): params in fp32,
  unboxed unless ``boxed`` (the LogicallyPartitioned tree sharding rules are read from). Trace it
  under ``jax.eval_shape`` for shapes only, or under ``jax.jit(out_shardings=...)`` for params born
  sharded."""
  x = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
  y = jnp.zeros((1,), jnp.int32)
  params = Farmer(cfg).init(rng, x, y)["params"]
  return params if boxed else nn.unbox(params)


def abstract_params(cfg: ModelConfig, boxed: bool = False):
  """Param shapes/dtypes (ShapeDtypeStructs) from ``jax.eval_shape``: nothing is allocated."""
  return jax.eval_shape(lambda r: init_params(cfg, r, boxed), jax.random.key(0))
