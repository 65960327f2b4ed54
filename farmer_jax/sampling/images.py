"""Image grids as PNG. Shape letters: R rows, K columns, H W c image."""

import io

import numpy as np
from PIL import Image

from farmer_jax.artifacts import storage
from farmer_jax.conventions import to_uint8


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
  """images: (R, K, H, W, c) in model space [-1, 1) or uint8 -> PNG grid at ``path``, a local path
  or URL (written atomically, storage.write_bytes)."""
  buf = io.BytesIO()
  grid_image(images, pad).save(buf, format="PNG")
  storage.write_bytes(path, buf.getvalue())
  return path
