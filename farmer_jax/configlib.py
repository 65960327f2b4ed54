"""Helpers for the run configs (configs are code: each file has ``get_config(arg)`` returning a
ConfigDict). The shipped ones live in farmer_jax/configs/ and are named by file: ``--config=NAME
[:arg]`` or ``load('quickstart:tiny')``; ``--config=path/to/file.py[:arg]`` loads any other.
"""

import dataclasses
import importlib.util
import os

import ml_collections

from farmer_jax.config.schema import (DATA_SHAPE_FIELDS, DataConfig, EvalConfig, ModelConfig,
                                      SampleConfig, SamplerConfig, TrainConfig)
from farmer_jax.errors import ConfigError

# the shipped configs: the package farmer_jax.configs (installed with farmer_jax)
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_MODULES = {}


def available():
  """Names of the shipped configs (farmer_jax/configs/<name>.py)."""
  files = os.listdir(CONFIGS_DIR)
  return sorted(f[:-3] for f in files if f.endswith(".py") and not f.startswith("_"))


def resolve(spec):
  """A --config value -> the file config_flags loads: 'NAME[:arg]' with NAME a shipped config ->
  '<CONFIGS_DIR>/NAME.py[:arg]'; anything else (a path) unchanged."""
  name, sep, arg = spec.partition(":")
  if name in available():
    return os.path.join(CONFIGS_DIR, name + ".py") + sep + arg
  return spec


def module(name):
  """The module of the shipped config <name> (loaded once), e.g.
  ``module('imagenet256').SAMPLING``."""
  if name not in _MODULES:
    names = available()
    if name not in names:
      raise ConfigError(f"unknown config {name!r}; available configs: {names} (the files in "
                        f"{CONFIGS_DIR}). Fix: use one of them, e.g. "
                        "configlib.load('quickstart:tiny')")
    path = os.path.join(CONFIGS_DIR, name + ".py")
    spec = importlib.util.spec_from_file_location(f"farmer_jax_configs.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _MODULES[name] = mod
  return _MODULES[name]


def load(spec):
  """'name' or 'name:arg' -> the ConfigDict of the shipped config's get_config() or
  get_config(arg), as ``--config=name[:arg]`` loads it, e.g. ``load('imagenet256:1.1B/16')``."""
  name, sep, arg = spec.partition(":")
  get_config = module(name).get_config
  return get_config(arg) if sep else get_config()


def parse_arg(arg, **defaults):
  """Parses 'k1=v1,k2=v2' (or a bare preset name for the first key) into a ConfigDict over
  ``defaults``.

  Values are converted to the type of the default; bools accept true/false/1/0, and a bool key
  alone after the first item means true ('1.1B/16,gpu' = 'model=1.1B/16,gpu=true').
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  keys = list(defaults)
  for i, item in enumerate(arg.split(",")):
    if "=" not in item:
      if i and isinstance(defaults.get(item), bool):
        item = f"{item}=true"
      elif i:
        raise ValueError(f"config arg {item!r} must be key=value or a bool key alone "
                         f"(keys: {keys})")
      else:
        item = f"{keys[0]}={item}"
    k, v = item.split("=", 1)
    if k not in defaults:
      raise ValueError(f"unknown config arg {k!r}; known: {keys}")
    d = defaults[k]
    if isinstance(d, bool):
      if v.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config arg {k}={v!r} must be a bool")
      v = v.lower() in ("true", "1")
    else:
      try:
        v = type(d)(v)
      except ValueError:
        raise ValueError(f"config arg {k}={v!r} must be of type {type(d).__name__}") from None
    out[k] = v
  return out


def base(section_cls, **updates):
  """A config section with every field at its default (the section dataclass's defaults, where
  they live), updated with ``updates``: a ConfigDict, so ``--config.<section>.x=...`` overrides
  work and unknown keys are refused. The model section has no data-shape fields (config.data's)."""
  d = {f.name: f.default for f in dataclasses.fields(section_cls)
       if not f.metadata.get("derived") and not (section_cls is ModelConfig
                                                  and f.name in DATA_SHAPE_FIELDS)}
  if section_cls is SampleConfig:
    d.update(SamplerConfig().settings())
  out = ml_collections.ConfigDict(d)
  out.update(updates)
  return out


def base_model(**updates):
  """``config.model``: every ModelConfig field but the data shape at its default (see ``base``)."""
  return base(ModelConfig, **updates)


def base_data(**updates):
  """``config.data`` at DataConfig's defaults (see ``base``)."""
  return base(DataConfig, **updates)


def base_train(**updates):
  """``config.train`` at TrainConfig's defaults (see ``base``)."""
  return base(TrainConfig, **updates)


def base_eval(**updates):
  """``config.eval`` at EvalConfig's defaults (see ``base``)."""
  return base(EvalConfig, **updates)


def base_sample(**updates):
  """``config.sample``: SampleConfig's grid fields and every sampler key at its default."""
  return base(SampleConfig, **updates)


def gpu(config):
  """The GPU choices on a run config (the ``gpu`` arg of the imagenet256 config, e.g.
  ``--config=imagenet256:1.1B/16,gpu``): cuDNN's fused attention, which needs bf16
  compute (params stay fp32). The ImageNet presets already compute in bf16, so there the overlay
  changes the attention kernel only, an execution field (config/resume.py): a run may be resumed
  with or without it. XLA's GPU flags and NCCL's environment are the launchers' (docs/launch.md,
  docs/performance.md)."""
  config.model.update(attention="cudnn", dtype="bfloat16")
  return config


def base_mesh(config):
  # mesh axes: -1 takes the remaining devices. ('data', 8), ('fsdp', 1) = pure data parallel on 8
  # devices; ('data', 1), ('fsdp', 8) = fully sharded params and optimizer state.
  config.mesh = (("data", -1), ("fsdp", 1))
  # logical axis -> mesh axes; anything unmapped is replicated. The batch spans both axes.
  config.sharding_rules = (("batch", ("data", "fsdp")),)
  # FSDP: params with >= min_params elements are sharded over `axis` on their largest divisible dim.
  config.fsdp = dict(axis="fsdp", min_params=2 ** 16)
