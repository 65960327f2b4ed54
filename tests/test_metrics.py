"""Sample-quality metrics (farmer_jax/eval/metrics.py) against scipy references and constructed
cases with known answers, and the offline MNIST classifier metric (eval/mnist_classifier.py)."""

import os

import chex
import jax
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance

from farmer_jax.errors import UserError
from farmer_jax.eval import metrics


def _scipy_frechet(mu1, s1, mu2, s2):
  """The usual FID formula (pytorch-fid / TTUR) with scipy.linalg.sqrtm."""
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


def _random_spd(rng, f):
  a = rng.normal(size=(f, f))
  return a @ a.T / f + 0.1 * np.eye(f)


# ------------------------------------------------------------------------------------------------
# feature_statistics / frechet_distance
# ------------------------------------------------------------------------------------------------

def test_feature_statistics_matches_numpy():
  x = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float32)
  mu, sigma = metrics.feature_statistics(x)
  chex.assert_type([mu, sigma], np.float64)
  chex.assert_shape([mu, sigma], [(7,), (7, 7)])
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)
  mu1, sigma1 = metrics.feature_statistics(x[:, :1])       # F = 1 still gives a (1, 1) sigma
  chex.assert_shape([mu1, sigma1], [(1,), (1, 1)])


def test_feature_statistics_refuses_bad_input():
  with pytest.raises(UserError, match="at least 2 samples"):
    metrics.feature_statistics(np.zeros((1, 4)))
  bad = np.zeros((5, 4))
  bad[3, 1] = np.nan
  with pytest.raises(UserError, match="non-finite.*first rows \\[3\\]"):
    metrics.feature_statistics(bad)
  with pytest.raises(ValueError, match="2-D"):
    metrics.feature_statistics(np.zeros((5, 4, 2)))


def test_frechet_matches_scipy_full_rank():
  rng = np.random.default_rng(0)
  s1, s2 = _random_spd(rng, 64), _random_spd(rng, 64)
  mu1, mu2 = rng.normal(size=64), rng.normal(size=64)
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  assert isinstance(got, float)
  np.testing.assert_allclose(got, _scipy_frechet(mu1, s1, mu2, s2), rtol=1e-6)


def test_frechet_matches_scipy_singular():
  """A covariance from 10 samples in 32 dims has rank 9."""
  rng = np.random.default_rng(1)
  mu1, s1 = metrics.feature_statistics(rng.normal(size=(10, 32)))
  mu2, s2 = metrics.feature_statistics(1.5 * rng.normal(size=(200, 32)) + 0.3)
  assert np.linalg.matrix_rank(s1) == 9
  np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2),
                             _scipy_frechet(mu1, s1, mu2, s2), rtol=1e-6)
  _, s3 = metrics.feature_statistics(rng.normal(size=(12, 32)))     # both singular
  np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s3),
                             _scipy_frechet(mu1, s1, mu2, s3), rtol=1e-6)


def test_frechet_identical_is_zero():
  rng = np.random.default_rng(2)
  s = _random_spd(rng, 64)
  mu = rng.normal(size=64)
  assert abs(metrics.frechet_distance(mu, s, mu, s)) < 1e-6
  mu_s, s_s = metrics.feature_statistics(rng.normal(size=(10, 32)))   # singular
  assert abs(metrics.frechet_distance(mu_s, s_s, mu_s, s_s)) < 1e-6


def test_frechet_symmetric():
  rng = np.random.default_rng(3)
  s1 = _random_spd(rng, 48)
  _, s2 = metrics.feature_statistics(rng.normal(size=(20, 48)))
  mu1, mu2 = rng.normal(size=48), rng.normal(size=48)
  a = metrics.frechet_distance(mu1, s1, mu2, s2)
  b = metrics.frechet_distance(mu2, s2, mu1, s1)
  np.testing.assert_allclose(a, b, rtol=1e-9)


def test_frechet_diagonal_closed_form():
  """For diagonal covariances a, b: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
  rng = np.random.default_rng(4)
  a, b = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
  a[:3] = 0.0                                                  # singular too
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  np.testing.assert_allclose(metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), want,
                             rtol=1e-10)


def test_frechet_names_shape_mismatch():
  with pytest.raises(ValueError, match=r"mu1 \(4,\) vs mu2 \(3,\)"):
    metrics.frechet_distance(np.zeros(4), np.eye(4), np.zeros(3), np.eye(3))
  with pytest.raises(UserError, match=r"sigma must be \(F, F\) = \(4, 4\).*\(4, 3\)"):
    metrics.frechet_distance(np.zeros(4), np.zeros((4, 3)), np.zeros(4), np.eye(4))
  with pytest.raises(UserError, match="1-D"):
    metrics.frechet_distance(np.zeros((4, 1)), np.eye(4), np.zeros(4), np.eye(4))


# ------------------------------------------------------------------------------------------------
# inception_score
# ------------------------------------------------------------------------------------------------

def test_inception_score_uniform_is_one():
  mean, std = metrics.inception_score(np.zeros((100, 10)))
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
  mean, _ = metrics.inception_score(np.full((100, 10), 0.1), probabilities=True)
  assert mean == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("num_classes", [10, 7])
def test_inception_score_confident_spread_is_num_classes(num_classes):
  onehot = np.eye(num_classes)[np.arange(num_classes * 20) % num_classes]
  mean, std = metrics.inception_score(60.0 * onehot, splits=10)     # logits
  assert mean == pytest.approx(num_classes, rel=1e-6)
  mean, std = metrics.inception_score(onehot, splits=1, probabilities=True)
  assert mean == pytest.approx(num_classes, rel=1e-12) and std == 0.0


def test_inception_score_all_one_class_is_one():
  onehot = np.eye(10)[np.zeros(50, int)]
  assert metrics.inception_score(onehot, splits=5, probabilities=True)[0] == pytest.approx(1.0)


def test_inception_score_errors():
  with pytest.raises(ValueError, match="splits=20"):
    metrics.inception_score(np.zeros((10, 3)), splits=20)
  with pytest.raises(ValueError, match="summing to 1"):
    metrics.inception_score(np.ones((10, 3)), splits=1, probabilities=True)


# ------------------------------------------------------------------------------------------------
# precision_recall
# ------------------------------------------------------------------------------------------------

def _brute_precision_recall(real, fake, k):
  """Full distance matrices, the k-th nearest other point by sorting."""
  def radii(x):
    d = scipy.spatial.distance.cdist(x, x)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, k - 1]
  d = scipy.spatial.distance.cdist(fake, real)
  precision = np.mean(np.any(d <= radii(real)[None, :], axis=1))
  recall = np.mean(np.any(d.T <= radii(fake)[None, :], axis=1))
  return precision, recall


def test_knn_radii_match_brute_force():
  x = np.random.default_rng(5).normal(size=(57, 6))
  d = scipy.spatial.distance.cdist(x, x)
  np.fill_diagonal(d, np.inf)
  for k in (1, 3):
    want = np.sort(d, axis=1)[:, k - 1] ** 2
    for batch in (5, 57, 1000):
      np.testing.assert_allclose(metrics.knn_radii(x, k, batch), want, rtol=1e-9)


def test_precision_recall_identical_sets():
  real = np.random.default_rng(6).normal(size=(200, 16))
  assert metrics.precision_recall(real, real.copy()) == (1.0, 1.0)


def test_precision_recall_far_away():
  rng = np.random.default_rng(7)
  real = rng.normal(size=(200, 16))
  assert metrics.precision_recall(real, rng.normal(size=(150, 16)) + 100.0) == (0.0, 0.0)


def test_precision_recall_half_coincide():
  rng = np.random.default_rng(8)
  real = rng.normal(size=(200, 16))
  fake = np.concatenate([real[:50], rng.normal(size=(50, 16)) + 100.0])
  precision, recall = metrics.precision_recall(real, fake, k=3)
  assert precision == 0.5
  assert 50 / 200 <= recall < 1.0      # at least the coincident points; the far half covers none


def test_precision_recall_1d_known_answer():
  """Real points 0..9 with k=1: every ball has radius 1 (boundary inclusive)."""
  real = np.arange(10.0)[:, None]
  fake = np.array([0.5, 3.0, 20.0, -1.0, 10.5])[:, None]
  precision, _ = metrics.precision_recall(real, fake, k=1)
  assert precision == pytest.approx(3 / 5)
  # fake k=1 radii: 0.5 -> 1.5 (to -1), 3 -> 2.5, 20 -> 9.5, -1 -> 1.5, 10.5 -> 7.5 (to 3): 0 is
  # within 1.5 of 0.5, 1..5 within 2.5 of 3, 3..9 within 7.5 of 10.5
  assert metrics.precision_recall(real, fake, k=1)[1] == 1.0


def test_precision_recall_batched_equals_unbatched():
  rng = np.random.default_rng(9)
  real = rng.normal(size=(120, 8))
  fake = 1.3 * rng.normal(size=(90, 8)) + 0.4
  want = _brute_precision_recall(real, fake, 3)
  for batch in (7, 32, 120, 10_000):
    got = metrics.precision_recall(real, fake, k=3, batch=batch)
    assert got == pytest.approx(want, abs=0)
  assert 0.0 < want[0] < 1.0 and 0.0 < want[1] < 1.0


def test_precision_recall_errors():
  with pytest.raises(UserError, match="k=5"):
    metrics.precision_recall(np.zeros((5, 2)), np.ones((8, 2)), k=5)
  with pytest.raises(ValueError, match="same F"):
    metrics.precision_recall(np.zeros((5, 2)), np.ones((8, 3)))


# ------------------------------------------------------------------------------------------------
# reference files
# ------------------------------------------------------------------------------------------------

def test_save_and_load_statistics(tmp_path):
  rng = np.random.default_rng(10)
  feats = rng.normal(size=(30, 5)).astype(np.float32)
  mu, sigma = metrics.feature_statistics(feats)
  path = str(tmp_path / "sub" / "ref_stats")                 # no suffix: written as given
  assert metrics.save_statistics(path, mu, sigma, features=feats) == path
  assert os.path.exists(path) and not os.path.exists(path + ".npz")
  assert [p.name for p in (tmp_path / "sub").iterdir()] == ["ref_stats"]   # no temp file left
  ref = metrics.reference_statistics(path)
  np.testing.assert_array_equal(ref.mu, mu)
  np.testing.assert_array_equal(ref.sigma, sigma)
  np.testing.assert_array_equal(ref.features, feats)
  assert ref.images is None
  with pytest.raises(ValueError, match=r"features must be \(N, F=5\)"):
    metrics.save_statistics(path, mu, sigma, features=feats[:, :3])


def test_reference_adm_style(tmp_path):
  """ADM / guided-diffusion reference batches: 'mu', 'sigma' and uint8 images 'arr_0' (plus the
  spatial statistics we do not use)."""
  rng = np.random.default_rng(11)
  images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  mu, sigma = rng.normal(size=6), _random_spd(rng, 6)
  path = tmp_path / "VIRTUAL_ref.npz"
  np.savez(path, arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=sigma[:2, :2])
  ref = metrics.reference_statistics(path)
  np.testing.assert_array_equal(ref.mu, mu)
  assert ref.images is None and ref.features is None            # images only on request
  ref = metrics.reference_statistics(path, load_images=True)
  np.testing.assert_array_equal(ref.images, images)


@pytest.mark.parametrize("key", ["arr_0", "images"])
def test_reference_images_only(tmp_path, key):
  images = np.random.default_rng(12).integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)
  path = tmp_path / "imgs.npz"
  np.savez(path, **{key: images})
  ref = metrics.reference_statistics(path)
  assert ref.mu is None and ref.sigma is None and ref.features is None
  np.testing.assert_array_equal(ref.images, images)


def test_reference_features_only(tmp_path):
  feats = np.random.default_rng(13).normal(size=(20, 3))
  path = tmp_path / "feats.npz"
  np.savez(path, features=feats)
  ref = metrics.reference_statistics(path)
  mu, sigma = metrics.feature_statistics(feats)
  np.testing.assert_array_equal(ref.mu, mu)
  np.testing.assert_array_equal(ref.sigma, sigma)


def test_reference_errors(tmp_path):
  path = tmp_path / "bad.npz"
  np.savez(path, means=np.zeros(3), covs=np.eye(3))
  with pytest.raises(UserError, match=r"keys found: \['covs', 'means'\].*expected 'mu' and "
                     "'sigma'"):
    metrics.reference_statistics(path)
  np.savez(path, mu=np.zeros(3))
  with pytest.raises(UserError, match="mu without sigma"):
    metrics.reference_statistics(path)
  np.savez(path, mu=np.zeros(3), sigma=np.eye(4))
  with pytest.raises(UserError, match=r"\(3, 3\)"):
    metrics.reference_statistics(path)
  np.savez(path, arr_0=np.zeros((2, 4, 4, 3), np.float32))
  with pytest.raises(UserError, match="uint8"):
    metrics.reference_statistics(path)
  np.savez(path, images=np.zeros((2, 4, 4), np.uint8))
  with pytest.raises(UserError, match="channel axis"):
    metrics.reference_statistics(path)
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    metrics.reference_statistics(tmp_path / "missing.npz")
  # a deflate bomb (64 MB of zeros in ~64 KB) is refused from its header, before inflating
  np.savez_compressed(path, mu=np.zeros(8 << 20), sigma=np.eye(2))
  with pytest.raises(UserError, match=r"bad.npz: array 'mu' declares shape \(8388608,\) of "
                     r"float64 \(67108864 bytes\), more than the file can hold"):
    metrics.reference_statistics(path)
  np.save(tmp_path / "single.npy", np.zeros(3))
  with pytest.raises(UserError, match=r"single.npy: not an .npz archive"):
    metrics.reference_statistics(tmp_path / "single.npy")


# ------------------------------------------------------------------------------------------------
# the MNIST classifier metric
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier():
  from farmer_jax.eval.mnist_classifier import train_classifier
  clf = train_classifier(seed=0)
  print(f"mnist classifier: {clf.steps} steps in {clf.train_seconds:.1f} s, test accuracy "
        f"{clf.test_accuracy:.4f}")
  return clf


@pytest.fixture(scope="module")
def mnist():
  from farmer_jax.data.mnist import load_mnist5k
  return load_mnist5k("train"), load_mnist5k("test")


def test_classifier_accuracy_and_consistency(classifier, mnist):
  _, (test_x, test_y) = mnist
  assert classifier.test_accuracy >= 0.95
  cons = classifier.class_consistency(test_x, test_y)
  assert cons["overall"] == pytest.approx(classifier.test_accuracy, abs=1e-12)
  assert sorted(cons["per_class"]) == list(range(10))
  assert np.mean(list(cons["per_class"].values())) == pytest.approx(cons["overall"])  # 50 each
  pred = classifier.predict(test_x)
  chex.assert_shape(pred, (500,))
  chex.assert_type(pred, np.int32)
  # consistency of a subset with one class only
  sub = classifier.class_consistency(test_x[test_y == 3], test_y[test_y == 3])
  assert list(sub["per_class"]) == [3] and sub["overall"] == cons["per_class"][3]


def test_classifier_features_batching(classifier, mnist):
  _, (test_x, _) = mnist
  feats = classifier.features(test_x)
  chex.assert_shape(feats, (500, 128))
  chex.assert_type(feats, np.float32)
  np.testing.assert_allclose(classifier.features(test_x[7:10]), feats[7:10], rtol=1e-5, atol=1e-5)
  chex.assert_shape(classifier.features(test_x[:0]), (0, 128))


def test_mnist_fid(classifier, mnist):
  from farmer_jax.eval.mnist_classifier import mnist_fid
  (train_x, train_y), (test_x, _) = mnist
  fid_test = mnist_fid(classifier, test_x)
  fid_train = mnist_fid(classifier, train_x)
  noise = np.random.default_rng(14).integers(0, 256, (500, 32, 32, 1), dtype=np.uint8)
  fid_noise = mnist_fid(classifier, noise)
  fid_one_class = mnist_fid(classifier, train_x[train_y == 3])
  print(f"mnist fid: test {fid_test:.2e}, train {fid_train:.2f}, one class {fid_one_class:.1f}, "
        f"noise {fid_noise:.1f}")
  assert abs(fid_test) < 1e-6
  assert 0 < fid_train < 50
  assert fid_noise > 10 * fid_train and fid_noise > 200
  assert fid_one_class > 10 * fid_train                 # mode collapse is penalised
  # the classifier's logits give an MNIST Inception Score near 10 on real digits
  assert metrics.inception_score(classifier.logits(test_x), splits=1)[0] > 8.0


def test_classifier_input_errors(classifier):
  with pytest.raises(ValueError, match="uint8"):
    classifier.features(np.zeros((2, 32, 32, 1), np.float32))
  with pytest.raises(UserError, match=r"\(B, 32, 32, 1\), got shape \(2, 28, 28, 1\)"):
    classifier.features(np.zeros((2, 28, 28, 1), np.uint8))
  with pytest.raises(ValueError, match=r"labels must be \(B,\) = \(2,\)"):
    classifier.class_consistency(np.zeros((2, 32, 32, 1), np.uint8), np.zeros(3, int))
  with pytest.raises(ValueError, match=r"\[0, 10\)"):
    classifier.class_consistency(np.zeros((2, 32, 32, 1), np.uint8), np.array([0, 10]))


def test_classifier_deterministic():
  from farmer_jax.eval.mnist_classifier import train_classifier
  a, b = train_classifier(seed=3, steps=20), train_classifier(seed=3, steps=20)
  c = train_classifier(seed=4, steps=20)
  leaves = lambda clf: jax.tree.leaves(clf.params)
  assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
  assert a.test_accuracy == b.test_accuracy
  assert not all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(c)))
