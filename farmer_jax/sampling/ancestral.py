"""Plain ancestral sampling (no guidance): AR decode with a KV cache under ``lax.scan``, then the exact AF inverse.

Shape letters: B batch, M prefix length, N tokens, d_I / d_R informative / redundant dims, C AR width, L AR depth.
"""

import jax
import jax.numpy as jnp

from farmer_jax.config import ModelConfig
from farmer_jax.model import decode_latents
from farmer_jax.nn.transformer import init_cache
from farmer_jax.prior import gmm
from farmer_jax.prior.ar import ARPrior
from farmer_jax.reduction.split import merge_channels


def sample_latents(cfg: ModelConfig, params, rng, y, temperature: float = 1.0, redundant_var_scale: float = 1.0):
  """Draws z (B, N, d) in AR order from the prior for labels y (B,).

  ``temperature`` scales every GMM std; ``redundant_var_scale`` additionally multiplies the variances of the
  redundant group (shared GMM or N(0, I)) before sampling z^R (paper Fig. 7).
  """
  prior = ARPrior(cfg)
  pp = {"params": params["prior"]}
  bsz = y.shape[0]
  cache = init_cache(cfg.ar_depth, bsz, cfg.class_repeats + cfg.num_tokens, cfg.ar_heads,
                     cfg.ar_width // cfg.ar_heads, cfg.jnp_dtype)
  h, cache = prior.apply(pp, y, cache, method=ARPrior.prefill)
  t_var = temperature ** 2

  def step(carry, xs):
    h, cache = carry
    i, key = xs
    g = gmm.with_temperature(prior.apply(pp, h, method=ARPrior.gmm_informative), t_sigma=t_var)
    z_tok = gmm.sample(key, g)                                   # (B, d_I)
    h, cache = prior.apply(pp, z_tok[:, None], i, cache, method=ARPrior.decode_step)
    return (h, cache), z_tok

  keys = jax.random.split(rng, cfg.num_tokens + 1)
  (h, _), z_i = jax.lax.scan(step, (h, cache), (jnp.arange(cfg.num_tokens), keys[:-1]))
  z_i = jnp.swapaxes(z_i, 0, 1)                                  # (B, N, d_I)
  if cfg.dimred == "none":
    return z_i
  if cfg.dimred == "jetformer":
    z_r = temperature * jnp.sqrt(redundant_var_scale) * jax.random.normal(keys[-1], (bsz, cfg.num_tokens, cfg.d_r))
  else:
    g = gmm.with_temperature(prior.apply(pp, h, method=ARPrior.gmm_redundant), t_sigma=t_var * redundant_var_scale)
    z_r = jnp.swapaxes(gmm.sample(keys[-1], g, shape=(cfg.num_tokens,)), 0, 1)   # N i.i.d. draws
  return merge_channels(z_i, z_r)


def sample_images(cfg: ModelConfig, params, rng, y, temperature: float = 1.0, redundant_var_scale: float = 1.0):
  """Images (B, H, W, c) in model space for labels y (B,)."""
  z = sample_latents(cfg, params, rng, y, temperature, redundant_var_scale)
  return decode_latents(cfg, params, z, y)
