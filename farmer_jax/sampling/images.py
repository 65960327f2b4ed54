"""Image grids as PNG, and atomic file writes. Shape letters: R rows, K columns, H W c image."""

import contextlib
import os
import uuid

import numpy as np
from PIL import Image

from farmer_jax.conventions import to_uint8


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields a unique temporary path next to ``path``; on success it replaces ``path`` (os.replace),
  on any failure it is removed, so ``path`` is either the complete new file or untouched and no
  temporary file is left."""
  d, base = os.path.split(os.path.abspath(path))
  tmp = os.path.join(d, f".{base}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def grid_image(images, pad: int = 2):
  """images: (R, K, H, W, c) in model space [-1, 1) or uint8 -> a PIL image of the grid
  (rows = R)."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = to_uint8(images)
  r, k, h, w, c = images.shape
  grid = np.full((r * (h + pad) + pad, k * (w + pad) + pad, c), 255, np.uint8)
  for i in range(r):
    for j in range(k):
      y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
      grid[y0:y0 + h, x0:x0 + w] = images[i, j]
  return Image.fromarray(grid[..., 0] if c == 1 else grid)


def save_grid(images, path: str, pad: int = 2):
  """images: (R, K, H, W, c) in model space [-1, 1) or uint8 -> PNG grid at ``path`` (written
  atomically)."""
  img = grid_image(images, pad)
  with atomic_path(path) as tmp:
    img.save(tmp, format="PNG")
  return path
