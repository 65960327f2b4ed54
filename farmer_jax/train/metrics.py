"""Metric sinks: JSONL file + TensorBoard events (tensorboardX) + console. Only process 0 writes."""

import json
import os

import jax


class MetricWriter:

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: dict, prefix: str = "train"):
    if not self.active:
      return
    row = {"step": int(step), **{f"{prefix}/{k}": float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(f"{prefix}/{k}", float(v), int(step))
    self._tb.flush()

  def close(self):
    if self.active:
      self._jsonl.close()
      self._tb.close()
