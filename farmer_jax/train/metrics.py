"""Metric sinks: JSONL file + TensorBoard events (tensorboardX). Only process 0 writes."""

import json
import os

import jax

from farmer_jax.runs import RunDir, write_text


class MetricWriter:

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self.active:
      run = RunDir(workdir)
      os.makedirs(run.path, exist_ok=True)
      self._jsonl = open(run.metrics, "a")
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(run.tensorboard)

  def write(self, step: int, metrics: dict):
    """One row ``{'step', 'train/<name>': value, ...}``; the same scalars to TensorBoard."""
    if not self.active:
      return
    row = {"step": int(step), **{f"train/{k}": float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(f"train/{k}", float(v), int(step))
    self._tb.flush()

  def close(self):
    if self.active:
      self._jsonl.close()
      self._tb.close()


def trim_metrics(path, step):
  """Drops metrics.jsonl rows past ``step`` (written after the checkpoint a resumed run restarts
  from) and any partly written last line, so no step appears twice."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if int(row.get("step", 0)) <= step:
        keep.append(json.dumps(row) + "\n")
  write_text(path, "".join(keep))
