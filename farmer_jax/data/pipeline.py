"""Deterministic in-memory input pipeline.

Batch k is a pure function of (seed, k): epoch e = k // steps_per_epoch is a seeded permutation of the data, so the
iterator state is just the step, and a resumed run sees exactly the same batches. Each process reads only its own
slice of every global batch (``process_index`` / ``process_count``).
"""

import dataclasses

import numpy as np

from farmer_jax.config import ConfigError
from farmer_jax.data.mnist import load_mnist5k


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What ``config.data`` must agree with for one dataset ``load_split`` can load (checked by config.validate)."""
  channels: int
  num_classes: int  # labels in the data are 0 .. num_classes - 1; config.data.num_classes may also be 0
  min_image_size: int  # images are zero-padded (evenly on each side) from this size to config.data.image_size
  splits: tuple             # ((split name, number of images), ...)


# The datasets ``load_split`` can load, by ``config.data.name``.
DATASETS = {"mnist5k": DatasetInfo(channels=1, num_classes=10, min_image_size=28,
                                   splits=(("train", 4500), ("test", 500)))}


class ArrayLoader:
  """Yields {'image': (b, H, W, c) uint8, 'label': (b,) int32} with b = global_batch / process_count."""

  def __init__(self, images, labels, global_batch: int, seed: int = 0, process_index: int = 0,
               process_count: int = 1, shuffle: bool = True, drop_remainder: bool = True):
    if global_batch % process_count:
      raise ValueError(
          f"global batch {global_batch} is not divisible by the process count {process_count}")
    if drop_remainder and global_batch > len(images):
      raise ValueError(
          f"batch size {global_batch} exceeds the dataset size {len(images)}; lower train.batch_size"
      )
    self.images, self.labels = images, labels
    self.global_batch, self.seed, self.shuffle = global_batch, seed, shuffle
    self.pi, self.pc = process_index, process_count
    n = len(images)
    self.steps_per_epoch = n // global_batch if drop_remainder else -(-n // global_batch)

  def _order(self, epoch):
    if not self.shuffle:
      return np.arange(len(self.images))
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.images))

  def batch(self, step: int):
    epoch, k = divmod(step, self.steps_per_epoch)
    idx = self._order(epoch)[k * self.global_batch:(k + 1) * self.global_batch]
    local = len(idx) // self.pc
    idx = idx[self.pi * local:(self.pi + 1) * local]
    return {"image": self.images[idx], "label": self.labels[idx]}

  def iterate(self, start_step: int = 0):
    step = start_step
    while True:
      yield self.batch(step)
      step += 1


def load_split(data_cfg, split: str):
  """Dispatches on ``config.data.name``. Returns (images uint8 NHWC, labels int32).

  Labels must lie in [0, config.data.num_classes): a label outside that range is an error, never mapped to the null
  class. With ``num_classes == 0`` (an unconditional model) every label is the null class, 0, on purpose.
  """
  if data_cfg.name == "mnist5k":
    images, labels = load_mnist5k(split, pad_to=data_cfg.image_size)
  else:
    raise ConfigError(
        f"config.data.name={data_cfg.name!r} is unknown; available: {sorted(DATASETS)}")
  return images, check_labels(labels, data_cfg.num_classes, f"{data_cfg.name} split {split!r}")


def check_labels(labels, num_classes, what="the data"):
  """labels (n,) int -> int32 labels, checked against config.data.num_classes (0 = unconditional: all null)."""
  labels = np.asarray(labels)
  if num_classes == 0:
    return np.zeros(labels.shape, np.int32)
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    raise ConfigError(
        f"{int(bad.sum())} of {labels.size} labels in {what} lie outside [0, {num_classes}) (labels "
        f"found: {int(labels.min())}..{int(labels.max())}) with config.data.num_classes={num_classes}. "
        "Fix: set --config.data.num_classes to the dataset's class count (labels 0..n-1), or 0 for an "
        "unconditional model; out-of-range labels are never mapped to the null class")
  return labels.astype(np.int32)
