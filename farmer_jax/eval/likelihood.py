"""Jitted exact-likelihood evaluation: bits/dim of the 8-bit data under uniform dequantization.

Shape letters: B batch (padded to a fixed size; a mask marks real examples), H W c image.
"""

import jax
import jax.numpy as jnp
import numpy as np

from farmer_jax import conventions


def make_eval_step(model, num_dims):
  """Returns jitted f(params, images uint8 (B,H,W,c), labels (B,), mask (B,), rng) -> (sum nats/dim, count)."""

  @jax.jit
  def step(params, images, labels, mask, rng):
    x = conventions.dequantize(rng, images, "uniform")
    out = model.apply({"params": params}, x, labels)
    nll = -out["log_prob"] / num_dims
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask)

  return step


def evaluate_bpd(model, params, images, labels, num_dims, batch_size, seed=0, progress=None):
  """Mean bits/dim over a whole split (one uniform dequantization sample per image)."""
  step = make_eval_step(model, num_dims)
  total, count = 0.0, 0
  n = len(images)
  for k, start in enumerate(range(0, n, batch_size)):
    im, lb = images[start:start + batch_size], labels[start:start + batch_size]
    m = len(im)
    mask = np.arange(batch_size) < m
    if m < batch_size:   # pad to one jit shape
      im = np.concatenate([im, np.zeros((batch_size - m,) + im.shape[1:], im.dtype)])
      lb = np.concatenate([lb, np.zeros((batch_size - m,), lb.dtype)])
    s, c = step(params, im, lb, mask, jax.random.fold_in(jax.random.key(seed), k))
    total += float(s)
    count += int(c)
    if progress:
      progress(count, n)
  nats = total / count
  return {"nats_per_dim": nats, "bpd": conventions.bits_per_dim(nats), "count": count}
