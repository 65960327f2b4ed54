"""Metric sinks: JSONL file + TensorBoard events (tensorboardX). Only process 0 writes.

A workdir in a bucket (``gs://...``) cannot be appended to: the sinks then write to a local staging
folder that is copied to the workdir every ``sync_every`` seconds and at close.
"""

import json
import os
import shutil
import tempfile
import time

import jax

from farmer_jax import runs, storage
from farmer_jax.runs import RunDir


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

  def _sync(self):
    if self._jsonl_path is not None:
      with open(self._jsonl_path) as f:
        storage.write_text(self.run.metrics, f.read())
    storage.copy_tree(self._tb_dir, self.run.tensorboard)
    self._synced = time.time()

  def close(self):
    if self.active and self._tb is not None:
      if self._jsonl is not None:
        self._jsonl.close()
        self._jsonl = None
      self._tb.close()
      self._tb = None
      if self._stage is not None:
        self._sync()
        shutil.rmtree(self._stage, ignore_errors=True)


def trim_metrics(path, step):
  """Drops metrics.jsonl rows past ``step`` (written after the checkpoint a resumed run restarts
  from) and any partly written last line, so no step appears twice."""
  if not storage.exists(path):
    return
  keep = []
  for line in storage.read_text(path).splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if int(row.get("step", 0)) <= step:
      keep.append(json.dumps(row) + "\n")
  storage.write_text(path, "".join(keep))


def has_row(path, step, prefix):
  """Whether metrics.jsonl already has a row of ``prefix/*`` scalars at ``step`` (a re-run of a
  finished run must not log its final eval twice)."""
  if not storage.exists(path):
    return False
  for line in storage.read_text(path).splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if int(row.get("step", -1)) == step and any(k.startswith(prefix + "/") for k in row):
      return True
  return False
