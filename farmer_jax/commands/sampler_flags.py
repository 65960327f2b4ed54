"""The sampler flags of `sample` and `fid` (--cfg, --guidance, --inverse, --sampler) and their
translation into config.sample overrides (the model's config.sample supplies the rest)."""

import re

from farmer_jax.commands import common
from farmer_jax.commands.common import Flag
from farmer_jax.config import schema
from farmer_jax.config.schema import (GUIDANCE_MODES, INVERSES, SAMPLE_BATCH, SAMPLER_FIELDS,
                                      SAMPLER_KEYS, SamplerConfig)
from farmer_jax.config.rules import SettingError
from farmer_jax.errors import UserError


# --sampler takes every sampler setting; its help lists those without a flag of their own
_OWN_FLAG = ("guidance", "cfg", "inverse")
FLAGS = (
    Flag("cfg", None, "Guidance scale w (default: the model config's sample.cfg).", float),
    Flag("inverse", None, "The AF inverse: exact (sequential), jacobi (parallel fixed-point; "
         "--sampler=jacobi_tol=...,jacobi_max_iters=...) or student (the distilled one-step "
         "inverse the export carries). Default: the config's.", choices=INVERSES),
    Flag("guidance", None, "Guidance method (default: resampling if cfg > 0 else the config's).",
         choices=GUIDANCE_MODES),
    Flag("sampler", None, "Extra sampler settings 'k=v,...' ("
         + ", ".join(k for k in SAMPLER_KEYS if k not in _OWN_FLAG) + ")."),
)


def define(fv):
  common.define(fv, FLAGS)


def _number(text):
  """'5' -> 5, '2.5' -> 2.5, 'nan' -> nan (validation refuses it with its own message); None if not
  a number."""
  text = text.strip()
  if re.fullmatch(r"[+-]?\d+", text):
    return int(text)
  try:
    return float(text)
  except ValueError:
    return None


def sampler_overrides(cfg_w, guidance, extra, inverse=None):
  """CLI flags -> dict of config.sample overrides (``schema.sampler_overrides``). Integers in
  --sampler stay integers (so ``s_c=2.5`` is refused, ``s_c=5`` accepted by
  SamplerConfig.from_config); unknown keys and non-numbers are refused here. The keys, and which
  are text (guidance), come from SAMPLER_FIELDS."""
  settings = {}
  if extra:
    for item in extra.split(","):
      if "=" not in item:
        raise UserError(
            f"--sampler entry {item!r} must be key=value (keys: {', '.join(SAMPLER_KEYS)})")
      k, v = (p.strip() for p in item.split("=", 1))
      if k not in SAMPLER_KEYS:
        raise UserError(
            f"--sampler={extra}: unknown setting {k!r}; known: {', '.join(SAMPLER_KEYS)}")
      if SAMPLER_FIELDS[k][2] is str:
        settings[k] = v
        continue
      num = _number(v)
      if SAMPLER_FIELDS[k][2] is bool:   # true/false/1/0; SamplerConfig refuses anything else
        settings[k] = v if num is None else num
        continue
      if num is None:
        raise UserError(f"--sampler={extra}: {k}={v!r} is not a number")
      settings[k] = num
  return schema.sampler_overrides(cfg_w, guidance, inverse, settings)


def sampler_error(e):
  return UserError(
      f"sampler setting {e}. Fix: pass a valid --cfg, --guidance or --sampler value "
      "(the rest come from "
      "the model's config.sample)")


def checked_overrides(f):
  """The sampler flags as config.sample overrides, checked on their own (defaults elsewhere) so
  that a bad value fails before any model is loaded."""
  over = sampler_overrides(f.cfg, f.guidance, f.sampler, f.inverse)
  try:
    SamplerConfig.from_config(over)
  except SettingError as e:
    raise sampler_error(e) from e
  return over


BATCH_HELP = (f"Samples per call, over all devices (default: {SAMPLE_BATCH} per data-parallel "
              "device slot of the model's mesh; rounded up to a multiple of the slots and of the "
              "processes). Results do not depend on it, nor on the device or process count.")
