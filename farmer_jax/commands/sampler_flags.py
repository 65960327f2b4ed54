"""The sampler flags of `sample` and `fid` (--cfg, --guidance, --inverse, --sampler) and their
translation into config.sample overrides (the model's config.sample supplies the rest), and where
both commands sample: the export on its run's mesh (``on_mesh``)."""

import dataclasses
import re

from farmer_jax.commands import common
from farmer_jax.commands.common import Flag
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
  """CLI flags -> dict of config.sample overrides. Integers stay integers (so ``s_c=2.5`` is
  refused, ``s_c=5`` accepted by SamplerConfig.from_config); unknown keys and non-numbers are
  refused here. The keys, and which are text (guidance), come from SAMPLER_FIELDS."""
  out = {}
  if cfg_w is not None:
    out["cfg"] = cfg_w
    if guidance is None:
      out["guidance"] = "resampling" if cfg_w > 0 else "none"
  if guidance is not None:
    out["guidance"] = guidance
  if inverse is not None:
    out["inverse"] = inverse
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
        out[k] = v
        continue
      num = _number(v)
      if SAMPLER_FIELDS[k][2] is bool:   # true/false/1/0; SamplerConfig refuses anything else
        out[k] = v if num is None else num
        continue
      if num is None:
        raise UserError(f"--sampler={extra}: {k}={v!r} is not a number")
      out[k] = num
  return out


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


@dataclasses.dataclass(frozen=True)
class OnMesh:
  """An export placed for sampling on the devices at hand: its ``params`` (and distilled
  ``student``) on the run config's mesh, sharded as in training; the global ``batch``, the
  ``batch_sharding`` that splits it, and ``context()``, the mesh and rules to sample under."""
  params: object
  student: object
  batch: int
  batch_sharding: object
  context: object


def on_mesh(config, mcfg, params, student, batch, say):
  """Places an export (``export.load_model``'s config, ModelConfig and params; ``student``: its
  distilled student's params or None) on the run config's mesh (``sharding.fitting_mesh``) with a
  global ``batch`` (None: SAMPLE_BATCH per data-parallel slot)."""
  import jax
  import numpy as np
  from farmer_jax import sharding
  from farmer_jax.eval.evaluate import params_on_mesh
  host = lambda tree: jax.tree.map(np.asarray, tree)
  mesh, rules, params = params_on_mesh(config, mcfg, host(params), say)
  if student is not None:
    rep = sharding.replicated(mesh)
    student = sharding.host_to_global(host(student), jax.tree.map(lambda _: rep, student))
  slots = sharding.batch_slots(mesh, rules)
  batch = sharding.padded_batch_size(batch or SAMPLE_BATCH * slots, mesh, rules)
  say(f"sampling on mesh {dict(mesh.shape)}, {jax.process_count()} process(es): batch {batch} "
      f"({batch // slots} per data-parallel slot)")
  return OnMesh(params, student, batch, sharding.batch_sharding(mesh, rules),
                lambda: sharding.mesh_context(mesh, rules))
