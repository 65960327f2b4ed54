"""Jitted exact-likelihood evaluation: bits/dim of the 8-bit data under uniform dequantization.

Conventions (docs/math.md, docs/eval.md): bits/dim of the discrete image = ``(NLL in nats/dim -
log(bin width)) / ln 2``, from ``conventions`` (bin width 1/128; 2/255 for
``model.pixels='tarflow'``). Two numbers per split, from the SAME dequantized images:

* class-conditional: -log p(x | y) with the true labels (``bpd``);
* unconditional: -log p(x | null) with every label replaced by ``ModelConfig.null_class``
  (``bpd_uncond``), the number the literature's ImageNet bits/dim tables report.

For an unconditional model (``num_classes == 0``) every label is the null class, so the model runs
once and both keys hold the same value.

Dequantization noise is per EXAMPLE: draw k of example i (its index in the split) is
``U[0, 1)`` noise from ``fold_in(fold_in(key(seed), i), k)``. The result therefore does not depend
on the batch size, the device count or the process count: only on the seed and the split.

With K draws per image (``samples``) the reported bpd is the mean over images and draws, its
standard error the spread over images of the per-image mean (``std / sqrt(n)``), and ``bpd_iw``
the tighter importance-weighted bound ``-log mean_k p(x + u_k)`` (K > 1 only).

Likelihood maps (``token_bits_per_dim``): the same NLL split over the N = (H/p)(W/p) tokens
(``Farmer.token_log_probs``: each token's AF log-det, summed over blocks at the token's own spatial
position, plus its informative and redundant prior terms), each token's nats over its d = p^2 c dims
converted with the same bin width: the mean of an image's token bits/dim is its bits/dim, with the
same dequantization draws.

Shape letters: B batch (padded to a fixed size; a mask marks real examples), H W c image, K draws,
N tokens (h x w patches of p x p pixels), d token dim.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from farmer_jax import conventions
from farmer_jax.model import Farmer

# per-example log-densities (nats, summed over dims) the eval step returns, for the true label and
# (suffix _uncond) the null label
TERMS = ("log_prob", "logdet", "log_prob_i", "log_prob_r")


def dequantize_examples(seed, index, k, images, pixels="farmer"):
  """Uniform dequantization of images uint8 (B, H, W, c) whose split indices are ``index`` (B,)
  under the pixel mapping ``pixels``: draw ``k`` of example i uses the key
  ``fold_in(fold_in(key(seed), i), k)``."""
  base = jax.random.key(seed)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, i), k))(index)
  return jax.vmap(lambda key, v: conventions.dequantize(key, v, "uniform", pixels=pixels))(
      keys, images)


@functools.lru_cache(maxsize=8)   # a model's next evaluation reuses its compilation
def make_eval_step(model, out_sharding=None):
  """Returns jitted f(params, images uint8 (B,H,W,c), labels (B,), mask (B,), start, k, seed) ->
  dict of per-example (B,) arrays: for every name in TERMS, the value with the true label and (name
  + '_uncond') with the null label, fp32 nats summed over the image's dims; and 'mask' (the input's,
  so that every process can read which rows are real).

  Row r of the batch is example ``start + r`` of the split (its dequantization key; see the module
  doc). One forward pass on the doubled batch [x, y; x, null] (the same dequantized x twice), so the
  two differ only through the label. ``out_sharding``: where the outputs go (a mesh's replicated
  sharding makes them readable on every process)."""
  cfg = model.cfg
  null = cfg.null_class
  conditional = cfg.num_classes > 0

  def step(params, images, labels, mask, start, k, seed):
    b = images.shape[0]
    x = dequantize_examples(seed, start + jnp.arange(b), k, images, cfg.pixels)
    y = jnp.asarray(labels, jnp.int32)
    if conditional:
      out = model.apply({"params": params}, jnp.concatenate([x, x]),
                        jnp.concatenate([y, jnp.full_like(y, null)]))
      res = {t: out[t][:b] for t in TERMS}
      res.update({t + "_uncond": out[t][b:] for t in TERMS})
    else:
      out = model.apply({"params": params}, x, jnp.full_like(y, null))
      res = {t: out[t] for t in TERMS}
      res.update({t + "_uncond": out[t] for t in TERMS})
    return dict({t: v.astype(jnp.float32) for t, v in res.items()}, mask=mask)

  kw = {} if out_sharding is None else {"out_shardings": out_sharding}
  return jax.jit(step, static_argnums=(6,), **kw)


def per_image_nats(log_prob, num_dims):
  """Per-example log-densities (n, K) (nats, summed over dims, K dequantization draws) -> each
  image's NLL in nats/dim, the mean over its draws (n,) float64."""
  return (-np.asarray(log_prob, np.float64) / num_dims).mean(axis=1)


def summarize(per_example, num_dims, conditional=True, pixels="farmer"):
  """Per-example log-densities {term: (n, K)} (nats, summed over dims; TERMS and their _uncond) ->
  the reported numbers (see ``evaluate_batches``); ``pixels``: the model's pixel mapping (its
  bin width is the dequantization term)."""
  _bits = lambda nats: conventions.bits_per_dim(nats, pixels)
  lp = {t: np.asarray(v, np.float64) for t, v in per_example.items()}
  n, k = lp["log_prob"].shape
  out = {"count": int(n), "dequant_samples": int(k), "num_dims": int(num_dims)}
  for suffix in ("", "_uncond"):
    per_image = per_image_nats(lp["log_prob" + suffix], num_dims)      # (n,)
    mean = float(per_image.mean())
    se = float(per_image.std(ddof=1) / math.sqrt(n)) if n > 1 else None   # JSON null for n = 1
    out["nats_per_dim" + suffix] = mean
    out["bpd" + suffix] = float(_bits(mean))
    # an affine map of nats: the same SE / ln 2
    out["bpd_se" + suffix] = None if se is None else se / conventions.LN2
    if k > 1:   # importance-weighted bound over the K draws: -log mean_k p(x + u_k)
      lse = np.logaddexp.reduce(lp["log_prob" + suffix], axis=1) - math.log(k)
      out["bpd_iw" + suffix] = float(_bits(float(np.mean(-lse / num_dims))))
    # the split of the NLL into its terms, bits/dim; they add up to bpd together with the
    # dequantization offset -log2(bin width) (7 for the farmer mapping)
    out["terms" + suffix] = {
        "af_logdet": float(np.mean(-lp["logdet" + suffix]) / num_dims / conventions.LN2),
        "informative": float(np.mean(-lp["log_prob_i" + suffix]) / num_dims / conventions.LN2),
        "redundant": float(np.mean(-lp["log_prob_r" + suffix]) / num_dims / conventions.LN2),
        "bin_width": -conventions.log_bin_width(pixels) / conventions.LN2,
    }
  out["class_conditional"] = bool(conditional)
  return out


def eval_scalars(res):
  """The TensorBoard/metrics.jsonl scalars of a bits/dim result (``summarize``)."""
  out = {"bpd": res["bpd"], "bpd_uncond": res["bpd_uncond"]}
  for suffix in ("", "_uncond"):
    for term, v in res["terms" + suffix].items():
      if term != "bin_width":
        out[f"bpd{suffix}_{term}"] = v
  return out


def evaluate_batches(model, params, batches, num_batches, put=None, seed=0, samples=1,
                     progress=None, out_sharding=None, per_example=False):
  """Bits/dim over every real example of ``batches`` (dicts of 'image', 'label', 'mask', global
  batch j = examples [jB, (j + 1)B) of the split, e.g. ``data.pipeline.eval_batches``; ``put`` maps
  each to the step's inputs, e.g. global arrays), with ``samples`` uniform dequantization draws per
  image shared by the conditional and unconditional numbers. Each batch is read once; the step is
  compiled once.

  Returns {'bpd', 'bpd_se', 'nats_per_dim', 'terms' (bits/dim: af_logdet, informative, redundant,
  bin_width; they sum to bpd), the same with suffix '_uncond', 'bpd_iw'[_uncond] (samples > 1),
  'count', 'dequant_samples', 'num_dims', 'class_conditional'}; with ``per_example`` also
  'per_example': {term: (n, K) nats} in split order."""
  if samples < 1:
    raise ValueError(f"dequantization samples={samples} must be >= 1")
  step = make_eval_step(model, out_sharding)
  cfg = model.cfg
  rows = {}
  count, start = 0, 0
  it = iter(batches)
  for _ in range(num_batches):
    b = next(it)
    g = put(b) if put is not None else b
    draws = jax.device_get([step(params, g["image"], g["label"], g["mask"], start, k, seed)
                            for k in range(samples)])     # all K dispatched, then read
    mask = np.asarray(draws[0].pop("mask"), bool)     # the global batch's, on every process
    for d in draws[1:]:
      d.pop("mask")
    for t in draws[0]:
      rows.setdefault(t, []).append(np.stack([np.asarray(d[t]) for d in draws], axis=1)[mask])
    start += int(g["mask"].shape[0])
    count += int(mask.sum())
    if progress:
      progress(count)
  per = {t: np.concatenate(v) for t, v in rows.items()}
  out = summarize(per, cfg.num_dims, cfg.num_classes > 0, cfg.pixels)
  if per_example:
    out["per_example"] = per
  return out


def evaluate_bpd(model, params, images, labels, batch_size, seed=0, samples=1, progress=None,
                 per_example=False):
  """``evaluate_batches`` over in-memory arrays images uint8 (n, H, W, c), labels (n,), in
  batches of ``batch_size`` (the last one padded and masked)."""
  from farmer_jax.data.pipeline import padded_batches
  from farmer_jax.data.sources import ArraySource
  batches, steps = padded_batches(ArraySource(images, labels), batch_size)
  return evaluate_batches(model, params, batches, steps, seed=seed, samples=samples,
                          progress=progress, per_example=per_example)


# per-token log-densities (nats, summed over a token's dims) of ``Farmer.token_log_probs``
TOKEN_TERMS = ("log_prob", "logdet", "log_prob_i", "log_prob_r")


@functools.lru_cache(maxsize=8)
def make_token_step(model):
  """Returns jitted f(params, images uint8 (B,H,W,c), labels (B,), start, k, seed) -> {term:
  (B, N) fp32 nats} for every name in TOKEN_TERMS, token i the patch at raster position i. Row r
  is example ``start + r`` (its dequantization key, as ``make_eval_step``)."""
  cfg = model.cfg

  def step(params, images, labels, start, k, seed):
    x = dequantize_examples(seed, start + jnp.arange(images.shape[0]), k, images, cfg.pixels)
    out = model.apply({"params": params}, x, jnp.asarray(labels, jnp.int32),
                      method=Farmer.token_log_probs)
    return {t: out[t].astype(jnp.float32) for t in TOKEN_TERMS}

  return jax.jit(step, static_argnums=(5,))


def token_bits_per_dim(model, params, images, labels, batch_size, seed=0, samples=1,
                       progress=None):
  """Likelihood maps of images uint8 (n, H, W, c) under labels (n,) (the null class: the
  unconditional model), in batches of ``batch_size`` (the last padded), ``samples`` dequantization
  draws per image (draw k of image i from fold_in(fold_in(key(seed), i), k), as ``evaluate_bpd``).
  ``progress``: called with the number of images done.

  Returns {'token_bpd': (n, h, w) float64 bits/dim of each token (its -log p over its d dims, mean
  over draws, with the bin width of every dim), 'bpd': (n,) float64 each image's bits/dim (the mean
  of its token bits/dim; what ``evaluate_bpd`` gives per image), 'token_terms': {'af_logdet',
  'informative', 'redundant': (n, h, w) bits/dim, which with 'bin_width' (a float) sum to
  token_bpd}}."""
  from farmer_jax.data.pipeline import padded_batches
  from farmer_jax.data.sources import ArraySource
  if samples < 1:
    raise ValueError(f"dequantization samples={samples} must be >= 1")
  cfg = model.cfg
  step = make_token_step(model)
  batches, steps = padded_batches(ArraySource(images, labels), batch_size)
  rows = {t: [] for t in TOKEN_TERMS}
  start = count = 0
  for b in batches:
    draws = jax.device_get([step(params, b["image"], b["label"], start, k, seed)
                            for k in range(samples)])
    mask = np.asarray(b["mask"], bool)
    for t in TOKEN_TERMS:    # mean over the draws
      rows[t].append(np.mean([np.asarray(d[t], np.float64) for d in draws], axis=0)[mask])
    start += len(mask)
    count += int(mask.sum())
    if progress:
      progress(count)
  d = cfg.patch_size ** 2 * cfg.channels
  h = cfg.image_size // cfg.patch_size
  nats = {t: -np.concatenate(v).reshape(-1, h, h) / d for t, v in rows.items()}   # per dim
  bits = lambda v: np.asarray(conventions.bits_per_dim(v, cfg.pixels), np.float64)
  return {"token_bpd": bits(nats["log_prob"]),
          "bpd": bits(nats["log_prob"].mean(axis=(1, 2))),
          "token_terms": {"af_logdet": nats["logdet"] / conventions.LN2,
                          "informative": nats["log_prob_i"] / conventions.LN2,
                          "redundant": nats["log_prob_r"] / conventions.LN2,
                          "bin_width": -conventions.log_bin_width(cfg.pixels) / conventions.LN2}}
