"""A run config (``ml_collections.ConfigDict``) -> ``RunConfig``, parsed and checked
once at the entry point, before anything touches the disk; every refusal names the field, its value
and the fix. Library code takes the typed sections and trusts them.

``parse``: a whole run (data against its dataset, model, train, eval, sample, mesh and sharding
rules against the devices, the workdir). ``parse_model``: only what builds the network, for a saved
config read back (run dirs, exports). ``resolved_config``: what a run saves as config.json."""

import dataclasses
import os
from typing import Any, Optional

import numpy as np

from farmer_jax.config import rules
from farmer_jax.config.schema import (DATA_SHAPE_FIELDS, DataConfig, EvalConfig, ModelConfig,
                                      SampleConfig, TrainConfig)
from farmer_jax.config.rules import require
from farmer_jax.errors import ConfigError

SECTIONS = ("data", "model", "train", "eval", "sample", "mesh", "sharding_rules")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A parsed run config: one typed value per section. ``mesh`` and ``sharding_rules`` are tuples
  of pairs, ``fsdp`` a dict ({'axis', 'min_params'}) or None; ``source`` is the ConfigDict it was
  parsed from (what ``resolved_config`` saves and resume compares)."""
  data: DataConfig
  model: ModelConfig
  train: TrainConfig
  eval: EvalConfig
  sample: SampleConfig
  mesh: tuple
  sharding_rules: tuple
  fsdp: Optional[dict]
  source: Any

  @property
  def sampler(self):
    """config.sample's sampler settings (SamplerConfig)."""
    return self.sample.sampler


def section(config, name):
  """``config.<name>``; ConfigError if the run config has no such section."""
  if name not in config or config[name] is None:
    raise ConfigError(
        f"config has no '{name}' section; start from the quickstart config (a run config "
        "needs data, model, train, eval, sample, mesh and sharding_rules)")
  return config[name]


def parse_model(config) -> ModelConfig:
  """Only what builds the network (``config.data`` shape fields + ``config.model``) -> its
  ModelConfig. For a model rebuilt from a saved config (exports, runs, benchmarks); a run is
  parsed whole by ``parse``."""
  for name in ("data", "model"):
    section(config, name)
  for f in DATA_SHAPE_FIELDS:
    if f not in config.data:
      raise ConfigError(f"config.data has no '{f}' field; start from the quickstart "
                        "config")
  return ModelConfig.from_section(config.model, **{f: config.data[f] for f in DATA_SHAPE_FIELDS})


def parse(config, workdir=None, num_devices=None, num_processes=None,
          read_data=True) -> RunConfig:
  """A full run config (and, if given, the workdir) -> RunConfig.

  Raises ConfigError naming the field, its value and the fix, before anything is written: data (a
  dataset ``load_split`` knows, shapes and class count consistent with it), model, every
  config.train field, eval, sample (and its sampler settings), mesh + sharding rules against
  ``num_devices`` (default jax.device_count()) and the batch against the data-parallel slots and
  ``num_processes`` (default jax.process_count()), and the workdir (an existing file, or no way
  to create it, is refused). ``read_data`` False leaves the dataset unread (what compiling for a
  target needs is config.data's shapes alone): its existence, splits and sizes are not checked.
  """
  for name in SECTIONS:
    section(config, name)
  from farmer_jax.data import sources
  d = DataConfig.from_section(config.data)
  e = EvalConfig.from_section(config.eval)
  info = sources.describe(d) if read_data else None
  if info is not None:
    sources.check_config(d, info, (("data.train_split", d.train_split), ("eval.split", e.split)))
  require(not e.mnist_quality or (d.name == "mnist5k" and d.image_size == 32 and d.channels == 1
                                  and d.num_classes == 10),
          "eval.mnist_quality", True, "its digit classifier scores class-conditional 32x32x1 "
          f"MNIST samples only (10 classes), and this run trains on {d.name} ({d.image_size}x"
          f"{d.image_size}x{d.channels}, {d.num_classes} classes)",
          "set --config.eval.mnist_quality=False (score other data with `farmer_jax fid`)")
  m = parse_model(config)
  t = TrainConfig.from_section(config.train)
  grid = SampleConfig.from_section(config.sample)
  require(grid.sampler.inverse != "student", "sample.inverse", "student",
          "a run's sample grid is drawn with its own model, which carries no distilled student",
          "use --config.sample.inverse=exact or jacobi (the student is used by `farmer_jax sample "
          "--inverse=student` on an export made with --student)")
  try:
    grid.sampler.check_model(m)
  except rules.SettingError as err:
    raise rules.FieldError("sample.guidance", grid.sampler.guidance, str(err),
                           "set --config.sample.guidance=none and --config.sample.cfg=0",
                           end="") from None
  train_size = info.splits.get(d.train_split) if info is not None else None
  rules_ = _check_mesh(config, t, train_size, num_devices, num_processes)
  if workdir is not None:
    validate_workdir(workdir)
  fsdp = config.get("fsdp")
  return RunConfig(data=d, model=m, train=t, eval=e, sample=grid, mesh=config.mesh,
                   sharding_rules=rules_, fsdp=dict(fsdp) if fsdp else None, source=config)


def _check_mesh(config, t, train_size, num_devices, num_processes):
  """config.mesh, config.sharding_rules and config.fsdp against the devices, and the batch against
  the data-parallel slots and processes; returns the sharding rules."""
  from farmer_jax import sharding
  if num_devices is None:
    import jax
    num_devices = jax.device_count()
  if num_processes is None:
    import jax
    num_processes = jax.process_count()
  names, sizes = sharding.mesh_shape(config.mesh, num_devices)
  shape = dict(zip(names, sizes))
  rules_ = config.sharding_rules
  ok_rules = not isinstance(rules_, (str, bytes)) and all(
      not isinstance(r, (str, bytes)) and len(r) == 2 and isinstance(r[0], str) for r in rules_)
  require(ok_rules, "sharding_rules", rules_,
          "must be a sequence of (logical axis, mesh axis or axes) pairs",
          "e.g. (('batch', ('data', 'fsdp')),)")
  for logical, axes in rules_:
    axes = () if axes is None else tuple(axes) if isinstance(axes, (list, tuple)) else (axes,)
    for a in axes:
      require(
          a in shape, "sharding_rules", rules_,
          f"logical axis {logical!r} maps to mesh axis {a!r}, which config.mesh={config.mesh!r} "
          "does not have",
          f"map it to axes of the mesh {list(names)}")
  batch_axes = sharding.batch_mesh_axes(rules_)
  slots = int(np.prod([shape[a] for a in batch_axes])) if batch_axes else 1
  b = t.batch_size
  require(
      b % slots == 0, "train.batch_size", b,
      f"the batch is split over mesh axes {batch_axes} = {slots} data-parallel slots on "
      f"{num_devices} device(s), "
      f"and {b} is not a multiple of {slots}",
      f"use a multiple of {slots}, e.g. --config.train.batch_size={max(slots, b // slots * slots)}")
  require(b % num_processes == 0, "train.batch_size", b,
          f"each of the {num_processes} processes loads batch_size / {num_processes} examples",
          f"use a multiple of {num_processes}")
  if train_size is not None:
    require(b <= train_size, "train.batch_size", b,
            f"it exceeds the {train_size} training images of config.data.name={config.data.name!r}",
            f"use at most {train_size}")
  fsdp = config.get("fsdp")
  if fsdp:
    require(fsdp.get("axis") in shape, "fsdp.axis", fsdp.get("axis"),
            f"it is not an axis of config.mesh={config.mesh!r}", f"use one of {list(names)}")
    rules.int_at_least(0, "e.g. --config.fsdp.min_params=65536").require(
        "fsdp.min_params", fsdp.get("min_params", 0))
  return sharding.logical_rules(rules_)


def validate_workdir(workdir, flag="--workdir"):
  """Checks, without creating anything, that the directory ``workdir`` can be written: not an
  existing file, and it (if it exists) or its nearest existing ancestor is a writable directory.
  ``flag`` names it in the message. Remote paths (``scheme://...``) are not checked here."""
  def bad(why, fix):
    return ConfigError(f"{flag}={workdir} is invalid: {why}. Fix: {fix}.")
  if not isinstance(workdir, str) or not workdir.strip():
    raise bad("it must be a directory path", f"e.g. {flag}=/tmp/farmer_run")
  if "://" in workdir:
    return
  path = os.path.abspath(workdir)
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise bad("it is an existing file, not a directory",
                "pass a new directory path (or an existing run directory)")
    if not os.access(path, os.W_OK | os.X_OK):
      raise bad("the directory is not writable", f"fix its permissions or choose another {flag}")
    return
  from farmer_jax.artifacts import storage
  parent = storage.nearest_existing(os.path.dirname(path))
  if not os.path.isdir(parent):
    raise bad(f"{parent} is a file, so the directory cannot be created under it",
              "choose a path under a directory")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise bad(f"it does not exist and {parent} is not writable, so it cannot be created",
              f"choose a {flag} under a writable directory")


def resolved_config(config):
  """An unlocked copy of a run config whose ``model`` section lists EVERY ModelConfig field (the
  ones a config leaves out at their defaults, after the ones it lists). This is what a run saves as
  config.json, so a saved model means the same thing when a later release changes a default, and
  what resume compares (a key left at its default equals the same key written out)."""
  import ml_collections
  out = ml_collections.ConfigDict(config.to_dict())
  model = out.get("model")
  if model is not None:
    for f in dataclasses.fields(ModelConfig):
      if f.name not in model and f.name not in DATA_SHAPE_FIELDS:
        model[f.name] = f.default
  return out
