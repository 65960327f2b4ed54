"""Line plots as PNG, drawn with PIL alone: the run's training curves (``write_curves``:
WORKDIR/curves.png, the train loss and the eval bits/dim per logged step from metrics.jsonl).

A figure is a column of ``Panel`` s of one width; each has linear axes fitted to its finite points
(or the x limits it is given, e.g. one step axis for all), ticks at round numbers, and a legend.
A non-finite value breaks its line; a series of one point is drawn as its marker."""

import dataclasses
import io
import math
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from farmer_jax.artifacts import storage

# the colours of a panel's series, in order (RGB)
COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
_AXIS, _GRID, _TEXT, _WHITE = (0, 0, 0), (225, 225, 225), (0, 0, 0), (255, 255, 255)
# pixels around a panel's plotting area: left (y tick labels), right, top (title), bottom (x ticks)
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 24, 34


@dataclasses.dataclass(frozen=True)
class Series:
  """One line: its legend ``label``, the points (``xs``, ``ys``), and whether each point gets a
  ``marker`` (a sparse series, e.g. evaluations)."""
  label: str
  xs: Sequence[float]
  ys: Sequence[float]
  marker: bool = False


@dataclasses.dataclass(frozen=True)
class Panel:
  """A plot: its ``title`` (above it), its series (coloured by COLORS in order), the x axis's label
  and limits (None: those of the data; panels of one figure share them)."""
  title: str
  series: Sequence[Series]
  xlabel: str = "step"
  xlim: Optional[Tuple[float, float]] = None


def default_font(size=None):
  """PIL's default font (the one font of every picture farmer_jax draws), ``size`` px tall where
  this PIL can scale it (FreeType, Pillow >= 10.1), else its fixed bitmap font."""
  if size is None:
    return ImageFont.load_default()
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError):
    return ImageFont.load_default()


def nice_ticks(lo, hi, target=5):
  """Round-number ticks within [lo, hi], 1, 2 or 5 times a power of ten apart, about ``target``
  intervals in the range: (ticks, step)."""
  span = hi - lo
  power = 10.0 ** math.floor(math.log10(span / max(target, 1)))
  steps = [m * power * 10.0 ** k for k in (-1, 0, 1) for m in (5, 2, 1)]
  step = min(steps, key=lambda st: (abs(span / st - target), -st))
  first = math.floor(lo / step + 1e-9) * step
  ticks = []
  k = 0
  while first + k * step <= hi + step * 1e-9:
    ticks.append(first + k * step)
    k += 1
  return [t for t in ticks if t >= lo - step * 1e-9], step


def _limits(values):
  """(lo, hi) of the finite ``values``, widened when they are all equal; None if there are none."""
  v = np.asarray([x for x in values if math.isfinite(x)], np.float64)
  if not v.size:
    return None
  lo, hi = float(v.min()), float(v.max())
  if hi - lo <= 1e-12 * max(abs(lo), abs(hi), 1.0):
    pad = max(abs(lo) * 0.05, 0.5)
    return lo - pad, hi + pad
  return lo, hi


def _label(v, step):
  """A tick's number with as many decimals as the tick step needs."""
  decimals = max(0, -math.floor(math.log10(step) + 1e-9))
  return f"{v:.{decimals}f}"


@dataclasses.dataclass(frozen=True)
class Frame:
  """Where a panel's data lands: the plotting area's pixel box (``left, top, right, bottom``) and
  the data limits it spans (``x0, x1, y0, y1``); y grows upwards."""
  left: int
  top: int
  right: int
  bottom: int
  x0: float
  x1: float
  y0: float
  y1: float

  def to_px(self, x, y):
    """Pixel (column, row) of the data point (x, y)."""
    px = self.left + (x - self.x0) / (self.x1 - self.x0) * (self.right - self.left)
    py = self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)
    return round(px), round(py)


def panel_frame(panel, width, height, y_offset=0):
  """The Frame of ``panel`` drawn ``width`` x ``height`` pixels at row ``y_offset``; None if it has
  no finite point. The y limits are padded by 5% so no line runs along the frame."""
  pts = [(x, y) for s in panel.series for x, y in zip(s.xs, s.ys)
         if math.isfinite(x) and math.isfinite(y)]
  if not pts:
    return None
  x0, x1 = panel.xlim or _limits([p[0] for p in pts])
  y0, y1 = _limits([p[1] for p in pts])
  pad = 0.05 * (y1 - y0)
  return Frame(_LEFT, y_offset + _TOP, width - _RIGHT, y_offset + height - _BOTTOM, x0, x1,
               y0 - pad, y1 + pad)


def render(panels, width=720, panel_height=260):
  """The ``panels`` stacked in one RGB PIL image, ``width`` wide, ``panel_height`` each."""
  img = Image.new("RGB", (width, panel_height * max(len(panels), 1)), _WHITE)
  draw = ImageDraw.Draw(img)
  font = default_font()
  for i, panel in enumerate(panels):
    _draw_panel(draw, font, panel, width, panel_height, i * panel_height)
  return img


def _draw_panel(draw, font, panel, width, height, y_offset):
  draw.text((_LEFT, y_offset + 6), panel.title, fill=_TEXT, font=font)
  f = panel_frame(panel, width, height, y_offset)
  if f is None:
    draw.rectangle((_LEFT, y_offset + _TOP, width - _RIGHT, y_offset + height - _BOTTOM),
                   outline=_AXIS)
    draw.text((_LEFT + 8, y_offset + _TOP + 8), "no data", fill=_TEXT, font=font)
    return
  xticks, xstep = nice_ticks(f.x0, f.x1)
  yticks, ystep = nice_ticks(f.y0, f.y1)
  for t in xticks:
    px, _ = f.to_px(t, f.y0)
    draw.line((px, f.top, px, f.bottom), fill=_GRID)
    draw.line((px, f.bottom, px, f.bottom + 4), fill=_AXIS)
    text = _label(t, xstep)
    draw.text((px - draw.textlength(text, font=font) / 2, f.bottom + 6), text, fill=_TEXT,
              font=font)
  for t in yticks:
    _, py = f.to_px(f.x0, t)
    draw.line((f.left, py, f.right, py), fill=_GRID)
    draw.line((f.left - 4, py, f.left, py), fill=_AXIS)
    text = _label(t, ystep)
    draw.text((f.left - 8 - draw.textlength(text, font=font), py - 5), text, fill=_TEXT,
              font=font)
  xl = panel.xlabel
  draw.text((f.right - draw.textlength(xl, font=font), f.bottom + 20), xl, fill=_TEXT, font=font)
  draw.rectangle((f.left, f.top, f.right, f.bottom), outline=_AXIS)
  for color, s in zip(COLORS, panel.series):
    _draw_series(draw, f, s, color)
  _draw_legend(draw, font, f, panel.series)


def _draw_series(draw, f, s, color):
  """The series' line, broken at non-finite points, and its markers (at every point of a marked
  series, and at a point whose neighbours in the series are not finite: it has no line)."""
  points = [f.to_px(x, y) if math.isfinite(x) and math.isfinite(y) else None
            for x, y in zip(s.xs, s.ys)]
  for a, b in zip(points, points[1:]):
    if a is not None and b is not None:
      draw.line((a, b), fill=color, width=2)
  for i, p in enumerate(points):
    alone = ((i == 0 or points[i - 1] is None)
             and (i + 1 == len(points) or points[i + 1] is None))
    if p is not None and (s.marker or alone):
      draw.ellipse((p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3), fill=color)


def _draw_legend(draw, font, f, series):
  """A swatch and the label of each series, top right inside the plotting area."""
  labels = [s.label for s in series]
  if not labels:
    return
  w = max(draw.textlength(t, font=font) for t in labels) + 28
  x, y = f.right - w - 6, f.top + 6
  draw.rectangle((x, y, x + w, y + 14 * len(labels) + 4), fill=_WHITE, outline=_GRID)
  for i, (color, text) in enumerate(zip(COLORS, labels)):
    row = y + 4 + 14 * i
    draw.line((x + 4, row + 5, x + 20, row + 5), fill=color, width=2)
    draw.text((x + 24, row), text, fill=_TEXT, font=font)


# ------------------------------------------------------------------------------- training curves


def curve_panels(rows):
  """The panels of a run's curves from its metrics.jsonl rows (dicts with 'step'): the train loss
  (nats/dim of the noise-dequantized batch: not bits/dim of the 8-bit data, hence its own panel)
  and the eval bits/dim (uniform dequantization), the later row of a step winning."""
  by_step = {}
  for row in rows:
    by_step.setdefault(row["step"], {}).update(row)
  steps = sorted(by_step)

  def series(key, label, marker=False):
    pts = [(s, float(by_step[s][key])) for s in steps if isinstance(by_step[s].get(key),
                                                                    (int, float))]
    return Series(label, [p[0] for p in pts], [p[1] for p in pts], marker)

  logged = [s for s in steps if any(k.startswith(("train/", "eval/")) for k in by_step[s])]
  xlim = _limits(logged)
  evals = [series("eval/bpd", "eval bits/dim", True)]
  if any("eval/bpd_uncond" in by_step[s] and by_step[s]["eval/bpd_uncond"] != by_step[s].get(
      "eval/bpd") for s in steps):
    evals.append(series("eval/bpd_uncond", "eval bits/dim (null label)", True))
  return [Panel("train loss (nats/dim, noise-dequantized batch)",
                [series("train/loss", "train loss")], xlim=xlim),
          Panel("eval bits/dim (uniform dequantization)", evals, xlim=xlim)]


def write_curves(rows, path):
  """The training curves of ``rows`` (metrics.jsonl's) as a PNG at ``path`` (a local path or URL,
  written atomically); returns ``path``."""
  buf = io.BytesIO()
  render(curve_panels(rows)).save(buf, format="PNG")
  storage.write_bytes(path, buf.getvalue())
  return path
