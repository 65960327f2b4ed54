"""Causal AR transformer prior with Gaussian-mixture heads over the informative latents.

Shape letters: B batch, M class-prefix length, N tokens, d_I informative dims, d_R redundant dims, C
width, K_I / K_R mixture components, P_I = K_I(1 + 2 d_I), P_R = K_R(1 + 2 d_R) head outputs, L
layers.

Sequence: [c_1 .. c_M, z^I_1 .. z^I_N] (length M + N). The prefix is the class embedding (row
``cfg.null_class`` is the learned null class used by label dropout / CFG) repeated M times, plus a
learned per-copy embedding so the copies are distinguishable. The output at position M-1+i-1 (the
one *before* z^I_i) parameterises the GMM of z^I_i; the output after z^I_N parameterises ONE shared
GMM for every z^R_i (dimred='farmer'). Heads are zero-initialised: the prior starts as exactly
N(0, I).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from farmer_jax.config.schema import ModelConfig
from farmer_jax.nn import transformer as tfm
from farmer_jax.prior import gmm


class ARPrior(nn.Module):
  """__call__(z_i (B, N, d_I), y (B,) int) -> (raw_i (B, N, P_I), raw_r (B, P_R) | None)."""
  cfg: ModelConfig

  def setup(self):
    c = self.cfg
    w = c.ar_width
    emb = lambda axes: nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
    self.class_embed = self.param("class_embed", emb(("classes", "embed")), (c.null_class + 1, w),
                                  jnp.float32)
    self.repeat_embed = self.param("repeat_embed", emb((None, "embed")), (c.class_repeats, w),
                                   jnp.float32)
    self.pos_embed = self.param("pos_embed", emb(("seq", "embed")),
                                (c.class_repeats + c.num_tokens, w), jnp.float32)
    self.token_in = tfm.Projection((w,), ("token", "embed"), 1, c.jnp_dtype)
    self.transformer = tfm.Transformer(c.ar_depth, c.ar_heads, mlp_ratio=c.mlp_ratio,
                                       dtype=c.jnp_dtype, remat=c.remat, attention=c.attention,
                                       remat_policy=c.remat_policy, unroll=c.unroll)
    self.final_norm = tfm.LayerNormF32(jnp.float32)
    self.head_i = tfm.Projection((gmm.num_outputs(c.mixtures_informative, c.d_i),),
                                 ("embed", "head"), 1, jnp.float32, zero=True)
    if c.dimred == "farmer":
      self.head_r = tfm.Projection((gmm.num_outputs(c.mixtures_redundant, c.d_r),),
                                   ("embed", "head"), 1, jnp.float32, zero=True)

  def prefix(self, y):
    """(B,) labels (``cfg.null_class`` = no class) -> (B, M, C)."""
    e = self.class_embed[y][:, None, :] + self.repeat_embed[None]
    return e + self.pos_embed[None, :self.cfg.class_repeats]

  def embed_tokens(self, z_i, start):
    """(B, T, d_I) informative tokens at token positions start.. -> (B, T, C)."""
    pos = jax.lax.dynamic_slice_in_dim(
        self.pos_embed, self.cfg.class_repeats + start, z_i.shape[1], axis=0)
    return self.token_in(z_i.astype(self.cfg.jnp_dtype)) + pos[None].astype(self.cfg.jnp_dtype)

  def gmm_informative(self, h):
    c = self.cfg
    return gmm.from_head(
        self.head_i(h.astype(jnp.float32)), c.mixtures_informative, c.d_i, c.scale_fn,
        c.scale_floor)

  def gmm_redundant(self, h):
    c = self.cfg
    return gmm.from_head(
        self.head_r(h.astype(jnp.float32)), c.mixtures_redundant, c.d_r, c.scale_fn, c.scale_floor)

  def __call__(self, z_i, y):
    c = self.cfg
    seq = jnp.concatenate([self.prefix(y).astype(c.jnp_dtype), self.embed_tokens(z_i, 0)], axis=1)
    seq = nn.with_logical_constraint(seq, ("batch", "seq", "embed"))
    h, _ = self.transformer(seq)
    h = self.final_norm(h)[:, c.class_repeats - 1:]           # (B, N + 1, C)
    g_i = self.gmm_informative(h[:, :c.num_tokens])
    g_r = self.gmm_redundant(h[:, c.num_tokens]) if c.dimred == "farmer" else None
    return g_i, g_r

  # --- decoding with a fixed-size KV cache (sampling) ---
  def prefill(self, y):
    """Runs the class prefix of labels y (B,) at slots 0..M-1 of a fresh KV cache with room for the
    whole sequence (M + N); returns (h (B, C) predicting z^I_1, cache)."""
    c = self.cfg
    # per-layer buffers when the layers are unrolled: no slicing/restacking of the cache per token
    cache = tfm.init_cache(c.ar_depth, y.shape[0], c.class_repeats + c.num_tokens, c.ar_heads,
                           c.ar_width // c.ar_heads, c.jnp_dtype, stacked=not c.unroll)
    h, cache = self.transformer(self.prefix(y).astype(c.jnp_dtype), cache, 0)
    return self.final_norm(h[:, -1]), cache

  def decode_step(self, z_tok, i, cache):
    """Feeds z^I_{i+1} (0-based token i, (B, 1, d_I)); returns (h (B, C) predicting the next GMM,
    cache)."""
    h, cache = self.transformer(self.embed_tokens(z_tok, i), cache, self.cfg.class_repeats + i)
    return self.final_norm(h[:, -1]), cache
