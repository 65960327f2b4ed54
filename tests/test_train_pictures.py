"""What a run draws while and after it trains: the periodic sample grids (WORKDIR/samples/step_N.png
and TensorBoard), the training curves (WORKDIR/curves.png, artifacts/plots.py) and the
hyperparameters in TensorBoard."""

import glob
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from farmer_jax import configlib
from farmer_jax.artifacts import plots
from farmer_jax.artifacts.metrics import flat_hparams, read_rows
from farmer_jax.artifacts.runs import RunDir
from farmer_jax.config.parse import parse
from farmer_jax.train.report import periodic_classes


def _events(tb_dir):
  """Every tensorboardX Event of the event files in ``tb_dir`` (TFRecord: a little-endian uint64
  length, its CRC, the record, its CRC)."""
  from tensorboardX.proto.event_pb2 import Event
  out = []
  for path in sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      out.append(Event.FromString(data[pos + 12:pos + 12 + n]))
      pos += 12 + n + 4
  return out


def _values(events):
  """(tag, step, Summary.Value) of every summary value of ``events``."""
  return [(v.tag, e.step, v) for e in events if e.HasField("summary") for v in e.summary.value]


def _grid_size(rows, cols, h=32, w=32, pad=2):
  """(width, height) of a sampling.images grid of ``rows`` x ``cols`` images."""
  return cols * (w + pad) + pad, rows * (h + pad) + pad


# ------------------------------------------------------------------------------------ the renderer


def test_a_rising_line_is_drawn_rising_where_its_points_are():
  """Data (0, 0) -> (10, 10): the line's pixels rise to the right (a flipped axis would make them
  fall) and its midpoint (5, 5) lies on the line, inside the plotting area."""
  panel = plots.Panel("t", [plots.Series("s", [0, 10], [0, 10])])
  img = np.asarray(plots.render([panel], width=400, panel_height=300))
  color = plots.COLORS[0]
  rows, cols = np.nonzero(np.all(img == color, axis=-1))
  assert len(rows) > 100
  left, right = cols < np.median(cols), cols > np.median(cols)
  assert rows[left].mean() > rows[right].mean() + 50     # image rows grow downwards
  f = plots.panel_frame(panel, 400, 300)
  cx, cy = f.to_px(5, 5)
  assert f.left < cx < f.right and f.top < cy < f.bottom
  assert abs(cx - (f.left + f.right) / 2) <= 1 and abs(cy - (f.top + f.bottom) / 2) <= 1
  assert tuple(img[cy, cx]) == color
  # the start point is at the bottom left of the plotting area, the end at the top right
  x0, y0 = f.to_px(0, 0)
  x1, y1 = f.to_px(10, 10)
  assert x0 == f.left and x1 == f.right and y0 > y1 and y0 < f.bottom and y1 > f.top


def test_one_point_nan_and_no_data_render():
  """A single point is drawn as its marker; a NaN breaks a line (no segment across it); a panel
  without finite data says so instead of failing."""
  one = plots.Panel("one", [plots.Series("s", [7], [3.5])])
  img = np.asarray(plots.render([one], width=300, panel_height=200))
  f = plots.panel_frame(one, 300, 200)
  x, y = f.to_px(7, 3.5)
  assert tuple(img[y, x]) == plots.COLORS[0]
  gap = plots.Panel("gap", [plots.Series("s", [0, 1, 2, 3], [0, 1, math.nan, 0])])
  img = np.asarray(plots.render([gap], width=300, panel_height=200))
  f = plots.panel_frame(gap, 300, 200)
  (xa, ya), (xb, yb) = f.to_px(1, 1), f.to_px(3, 0)
  # the straight segment (1, 1) -> (3, 0) would pass through its midpoint: it is not drawn
  mx, my = (xa + xb) // 2, (ya + yb) // 2
  assert tuple(img[my, mx]) != plots.COLORS[0]
  assert plots.panel_frame(plots.Panel("none", [plots.Series("s", [1], [math.nan])]), 300,
                           200) is None
  plots.render([plots.Panel("none", [])], width=300, panel_height=200)


def test_ticks_are_round_numbers_covering_the_range():
  ticks, step = plots.nice_ticks(0.13, 2.87)
  assert step == 0.5 and ticks == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5])
  ticks, step = plots.nice_ticks(0, 3000)
  assert step == 500 and ticks[0] == 0 and ticks[-1] == 3000


def test_curve_panels_from_rows_of_a_resumed_run():
  """Train loss and eval bits/dim by step; a step logged twice (a resumed run) counts once, the
  later row winning; rows with NaN stay in (as a break)."""
  rows = [{"step": 50, "train/loss": 2.0}, {"step": 100, "train/loss": 1.5},
          {"step": 100, "train/loss": 1.4}, {"step": 100, "eval/bpd": 3.0, "eval/bpd_uncond": 3.1},
          {"step": 150, "train/loss": math.nan}]
  train, ev = plots.curve_panels(rows)
  (loss,) = train.series
  assert list(loss.xs) == [50, 100, 150] and loss.ys[:2] == [2.0, 1.4] and math.isnan(loss.ys[2])
  assert [list(s.xs) for s in ev.series] == [[100], [100]]
  assert [s.ys for s in ev.series] == [[3.0], [3.1]]
  assert train.xlim == ev.xlim == (50, 150)    # one step axis for both panels


# --------------------------------------------------------------------------- layout and settings


def test_periodic_grid_classes_are_spread_over_the_model():
  c = configlib.load("quickstart:tiny")
  assert periodic_classes(parse(c, read_data=False)) == list(range(10))
  c.sample.periodic_classes = 4
  assert periodic_classes(parse(c, read_data=False)) == [0, 2, 5, 7]
  c.sample.periodic_classes = 0
  assert periodic_classes(parse(c, read_data=False)) == []
  c.sample.periodic_classes = 3
  c.data.num_classes = 0
  assert periodic_classes(parse(c, read_data=False)) == [0]   # the null class of a model of none


def test_step_grids_are_found_by_name_only(tmp_path):
  run = RunDir(str(tmp_path))
  assert run.step_grids() == {}
  os.makedirs(run.step_samples)
  for name in ("step_10.png", "step_200.png", "step_x.png", "step_10.png.tmp", "grid.png"):
    open(os.path.join(run.step_samples, name), "w").close()
  assert run.step_grids() == {10: run.step_grid(10), 200: run.step_grid(200)}
  assert run.step_grid(10) == os.path.join(str(tmp_path), "samples", "step_10.png")
  assert run.curves == os.path.join(str(tmp_path), "curves.png")


def test_flat_hparams_keeps_scalars_and_names_the_rest():
  flat = flat_hparams({"model": {"ar_width": 64, "dtype": "float32", "remat": False,
                                 "nested": {"x": 1.5}},
                       "mesh": (("data", -1),), "init_flow": None})
  assert flat == {"model.ar_width": 64, "model.dtype": "float32", "model.remat": False,
                  "model.nested.x": 1.5, "mesh": "(('data', -1),)"}


# ------------------------------------------------------------------------------- a finished run


def test_finished_run_has_curves_grid_image_and_hparams(trained_run):
  """The tiny quickstart (eval.every = 0): curves.png of its rows, the final grid in TensorBoard
  at the last step (the size of samples.png), and the run config as hyperparameters in the run's
  own event files (no sub-run folder)."""
  workdir, summary, _ = trained_run
  run = RunDir(str(workdir))
  curves = Image.open(run.curves)
  assert curves.format == "PNG" and curves.size == (720, 520)
  assert not os.path.exists(run.step_samples)   # no periodic evals, no periodic grids
  values = _values(_events(run.tensorboard))
  images = [(step, v.image) for tag, step, v in values if tag == "samples"]
  assert [step for step, _ in images] == [200]
  grid = Image.open(run.samples)
  assert (images[0][1].width, images[0][1].height) == grid.size == _grid_size(10, 2)
  assert [name for name in os.listdir(run.tensorboard) if not name.startswith("events")] == []
  from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData
  # one start per start of the run (test_train.py re-runs the finished run: a second one)
  starts = [v for tag, _, v in values if tag == "_hparams_/session_start_info"]
  assert starts
  hp = HParamsPluginData.FromString(
      starts[0].metadata.plugin_data.content).session_start_info.hparams
  assert hp["model.ar_width"].number_value == 32 and hp["train.steps"].number_value == 200
  assert hp["model.ar_order"].string_value == "alternate"
  exp = [v for tag, _, v in values if tag == "_hparams_/experiment"][0]
  metrics = HParamsPluginData.FromString(exp.metadata.plugin_data.content).experiment.metric_infos
  assert [m.name.tag for m in metrics] == ["eval/bpd", "eval/bpd_uncond"]
  assert any(tag == "eval/bpd" and step == 200 for tag, step, _ in values)
  assert summary["steps"] == 200


# ------------------------------------------------------------------------ periodic grids, resume


def _tiny(steps, periodic, every=10):
  c = configlib.load("quickstart:tiny")
  c.train.update(steps=steps, log_every=5, warmup_steps=2)
  c.eval.update(every=every, batch_size=250)
  c.sample.update(periodic_classes=periodic)
  return c


@pytest.mark.slow   # three short trainings with their compiles: ~1.5 min on 2 busy cores
def test_periodic_grids_leave_the_trajectory_alone_and_survive_resume(tmp_path):
  """eval.every = 10 over 30 steps: grids at steps 10 and 20 (the last step's grid is samples.png),
  of 4 spread classes, in samples/ and in TensorBoard; the train rows of metrics.jsonl are the
  same as without them. A resume at step 30 to 50 removes a grid past 30 (a stale one of an
  earlier run), draws 40 again, keeps the earlier ones and other files."""
  from farmer_jax.train.trainer import start, train_and_report
  with_dir, without_dir = str(tmp_path / "with"), str(tmp_path / "without")
  train_and_report(parse(_tiny(30, 4), with_dir), with_dir, quiet=True)
  train_and_report(parse(_tiny(30, 0), without_dir), without_dir, quiet=True)
  run = RunDir(with_dir)
  assert sorted(run.step_grids()) == [10, 20]
  for path in run.step_grids().values():
    im = Image.open(path)
    assert im.format == "PNG" and im.size == _grid_size(4, 2)
  assert not os.path.exists(RunDir(without_dir).step_samples)
  train = lambda d: [r for r in read_rows(RunDir(d).metrics) if "train/loss" in r]
  strip = lambda rows: [{k: v for k, v in r.items() if k != "train/steps_per_s"} for r in rows]
  assert len(train(with_dir)) == 6
  assert strip(train(with_dir)) == strip(train(without_dir))
  evals = [r["step"] for r in read_rows(run.metrics) if "eval/bpd" in r]
  assert evals == [10, 20, 30]
  tb = [(step, v.image) for tag, step, v in _values(_events(run.tensorboard)) if tag == "samples"]
  assert [(s, (im.width, im.height)) for s, im in tb] == [(10, _grid_size(4, 2)),
                                                          (20, _grid_size(4, 2)),
                                                          (30, _grid_size(10, 2))]
  first = {s: open(p, "rb").read() for s, p in run.step_grids().items()}
  for name, data in (("step_35.png", b"stale"), ("step_40.png", b"stale"), ("mine.png", b"x")):
    with open(os.path.join(run.step_samples, name), "wb") as f:
      f.write(data)
  c = _tiny(50, 4)
  tr = start(parse(c, with_dir), with_dir, quiet=True, config_change_ok=True)
  try:
    assert tr.restored_step == 30
    tr.fit(stop_at=45)
  finally:
    tr.close()
  grids = run.step_grids()
  assert sorted(grids) == [10, 20, 40]
  assert {s: open(grids[s], "rb").read() for s in (10, 20)} == first
  assert Image.open(grids[40]).size == _grid_size(4, 2)
  assert os.path.exists(os.path.join(run.step_samples, "mine.png"))
  assert json.load(open(run.config))["sample"]["periodic_classes"] == 4


@pytest.mark.slow   # two processes' compiles: ~2 min on 2 busy cores
def test_periodic_grid_of_a_two_process_run_in_a_bucket(tmp_path):
  """2 processes (4 fake devices each) into a gs:// workdir: each draws its share of the periodic
  grid, process 0 writes samples/step_5.png (3 classes) and TensorBoard's image into the bucket,
  and curves.png; nothing lands in the working directory."""
  from conftest import fake_devices_env
  from test_multiprocess import _free_port
  bucket = tmp_path / "bucket"
  bucket.mkdir()
  env = dict(fake_devices_env(4), FAKE_GCS_ROOT=str(bucket))
  addr = f"127.0.0.1:{_free_port()}"
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pictures_worker.py")
  procs = [subprocess.Popen([sys.executable, worker, "gs://fake-bucket/run", addr, str(i)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path) for i in (0, 1)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  run = RunDir(str(bucket / "fake-bucket" / "run"))
  assert sorted(run.step_grids()) == [5]
  assert Image.open(run.step_grid(5)).size == _grid_size(3, 2)
  assert Image.open(run.curves).format == "PNG"
  tb = [(step, (v.image.width, v.image.height))
        for tag, step, v in _values(_events(run.tensorboard)) if tag == "samples"]
  assert tb == [(5, _grid_size(3, 2)), (10, _grid_size(10, 2))]
  assert sorted(os.listdir(tmp_path)) == ["bucket"]
