"""Patchify / unpatchify. Shape letters: B batch, H W image size, c channels, p patch, h = H/p,
w = W/p, N = h*w tokens (raster order), d = p*p*c token dim with feature order (ph, pw, c)."""


def patchify(x, p: int):
  """(B, H, W, c) -> (B, N, d)."""
  b, hh, ww, c = x.shape
  if hh % p or ww % p:
    raise ValueError(f"patch size {p} does not divide image size {hh}x{ww}")
  h, w = hh // p, ww // p
  x = x.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * w, p * p * c)


def unpatchify(x, p: int, image_size: int, channels: int):
  """(B, N, d) -> (B, H, W, c); exact inverse of ``patchify`` for square images."""
  b = x.shape[0]
  h = image_size // p
  x = x.reshape(b, h, h, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, image_size, image_size, channels)
