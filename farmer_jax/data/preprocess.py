"""Image preprocessing shared by ``farmer_jax prepare`` and the input pipeline: decoding any image
file to RGB (or grayscale) uint8, and the ADM center crop that FID reference batches use.

Shape letters: H W image height/width, c channels (1 or 3).
"""

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

# PIL modes with a well-defined conversion to RGB / L. Others (16/32-bit integer or float images,
# e.g. 'I;16', 'I', 'F') have no single right mapping to 8 bits and are skipped by prepare.
CONVERTIBLE_MODES = ("RGB", "L", "LA", "P", "PA", "RGBA", "RGBa", "CMYK", "YCbCr", "1", "La")


class BadImage(ValueError):
  """A file that cannot become a training image; the message says why (for prepare's report)."""


def _flatten_alpha(im):
  """An image with transparency -> composited over white (the only conversion that does not
  invent colours under transparent pixels)."""
  im = im.convert("RGBA")
  white = Image.new("RGBA", im.size, (255, 255, 255, 255))
  return Image.alpha_composite(white, im)


def decode(data, channels=3):
  """Image file bytes -> PIL image in mode 'RGB' (channels 3) or 'L' (channels 1).

  Grayscale, palette, CMYK, YCbCr and images with alpha (composited over white) are converted;
  anything else raises BadImage naming the reason (not an image, truncated, unsupported mode).
  """
  try:
    im = Image.open(io.BytesIO(data))
    im.load()  # decode now: a truncated file fails here, not later in the pipeline
  except UnidentifiedImageError:
    raise BadImage("not an image file PIL can read") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadImage(f"unreadable or truncated image ({type(e).__name__}: {str(e)[:120]})") from None
  if im.mode not in CONVERTIBLE_MODES:
    raise BadImage(f"image mode {im.mode!r} has no well-defined 8-bit RGB conversion")
  if im.mode in ("LA", "PA", "RGBA", "RGBa", "La") or (im.mode == "P" and
                                                      "transparency" in im.info):
    im = _flatten_alpha(im)
  return im.convert("RGB" if channels == 3 else "L")


def center_crop(im, size):
  """The ADM (guided-diffusion) preprocessing for FID reference batches: halve with a box filter
  while the short side is >= 2 * size, resize bicubically so the short side is ``size``, then
  crop the center ``size`` x ``size``. PIL image -> uint8 (size, size, c)."""
  while min(im.size) >= 2 * size:
    im = im.resize((im.size[0] // 2, im.size[1] // 2), resample=Image.BOX)
  scale = size / min(im.size)
  im = im.resize((round(im.size[0] * scale), round(im.size[1] * scale)), resample=Image.BICUBIC)
  arr = np.asarray(im)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  arr = arr[top:top + size, left:left + size]
  return arr[..., None] if arr.ndim == 2 else arr


def center_crop_array(image, size):
  """uint8 (H, W, c) -> uint8 (size, size, c) by ``center_crop`` (c = 1 or 3)."""
  image = np.asarray(image)
  im = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  return center_crop(im, size)


def encode(image, fmt="jpeg", quality=95):
  """uint8 (H, W, c) -> file bytes ('jpeg' at ``quality``, or lossless 'png')."""
  image = np.asarray(image)
  im = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  buf = io.BytesIO()
  if fmt == "jpeg":
    im.save(buf, format="JPEG", quality=quality)
  else:
    im.save(buf, format="PNG")
  return buf.getvalue()
