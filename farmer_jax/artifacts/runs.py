"""The on-disk layouts: a training run's folder (``--workdir``) and an export folder (``--out``).

Every file name of both layouts is spelled here and nowhere else.

A run folder (``RunDir``)::

  WORKDIR/config.json        the resolved run config (every model field written out)
  WORKDIR/checkpoints/       Orbax checkpoints (artifacts/checkpoint.py), one sub-folder per step
  WORKDIR/metrics.jsonl      one JSON row per logged step (artifacts/metrics.py)
  WORKDIR/tb/                TensorBoard events
  WORKDIR/samples.png        the class grid sampled after training
  WORKDIR/samples/step_N.png the grid sampled at step N's periodic eval (config.eval.every)
  WORKDIR/curves.png         the train loss and eval bits/dim per logged step (artifacts/plots.py)
  WORKDIR/summary.json       test bits/dim and timings (train/report.py)
  WORKDIR/.farmer_jax.lock   held while a run trains (artifacts/lock.py)
  WORKDIR/profile/           profiler traces (train.profile_steps > 0)

An export folder (``ExportDir``; artifacts/export.py)::

  OUT/export.json            marker, format version, source run + step, params kind, dtype
  OUT/config.json            the run's config (the model is rebuilt from it)
  OUT/params/                Orbax StandardCheckpointer pytree of the params
  OUT/student/               optional: the distilled one-step AF inverse's params (distill/)
"""

import json
import os

import ml_collections

from farmer_jax.artifacts import storage


CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
SAMPLES = "samples.png"
STEP_SAMPLES = "samples"
STEP_GRID = "step_{}.png"
CURVES = "curves.png"
SUMMARY = "summary.json"
LOCK = ".farmer_jax.lock"
PROFILE = "profile"

EXPORT_META = "export.json"
EXPORT_PARAMS = "params"
EXPORT_STUDENT = "student"
EXPORT_LATENT_VAR = "latent_var.npy"
EXPORT_ENTRIES = frozenset({EXPORT_META, CONFIG, EXPORT_PARAMS, EXPORT_STUDENT, EXPORT_LATENT_VAR})


class _Layout:
  """Paths of a folder laid out as ``_FILES`` says: ``attribute -> (file name, absolute?)``.
  ``path`` is kept as given (messages show it so); absolute entries are for Orbax and the lock. A
  URL (``gs://bucket/run``) stays a URL (artifacts/storage.py)."""
  _FILES = {}

  def __init__(self, path):
    self.path = os.fspath(path)

  def __getattr__(self, name):
    if name not in self._FILES:
      raise AttributeError(f"{type(self).__name__} has no entry {name!r}")
    fname, absolute = self._FILES[name]
    return storage.join(storage.absolute(self.path) if absolute else self.path, fname)


class RunDir(_Layout):
  """Paths of a training run's folder: .config .checkpoints .metrics .tensorboard .samples
  .step_samples .curves .summary .lock; ``step_grid(step)`` and ``step_grids()``: the periodic
  grids."""
  _FILES = {"config": (CONFIG, False), "checkpoints": (CHECKPOINTS, True),
            "metrics": (METRICS, False), "tensorboard": (TENSORBOARD, False),
            "samples": (SAMPLES, False), "step_samples": (STEP_SAMPLES, False),
            "curves": (CURVES, False), "summary": (SUMMARY, False), "lock": (LOCK, True)}

  def step_grid(self, step):
    """The path of the grid sampled at ``step``."""
    return storage.join(self.step_samples, STEP_GRID.format(int(step)))

  def step_grids(self):
    """{step: path} of the periodic grids in the run folder (other files there are not theirs)."""
    folder = self.step_samples
    if not storage.isdir(folder):
      return {}
    prefix, suffix = STEP_GRID.split("{}")
    out = {}
    for name in storage.listdir(folder):
      mid = name[len(prefix):len(name) - len(suffix)]
      if name.startswith(prefix) and name.endswith(suffix) and mid.isdigit():
        out[int(mid)] = storage.join(folder, name)
    return out


class ExportDir(_Layout):
  """Paths of an export folder: .meta .config .params [.student] [.latent_var]"""
  _FILES = {"meta": (EXPORT_META, False), "config": (CONFIG, False),
            "params": (EXPORT_PARAMS, False), "student": (EXPORT_STUDENT, False),
            "latent_var": (EXPORT_LATENT_VAR, False)}


def read_saved_config(directory):
  """The config.json of a run or export folder (a ConfigDict); None if the folder has none. A
  corrupt file raises (json.JSONDecodeError, OSError)."""
  path = storage.join(directory, CONFIG)
  if not storage.exists(path):
    return None
  return ml_collections.ConfigDict(json.loads(storage.read_text(path)))


def write_saved_config(directory, config):
  """Writes ``config`` (a ConfigDict) as the folder's config.json, atomically; keys sorted, so the
  file is the same for the same settings however a config file ordered them."""
  storage.write_text(storage.join(directory, CONFIG),
                     config.to_json_best_effort(indent=2, sort_keys=True))
