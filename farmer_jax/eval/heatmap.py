"""Likelihood maps as pictures, drawn with PIL: each image beside its per-token bits/dim heat map
(tokens upsampled with nearest, so the p x p blocks stay visible), several per page, one colour
scale per page shown in a colour bar.

The colour map is a ramp through a few anchor colours of rising lightness (near-black blue, purple,
red, orange, pale yellow), linearly interpolated: low bits/dim dark, high bits/dim bright, and its
order readable in grayscale too.

Shape letters: m images on a page, H W c image, h w token grid.
"""

import numpy as np
from PIL import Image, ImageDraw

from farmer_jax.artifacts.plots import default_font

# (position in [0, 1], RGB): lightness rises monotonically along the ramp
ANCHORS = ((0.00, (12, 8, 38)), (0.25, (72, 26, 112)), (0.50, (168, 46, 96)),
           (0.75, (236, 112, 40)), (1.00, (252, 240, 168)))
PAD = 6               # pixels between cells and around the page
TARGET = 96           # images smaller than this are enlarged by an integer factor (nearest)
BAR_WIDTH = 16


def colorize(values, vmin, vmax):
  """values (...) -> uint8 RGB (..., 3) on the ramp, vmin -> its first colour, vmax -> its last
  (values outside are clipped; vmin == vmax maps everything to the middle)."""
  v = np.asarray(values, np.float64)
  t = np.full(v.shape, 0.5) if vmax <= vmin else np.clip((v - vmin) / (vmax - vmin), 0.0, 1.0)
  pos = np.array([a[0] for a in ANCHORS])
  rgb = np.array([a[1] for a in ANCHORS], np.float64)
  out = np.stack([np.interp(t, pos, rgb[:, j]) for j in range(3)], axis=-1)
  return np.round(out).astype(np.uint8)


def _text_size(draw, text, font):
  x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
  return x1 - x0, y1 - y0


def _rgb(image):
  """uint8 (H, W, c) -> uint8 (H, W, 3)."""
  image = np.asarray(image, np.uint8)
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def page(images, token_bpd, bpd, names, columns=4, vmin=None, vmax=None):
  """One page: images uint8 (m, H, W, c) each beside its map token_bpd (m, h, w), captioned
  with its name and bits/dim ``bpd`` (m,); the colour scale runs from ``vmin`` to ``vmax``
  (default: the page's smallest and largest token bits/dim; values beyond take the end colours,
  marked '+' / '-' at the bar's ends), shown in a bar on the right. Returns an RGB PIL image."""
  images, token_bpd = np.asarray(images), np.asarray(token_bpd, np.float64)
  m, hh, ww, _ = images.shape
  h, w = token_bpd.shape[1:]
  if vmin is None:
    vmin = float(token_bpd.min()) if vmax is None else min(float(token_bpd.min()), vmax - 1.0)
  if vmax is None:
    vmax = max(float(token_bpd.max()), vmin + 1e-6)
  s = max(1, -(-TARGET // max(hh, ww)))    # integer enlargement: pixels stay square blocks
  ch, cw = hh * s, ww * s
  font = default_font(12)
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  line = _text_size(probe, "Ag0.", font)[1] + 4
  cols = min(columns, m)
  rows = -(-m // cols)
  cell_w, cell_h = 2 * cw + PAD, ch + 2 * line
  over = "+" if token_bpd.max() > vmax else ""       # clipped values: the end colours
  under = "-" if token_bpd.min() < vmin else ""
  labels = [f"{vmax:.2f}{over}", f"{(vmin + vmax) / 2:.2f}", f"{vmin:.2f}{under}"]
  label_w = max(_text_size(probe, t, font)[0] for t in labels)
  bar_x = PAD + cols * (cell_w + 2 * PAD)
  title = "bits/dim per token"
  width = bar_x + max(BAR_WIDTH + 6 + label_w, _text_size(probe, title, font)[0]) + 2 * PAD
  height = max(PAD + rows * (cell_h + PAD), 4 * line + 120)
  canvas = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i in range(m):
    x0 = PAD + (i % cols) * (cell_w + 2 * PAD)
    y0 = PAD + (i // cols) * (cell_h + PAD)
    img = np.kron(_rgb(images[i]), np.ones((s, s, 1), np.uint8))
    heat = colorize(np.kron(token_bpd[i], np.ones((hh // h * s, ww // w * s))), vmin, vmax)
    canvas.paste(Image.fromarray(img), (x0, y0))
    canvas.paste(Image.fromarray(heat), (x0 + cw + PAD, y0))
    draw.text((x0, y0 + ch + 2), _fit(draw, str(names[i]), font, cell_w), fill=(0, 0, 0),
              font=font)
    draw.text((x0, y0 + ch + 2 + line), f"{float(bpd[i]):.3f} bits/dim", fill=(0, 0, 0),
              font=font)
  # the colour bar: top = vmax, bottom = vmin
  bar_top, bar_h = PAD + 2 * line, max(height - 2 * PAD - 3 * line, 40)
  ramp = colorize(np.linspace(vmax, vmin, bar_h)[:, None].repeat(BAR_WIDTH, 1), vmin, vmax)
  draw.text((bar_x, PAD), title, fill=(0, 0, 0), font=font)
  canvas.paste(Image.fromarray(ramp), (bar_x, bar_top))
  for text, y in zip(labels, (bar_top, bar_top + bar_h // 2, bar_top + bar_h)):
    draw.text((bar_x + BAR_WIDTH + 6, y - line // 2), text, fill=(0, 0, 0), font=font)
  return canvas


def _fit(draw, text, font, width):
  """``text``, shortened from the left with '...' until it fits ``width`` pixels."""
  if _text_size(draw, text, font)[0] <= width:
    return text
  while len(text) > 1 and _text_size(draw, "..." + text, font)[0] > width:
    text = text[1:]
  return "..." + text
