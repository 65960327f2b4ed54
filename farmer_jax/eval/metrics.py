"""Sample-quality metrics on feature vectors, in numpy float64 (no JAX): Fréchet distance (FID when
the features are Inception pool3 activations), Inception Score, and improved precision/recall.

Shape letters: N samples, F feature dims, C classes, H W c images.

* ``feature_statistics(features (N, F))`` -> (mu (F,), sigma (F, F)), the Gaussian fit FID uses.
* ``frechet_distance(mu1, sigma1, mu2, sigma2)`` = ||mu1 - mu2||^2 + tr S1 + tr S2
  - 2 tr sqrt(S1 S2), with the trace of the matrix square root taken from the eigenvalues of the
  symmetric PSD matrix sqrt(S1) S2 sqrt(S1) (same spectrum as S1 S2), so singular covariances
  (N <= F) and round-off negative eigenvalues are handled without complex parts.
* ``inception_score(logits (N, C))``: exp E_x KL(p(y|x) || p(y)), mean and std over splits.
* ``precision_recall(real (N, F), fake (M, F), k)``: Kynkäänniemi et al. 2019 k-NN manifolds,
  computed block by block so that no N x M distance matrix is held at once.
* ``reference_statistics(path)`` / ``save_statistics(path, ...)``: reference ``.npz`` files (ours,
  or the ADM / guided-diffusion reference batches: 'mu', 'sigma' and uint8 images 'arr_0').
"""

import os
from typing import NamedTuple, Optional

import numpy as np

from farmer_jax import untrusted
from farmer_jax.artifacts import storage
from farmer_jax.errors import UserError
from farmer_jax.untrusted import short_repr


# ------------------------------------------------------------------------------------------------
# Fréchet distance
# ------------------------------------------------------------------------------------------------

def feature_statistics(features):
  """features (N, F) -> (mu (F,), sigma (F, F)), float64; sigma is the unbiased (ddof=1) sample
  covariance ``np.cov(features, rowvar=False)``. Needs N >= 2 finite rows."""
  x = np.asarray(features)
  if x.ndim != 2:
    raise ValueError(f"features must be 2-D (N, F), got shape {x.shape}; flatten each sample's "
                     "features to one row")
  if x.shape[0] < 2:
    raise UserError(f"feature statistics need at least 2 samples, got {x.shape[0]} (shape "
                    f"{x.shape}); a covariance needs N >= 2 (FID is only meaningful for "
                    "thousands)")
  x = x.astype(np.float64)
  if not np.all(np.isfinite(x)):
    bad = np.flatnonzero(~np.all(np.isfinite(x), axis=1))
    raise UserError(f"features hold non-finite values (NaN/inf) in {bad.size} of {x.shape[0]} "
                    f"rows, first rows {bad[:5].tolist()}; check the images/feature network "
                    "that produced them")
  mu = x.mean(axis=0)
  sigma = np.atleast_2d(np.cov(x, rowvar=False, ddof=1))
  return mu, sigma


def _check_stats(mu, sigma, name):
  mu = np.asarray(mu, np.float64)
  sigma = np.asarray(sigma, np.float64)
  if mu.ndim != 1:
    raise UserError(f"{name}: mu must be 1-D (F,), got shape {mu.shape}")
  f = mu.shape[0]
  if sigma.shape != (f, f):
    raise UserError(f"{name}: sigma must be (F, F) = ({f}, {f}) to match mu (F={f}), got shape "
                    f"{sigma.shape}")
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise UserError(f"{name}: mu/sigma hold non-finite values (NaN/inf)")
  return mu, sigma


def _sym(a):
  return 0.5 * (a + a.T)


def _clip_roundoff(w):
  """Eigenvalues w of a symmetric PSD matrix, with those at round-off level (below F * eps * max|w|,
  negative ones included) set to 0: their square roots (~sqrt(eps)) would otherwise add up to
  ~1e-7 relative errors for singular matrices."""
  tol = max(w.shape[0], 1) * np.finfo(np.float64).eps * (np.max(np.abs(w)) if w.size else 0.0)
  return np.where(w > tol, w, 0.0)


def psd_sqrt(sigma):
  """Symmetric PSD square root of a symmetric matrix (F, F) by eigh; eigenvalues at round-off level
  or below 0 (round-off of a PSD covariance) are set to 0."""
  w, v = np.linalg.eigh(_sym(np.asarray(sigma, np.float64)))
  return (v * np.sqrt(_clip_roundoff(w))) @ v.T


def trace_sqrt_product(sigma1, sigma2):
  """tr sqrt(S1 S2) for PSD S1, S2 (F, F): the sum of the square roots of the eigenvalues of the
  symmetric PSD matrix sqrt(S1) S2 sqrt(S1), which is similar to S1 S2 (round-off-level and
  negative eigenvalues count as 0)."""
  r = psd_sqrt(sigma1)
  m = _sym(r @ np.asarray(sigma2, np.float64) @ r)
  return float(np.sum(np.sqrt(_clip_roundoff(np.linalg.eigvalsh(m)))))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2): mu (F,), sigma
  (F, F). Float64, symmetric in its two Gaussians, >= 0 up to round-off (identical inputs give
  ~1e-12 relative to tr S, possibly slightly negative). FID = this on Inception pool3 statistics.
  """
  mu1, sigma1 = _check_stats(mu1, sigma1, "first statistics")
  mu2, sigma2 = _check_stats(mu2, sigma2, "second statistics")
  if mu1.shape != mu2.shape:
    raise ValueError(f"the two statistics have different feature dims: mu1 {mu1.shape} vs mu2 "
                     f"{mu2.shape} (sigma1 {sigma1.shape}, sigma2 {sigma2.shape}); compute both "
                     "with the same feature network")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * trace_sqrt_product(sigma1, sigma2))


# ------------------------------------------------------------------------------------------------
# Inception Score
# ------------------------------------------------------------------------------------------------

def inception_score(logits, splits=10, probabilities=False):
  """Inception Score of class predictions (N, C): the rows are logits (default; softmax is applied)
  or, with ``probabilities=True``, class probabilities (each row >= 0 summing to 1).

  The N rows are cut into ``splits`` consecutive parts (``np.array_split``: sizes differ by at most
  one, no row is dropped; the original code drops the N mod splits last rows). For each part,
  IS = exp(mean_x KL(p(y|x) || p(y))) with p(y) the part's mean prediction. Returns (mean, std) of
  the per-part scores (std with ddof=0, as in the original). Uniform predictions give 1; confident
  predictions spread evenly over C classes give C."""
  p = np.asarray(logits, np.float64)
  if p.ndim != 2:
    raise ValueError(f"predictions must be 2-D (N, C), got shape {p.shape}")
  n = p.shape[0]
  if not 1 <= splits <= n:
    raise ValueError(f"splits={splits} must be in [1, N={n}]; use splits=1 for few samples")
  if not np.all(np.isfinite(p)):
    raise ValueError("predictions hold non-finite values (NaN/inf)")
  if probabilities:
    if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
      raise ValueError("probabilities=True needs rows >= 0 summing to 1 (got row sums in "
                       f"[{p.sum(axis=1).min():.6g}, {p.sum(axis=1).max():.6g}], min value "
                       f"{p.min():.6g}); pass logits with probabilities=False instead")
    p = p / p.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
      logp = np.log(p)
  else:
    logp = p - p.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
    p = np.exp(logp)
  scores = []
  for idx in np.array_split(np.arange(n), splits):
    pp, lp = p[idx], logp[idx]
    py = pp.mean(axis=0, keepdims=True)
    # sum_y p log(p / py) with 0 log 0 = 0 (py > 0 wherever p > 0): finite stand-ins where p = 0
    log_py = np.log(np.where(py > 0, py, 1.0))
    kl = (pp * (np.where(pp > 0, lp, 0.0) - log_py)).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  scores = np.asarray(scores)
  return float(scores.mean()), float(scores.std())


# ------------------------------------------------------------------------------------------------
# Improved precision / recall
# ------------------------------------------------------------------------------------------------

def _sq_dists(a, a_sq, b, b_sq):
  """Squared Euclidean distances (n, m) of rows a (n, F) to rows b (m, F), given their squared
  norms; clipped at 0."""
  return np.maximum(a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T), 0.0)


def knn_radii(x, k=3, batch=2048):
  """x (N, F) -> (N,) squared distance of each row to its k-th nearest OTHER row (itself excluded
  by index; exact duplicates count as neighbours at distance 0). Memory O(batch^2 + N k)."""
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  if not 1 <= k < n:
    raise UserError(f"k={k} must be in [1, N-1] for N={n} points (the k-th nearest other point)")
  sq = np.einsum("ij,ij->i", x, x)
  out = np.empty(n)
  for i in range(0, n, batch):
    rows = slice(i, min(i + batch, n))
    best = np.full((rows.stop - i, k), np.inf)     # the k smallest so far, per row
    for j in range(0, n, batch):
      cols = slice(j, min(j + batch, n))
      d = _sq_dists(x[rows], sq[rows], x[cols], sq[cols])
      # exclude self-distances: global row r sits in this block at column r - j
      r = np.arange(rows.start, rows.stop)
      hit = (r >= cols.start) & (r < cols.stop)
      d[np.flatnonzero(hit), r[hit] - j] = np.inf
      both = np.concatenate([best, d], axis=1)
      best = np.partition(both, k - 1, axis=1)[:, :k]
    out[rows] = best.max(axis=1)
  return out


def precision_recall(real, fake, k=3, batch=2048):
  """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake`` (M, F) against ``real``
  (N, F) features.

  Each real point gets a ball whose radius is the distance to its k-th nearest other real point;
  precision = fraction of fake points inside at least one real ball (distance <= radius). Recall is
  the same with the roles swapped (real points inside the k-NN balls of the fake set). Distances
  are computed in (batch, batch) blocks (float64), so 50k x 50k points need O(batch^2) memory, not
  an N x M matrix; the result does not depend on ``batch``. Time is O((N + M)^2 F) (three passes:
  real-real, fake-fake, real-fake; 5k x 5k points in 256 dims take ~4 s on 2 CPU cores). Returns
  (precision, recall) floats."""
  real = np.asarray(real, np.float64)
  fake = np.asarray(fake, np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"real and fake must be 2-D (N, F) with the same F, got {real.shape} and "
                     f"{fake.shape}")
  if not (np.all(np.isfinite(real)) and np.all(np.isfinite(fake))):
    raise UserError("real/fake features hold non-finite values (NaN/inf)")
  if batch < 1:
    raise ValueError(f"batch={batch} must be >= 1")
  r_real = knn_radii(real, k, batch)
  r_fake = knn_radii(fake, k, batch)
  sq_r = np.einsum("ij,ij->i", real, real)
  sq_f = np.einsum("ij,ij->i", fake, fake)
  fake_in = np.zeros(fake.shape[0], bool)     # fake point inside some real ball
  real_in = np.zeros(real.shape[0], bool)     # real point inside some fake ball
  for i in range(0, fake.shape[0], batch):
    fr = slice(i, min(i + batch, fake.shape[0]))
    for j in range(0, real.shape[0], batch):
      rr = slice(j, min(j + batch, real.shape[0]))
      d = _sq_dists(fake[fr], sq_f[fr], real[rr], sq_r[rr])       # (fake rows, real cols)
      fake_in[fr] |= np.any(d <= r_real[rr][None, :], axis=1)
      real_in[rr] |= np.any(d <= r_fake[fr][:, None], axis=0)
  return float(fake_in.mean()), float(real_in.mean())


# ------------------------------------------------------------------------------------------------
# Reference files
# ------------------------------------------------------------------------------------------------

class ReferenceStatistics(NamedTuple):
  """What a reference ``.npz`` holds: mu (F,) and sigma (F, F) float64 (None when the file holds
  only images), images uint8 (N, H, W, c) or None, features (N, F) or None."""
  mu: Optional[np.ndarray]
  sigma: Optional[np.ndarray]
  images: Optional[np.ndarray]
  features: Optional[np.ndarray]


# where an image .npz keeps its uint8 (N, H, W, c) images: ours, or the ADM batches' / `farmer_jax
# sample --npz`'s 'arr_0'
IMAGE_KEYS = ("images", "arr_0")


def check_images(images, key, path):
  """``images`` (the array under ``key`` of the .npz ``path``) if it is uint8 (N, H, W, c) with c
  in (1, 3); else UserError naming the fix."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise UserError(f"{path}: images under {key!r} must be (N, H, W, c) with c in (1, 3), got "
                    f"shape {images.shape}. Fix: add a channel axis to grayscale images "
                    "(x[..., None])")
  if images.dtype != np.uint8:
    raise UserError(f"{path}: images under {key!r} must be uint8 in [0, 255], got {images.dtype}. "
                    "Fix: store np.clip(np.round(x), 0, 255).astype(np.uint8)")
  return images


def reference_statistics(path, load_images=False) -> ReferenceStatistics:
  """Loads a reference ``.npz``:

  * 'mu' (F,) and 'sigma' (F, F): precomputed statistics (our ``save_statistics`` files, or the
    ADM / guided-diffusion reference batches, whose 'mu'/'sigma' are Inception pool3 statistics and
    whose 'arr_0' holds the uint8 reference images). 'features' (N, F) are returned when present;
    the images ('images' or 'arr_0') only with ``load_images=True`` (they can be GBs).
  * 'features' (N, F) without 'mu'/'sigma': the statistics are computed from them.
  * only images under 'images' or 'arr_0', uint8 (N, H, W, c): returned with mu = sigma = None, for
    the caller to compute features.

  Raises UserError naming the keys found and the ones expected."""
  path = os.fspath(path)
  try:
    data = untrusted.Npz(path)
  except FileNotFoundError:
    raise FileNotFoundError(f"reference statistics file {path} not found") from None
  with data:
    keys = sorted(data.files)
    image_key = next((k for k in IMAGE_KEYS if k in keys), None)
    has_mu, has_sigma = "mu" in keys, "sigma" in keys
    if has_mu != has_sigma:
      raise UserError(f"{path} holds {'mu' if has_mu else 'sigma'} without "
                      f"{'sigma' if has_mu else 'mu'} (keys found: {short_repr(keys, 200)}); "
                      "expected both 'mu' and 'sigma'")
    features = None
    if "features" in keys:
      features = np.asarray(data["features"])
      if features.ndim != 2:
        raise UserError(f"{path}: 'features' must be 2-D (N, F), got shape {features.shape}")
    if has_mu:
      mu, sigma = _check_stats(data["mu"], data["sigma"], path)
      if features is not None and features.shape[1] != mu.shape[0]:
        raise UserError(f"{path}: 'features' have F={features.shape[1]} but 'mu' has "
                        f"F={mu.shape[0]}")
    elif features is not None:
      mu, sigma = feature_statistics(features)
    elif image_key is not None:
      mu = sigma = None
    else:
      raise UserError(f"{path} holds none of the expected keys (keys found: "
                      f"{short_repr(keys, 200)}); expected 'mu' and 'sigma' (precomputed "
                      "statistics), 'features' (N, F), or uint8 images (N, H, W, c) under "
                      "'images' or 'arr_0'")
    images = None
    if image_key is not None and (mu is None or load_images):
      images = check_images(np.asarray(data[image_key]), image_key, path)
  return ReferenceStatistics(mu, sigma, images, features)


def save_statistics(path, mu, sigma, features=None):
  """Writes mu (F,) and sigma (F, F) as float64 (and features (N, F), if given, in their dtype) to
  the ``.npz`` at exactly ``path`` (no suffix added), atomically (temp file + rename). Returns
  the path."""
  path = os.fspath(path)
  mu, sigma = _check_stats(mu, sigma, "save_statistics")
  arrays = {"mu": mu, "sigma": sigma}
  if features is not None:
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[1] != mu.shape[0]:
      raise ValueError(f"features must be (N, F={mu.shape[0]}) to match mu, got shape "
                       f"{features.shape}")
    arrays["features"] = features
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  with storage.atomic_file(path) as f:
    np.savez(f, **arrays)
  return path
