"""Jitted exact-likelihood evaluation: bits/dim of the 8-bit data under uniform dequantization.

Two numbers per split, from the SAME dequantized images (one uniform noise draw per image):

* class-conditional: -log p(x | y) with the true labels (``bpd``, ``nats_per_dim``);
* unconditional: -log p(x | null) with every label replaced by ``ModelConfig.null_class``
  (``bpd_uncond``, ``nats_per_dim_uncond``). This is the number the literature's ImageNet bits/dim
  tables report.

For an unconditional model (``num_classes == 0``) every label is the null class, so the model runs
once and both keys hold the same value.

Shape letters: B batch (padded to a fixed size; a mask marks real examples), H W c image.
"""

import jax
import jax.numpy as jnp

from farmer_jax import conventions


def make_eval_step(model):
  """Returns jitted f(params, images uint8 (B,H,W,c), labels (B,), mask (B,), rng) ->
  {'nats': sum over real examples of -log p(x|y)/D, 'nats_uncond': same with the null label,
  'count'}.

  One forward pass on the doubled batch [x, y; x, null] (the same dequantized x twice), so the two
  sums differ only through the label.
  """
  cfg = model.cfg
  num_dims, null = cfg.num_dims, cfg.null_class
  conditional = cfg.num_classes > 0

  @jax.jit
  def step(params, images, labels, mask, rng):
    x = conventions.dequantize(rng, images, "uniform")
    y = jnp.asarray(labels, jnp.int32)
    b = x.shape[0]
    masked_sum = lambda nll: jnp.sum(jnp.where(mask, nll, 0.0))
    if conditional:
      out = model.apply({"params": params}, jnp.concatenate([x, x]),
                        jnp.concatenate([y, jnp.full_like(y, null)]))
      nll = conventions.nats_per_dim(out["log_prob"], num_dims)
      cond, uncond = masked_sum(nll[:b]), masked_sum(nll[b:])
    else:
      out = model.apply({"params": params}, x, jnp.full_like(y, null))
      cond = uncond = masked_sum(conventions.nats_per_dim(out["log_prob"], num_dims))
    return {"nats": cond, "nats_uncond": uncond, "count": jnp.sum(mask)}

  return step


def evaluate_batches(model, params, batches, num_batches, put=None, seed=0, progress=None):
  """Mean class-conditional and unconditional bits/dim over ``batches`` (dicts of 'image',
  'label', 'mask', e.g. ``data.pipeline.eval_batches``; ``put`` maps each to the step's inputs,
  e.g. global arrays): one uniform dequantization sample per image, shared by both numbers, drawn
  with key ``fold_in(key(seed), k)`` for batch k. Returns {'bpd', 'nats_per_dim', 'bpd_uncond',
  'nats_per_dim_uncond', 'count'}; ``bpd`` is the class-conditional number."""
  step = make_eval_step(model)
  total, total_u, count = 0.0, 0.0, 0
  it = iter(batches)
  for k in range(num_batches):
    b = next(it)
    b = put(b) if put is not None else b
    r = jax.device_get(step(params, b["image"], b["label"], b["mask"],
                            jax.random.fold_in(jax.random.key(seed), k)))
    total += float(r["nats"])
    total_u += float(r["nats_uncond"])
    count += int(r["count"])
    if progress:
      progress(count)
  nats, nats_u = total / count, total_u / count
  return {
      "nats_per_dim": nats,
      "bpd": conventions.bits_per_dim(nats),
      "nats_per_dim_uncond": nats_u,
      "bpd_uncond": conventions.bits_per_dim(nats_u),
      "count": count
  }


def evaluate_bpd(model, params, images, labels, batch_size, seed=0, progress=None):
  """``evaluate_batches`` over in-memory arrays images uint8 (n, H, W, c), labels (n,), in
  batches of ``batch_size`` (the last one padded and masked)."""
  from farmer_jax.data.pipeline import padded_batches
  from farmer_jax.data.sources import ArraySource
  batches, steps = padded_batches(ArraySource(images, labels), batch_size)
  return evaluate_batches(model, params, batches, steps, seed=seed, progress=progress)
