"""Deterministic in-memory input pipeline.

Batch k is a pure function of (seed, k): epoch e = k // steps_per_epoch is a seeded permutation of the data, so the
iterator state is just the step, and a resumed run sees exactly the same batches. Each process reads only its own
slice of every global batch (``process_index`` / ``process_count``).
"""

import numpy as np

from farmer_jax.data.mnist import load_mnist5k


class ArrayLoader:
  """Yields {'image': (b, H, W, c) uint8, 'label': (b,) int32} with b = global_batch / process_count."""

  def __init__(self, images, labels, global_batch: int, seed: int = 0, process_index: int = 0,
               process_count: int = 1, shuffle: bool = True, drop_remainder: bool = True):
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} is not divisible by the process count {process_count}")
    if drop_remainder and global_batch > len(images):
      raise ValueError(f"batch size {global_batch} exceeds the dataset size {len(images)}; lower train.batch_size")
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
  """Dispatches on ``config.data.name``. Returns (images uint8 NHWC, labels int32)."""
  if data_cfg.name == "mnist5k":
    return load_mnist5k(split, pad_to=data_cfg.image_size)
  raise ValueError(f"config.data.name={data_cfg.name!r} is unknown; available: 'mnist5k' "
                   "(ImageNet via tfds/grain comes with the data issue)")
