"""Self-supervised dimension reduction: channel split of latent tokens and the redundant-group
log-density.

Shape letters: B batch, N tokens, d token dim, d_I informative channels (first d_I of each token),
d_R = d - d_I.

Modes (config ``model.dimred``):
  * ``farmer``    z^R_i ~ one shared GMM (K_R components over d_R dims) predicted after all of z^I
                  and the class; the N redundant tokens are i.i.d. given that GMM.
  * ``jetformer`` z^R ~ N(0, I), independent of everything (JetFormer's factored-out dims).
  * ``none``      d_I = d; no redundant group.
"""

import jax.numpy as jnp

from farmer_jax.prior import gmm


def split_channels(z, d_i: int):
  """(B, N, d) -> (z^I (B, N, d_I), z^R (B, N, d_R))."""
  return z[..., :d_i], z[..., d_i:]


def merge_channels(z_i, z_r):
  """Inverse of ``split_channels``."""
  return jnp.concatenate([z_i, z_r], axis=-1)


def redundant_token_log_prob(mode: str, z_r, shared: "gmm.GMM | None"):
  """log p(z^R_i | ...) of each token: z_r (B, N, d_R), shared GMM with batch shape (B,) ->
  (B, N)."""
  if mode == "none":
    return jnp.zeros(z_r.shape[:2], jnp.float32)
  if mode == "jetformer":
    return gmm.standard_normal_log_prob(z_r)
  if mode == "farmer":
    # Broadcast the (B,)-batched shared GMM over the N tokens.
    g = gmm.GMM(shared.logits[:, None], shared.loc[:, None], shared.scale[:, None])
    return gmm.log_prob(g, z_r)
  raise ValueError(f"unknown dimred mode {mode!r}")
