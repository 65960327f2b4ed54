"""Metric sinks: JSONL file + TensorBoard events (tensorboardX: scalars, images, the run's
hyperparameters). Only process 0 writes.

A workdir in a bucket (``gs://...``) cannot be appended to: the sinks then write to a local staging
folder that is copied to the workdir every ``sync_every`` seconds and at close.
"""

import json
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from farmer_jax.artifacts import runs, storage
from farmer_jax.artifacts.runs import RunDir


class MetricWriter:

  def __init__(self, workdir: str, sync_every: float = 60.0, jsonl: bool = True):
    """``jsonl=False``: TensorBoard only, metrics.jsonl is never read or written (e.g. `farmer_jax
    eval` beside a run that may still be training and appending to it)."""
    self.active = jax.process_index() == 0
    self._tb = self._jsonl = self._stage = None
    if not self.active:
      return
    self.run = RunDir(workdir)
    storage.makedirs(self.run.path)
    self.sync_every, self._synced = sync_every, time.time()
    self._jsonl_path = None
    if storage.is_url(self.run.path):
      self._stage = tempfile.mkdtemp(prefix="farmer_jax_metrics_")
      self._tb_dir = os.path.join(self._stage, runs.TENSORBOARD)
      if jsonl:
        self._jsonl_path = os.path.join(self._stage, runs.METRICS)
        if storage.exists(self.run.metrics):   # rows of the run so far (trim_metrics ran first)
          with open(self._jsonl_path, "w") as f:
            f.write(storage.read_text(self.run.metrics))
    else:
      self._tb_dir = self.run.tensorboard
      self._jsonl_path = self.run.metrics if jsonl else None
    if self._jsonl_path is not None:
      self._jsonl = open(self._jsonl_path, "a")
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(self._tb_dir)

  def write(self, step: int, metrics: dict, prefix: str = "train"):
    """One row ``{'step', '<prefix>/<name>': value, ...}``; the same scalars to TensorBoard."""
    if not self.active:
      return
    if self._jsonl is not None:
      row = {"step": int(step), **{f"{prefix}/{k}": float(v) for k, v in metrics.items()}}
      self._jsonl.write(json.dumps(row) + "\n")
      self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(f"{prefix}/{k}", float(v), int(step))
    self._tb.flush()
    if self._stage is not None and time.time() - self._synced >= self.sync_every:
      self._sync()

  def image(self, tag: str, image, step: int):
    """A uint8 image (H, W) or (H, W, C) to TensorBoard as ``tag`` at ``step``."""
    if not self.active:
      return
    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    self._tb.add_image(tag, image, int(step), dataformats="HWC")
    self._tb.flush()

  def hparams(self, params: dict, metrics=()):
    """The run's hyperparameters (``params``: name -> number, bool or string; ``flat_hparams``)
    to TensorBoard's HPARAMS tab, in this run's own event file (tensorboardX's ``add_hparams``
    would open a sub-run folder); ``metrics``: the scalar tags the tab shows beside them."""
    if not self.active:
      return
    from tensorboardX.summary import hparams
    experiment, start, _ = hparams(params, {tag: None for tag in metrics})
    for summary in (experiment, start):
      self._tb.file_writer.add_summary(summary)
    self._tb.flush()

  def _sync(self):
    if self._jsonl_path is not None:
      with open(self._jsonl_path) as f:
        storage.write_text(self.run.metrics, f.read())
    storage.copy_tree(self._tb_dir, self.run.tensorboard)
    self._synced = time.time()

  def close(self, sync=True):
    """Closes the sinks; for a workdir in a bucket, copies the staged files there unless
    ``sync`` is False (a run that lost its workdir to another run)."""
    if self.active and self._tb is not None:
      if self._jsonl is not None:
        self._jsonl.close()
        self._jsonl = None
      self._tb.close()
      self._tb = None
      if self._stage is not None:
        if sync:
          self._sync()
        shutil.rmtree(self._stage, ignore_errors=True)


def flat_hparams(config, prefix=""):
  """A (nested) config as TensorBoard hyperparameters: {'model.ar_width': 64, ...}; numbers, bools
  and strings kept, None left out, anything else (tuples, lists) as its repr."""
  out = {}
  for k, v in config.items():
    name = f"{prefix}{k}"
    if hasattr(v, "items"):
      out.update(flat_hparams(v, name + "."))
    elif v is not None:
      out[name] = v if isinstance(v, (bool, int, float, str)) else repr(v)
  return out


def read_rows(path):
  """The usable rows of metrics.jsonl in file order (unusable lines skipped; none if no file)."""
  if not storage.exists(path):
    return []
  return [row for _, row, _ in _rows(path) if row is not None]


def _rows(path):
  """Yields (line number, row dict or None, why it is unusable) for each non-blank line of
  metrics.jsonl: a row is a JSON object whose 'step' is an integer."""
  for n, raw in enumerate(storage.P(path).read_bytes().splitlines(), 1):
    if not raw.strip():
      continue
    try:
      row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
      yield n, None, "not UTF-8"
      continue
    except (ValueError, RecursionError):
      yield n, None, "not JSON"
      continue
    if not isinstance(row, dict):
      yield n, None, f"a JSON {type(row).__name__}, not an object"
    elif not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
      yield n, None, "no integer 'step'"
    else:
      yield n, row, None


def trim_metrics(path, step):
  """Keeps the metrics.jsonl rows up to ``step`` (a resumed run re-logs the steps after its
  checkpoint, so no step appears twice) and drops unusable lines (a half-written last line after a
  crash, or a corrupt one). Returns '' or a sentence saying what was dropped."""
  if not storage.exists(path):
    return ""
  keep, past, bad = [], 0, []
  for n, row, why in _rows(path):
    if row is None:
      bad.append(f"line {n}: {why}")
    elif row["step"] <= step:
      keep.append(json.dumps(row) + "\n")
    else:
      past += 1
  storage.write_text(path, "".join(keep))
  said = ([f"{past} row(s) past step {step} (logged again by this run)"] if past else [])
  if bad:
    said.append(f"{len(bad)} unusable line(s) ({'; '.join(bad[:5])}"
                f"{'; ...' if len(bad) > 5 else ''})")
  return f"{path}: dropped {' and '.join(said)}; kept {len(keep)} row(s)" if said else ""


def has_row(path, step, prefix):
  """Whether metrics.jsonl already has a row of ``prefix/*`` scalars at ``step`` (a re-run of a
  finished run must not log its final eval twice)."""
  if not storage.exists(path):
    return False
  return any(row is not None and row["step"] == step and any(k.startswith(prefix + "/")
                                                             for k in row)
             for _, row, _ in _rows(path))
