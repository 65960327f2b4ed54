"""`farmer_jax distill`: trains the one-step student inverse of a pretrained model's AF (a
training workdir or an export) into its own --workdir; prints its reconstruction error."""

import os
import time

from absl import app

from farmer_jax.commands import common, exits
from farmer_jax.errors import ConfigError

PURPOSE = "distill a pretrained model's AF inverse into a one-step student"
EXAMPLE = ("farmer_jax distill --config=quickstart:distill=1 --teacher=/tmp/run "
           "--workdir=/tmp/s")


def define_flags(fv):
  common.define_run(fv, "The student's run directory (logs, checkpoints).", before_workdir=(
      common.Flag("teacher", None,
                  "The pretrained model, a training workdir or an export directory."),))


def main(f):
  if f.config is None or not f.workdir or not f.teacher:
    raise app.UsageError("--config, --teacher (a training run or export) and --workdir (the "
                         "student's run) are required")
  common.start_jax(f)
  t0 = time.time()
  refuse_teachers_folder(f.workdir, f.teacher)   # before anything is read
  teacher_run, teacher = load_teacher(f.teacher, say=common.say(f))
  from farmer_jax.config.parse import parse
  # the student's run config: the teacher's model, parsed with its workdir before anything is
  # written
  run = parse(teacher_config(f.config, teacher_run), f.workdir)

  from farmer_jax.distill.trainer import distill_and_report
  summary, _ = distill_and_report(run, f.workdir, teacher, quiet=f.quiet,
                                  config_change_ok=f.config_change_ok,
                                  abandon=exits.preempted_during_startup, t0=t0)
  if exits.preempted(summary):
    return
  print(f"student reconstruction error (relative MSE): {summary['recon_rel_mse_student']:.4g} "
        f"(undistilled copy: {summary['recon_rel_mse_copy']:.4g})")


def refuse_teachers_folder(workdir, teacher):
  """ConfigError if --workdir is --teacher's own folder (or a link to it): the student's
  checkpoints and config would go into it."""
  from farmer_jax.artifacts import storage
  same = (storage.absolute(workdir).rstrip("/") == storage.absolute(teacher).rstrip("/") if
          storage.is_url(workdir) else os.path.realpath(workdir) == os.path.realpath(teacher))
  if same:
    raise ConfigError(f"--workdir={workdir} is the teacher's own folder (--teacher={teacher}); "
                      "the student's checkpoints and config would go into it. Fix: pass a new "
                      "--workdir for the student (e.g. --workdir=RUN_distill)")


def load_teacher(path, say=print):
  """(run config, Teacher) of --teacher: an export directory or a training run (its newest
  readable checkpoint, EMA params if kept), params in fp32."""
  import jax
  import jax.numpy as jnp
  from farmer_jax.artifacts import runs, storage
  from farmer_jax.distill.trainer import Teacher
  from farmer_jax.artifacts.export import ExportError, is_export_dir, latest_run_params, load_model
  f32 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)  # noqa: E731
  if storage.is_url(path) and storage.exists(storage.join(path, runs.EXPORT_META)):
    raise ConfigError(f"--teacher={path} is an export in a bucket; exports are read locally. Fix: "
                      "copy it to a local directory (gcloud storage cp -r) or pass the training "
                      "run's workdir")
  if not storage.is_url(path) and is_export_dir(path):
    _, params, config, _ = load_model(path)
    return config, Teacher(path, f32(params))    # a bfloat16 export: the student trains in fp32
  config = runs.read_saved_config(path)
  if config is None:
    raise ConfigError(f"--teacher={path} is neither a farmer_jax export nor a training run (no "
                      f"{runs.CONFIG}). Fix: pass the workdir of a finished pretraining run or an "
                      "export directory")
  try:
    params, step, ema = latest_run_params(path, say=say)
  except ExportError as e:
    raise ConfigError(f"--teacher={path}: {e}") from None
  say(f"teacher: {path} at step {step}{' (EMA params)' if ema else ''}")
  return config, Teacher(path, f32(params))


def teacher_config(config, teacher_run_config):
  """``config`` (unlocked copy) with the teacher's data shape and model sections: the student is
  the teacher's AF. A config whose own model or data shape differs from the teacher's is refused
  with the differences (distill with the teacher's config file)."""
  import ml_collections
  from farmer_jax.config.resume import config_changes
  diff = [d for d in config_changes(teacher_run_config, config)
          if d.startswith("model.") or d.split(":")[0] in ("data.image_size", "data.channels",
                                                           "data.num_classes")]
  if diff:
    raise ConfigError(f"--config describes another model than the teacher's: {'; '.join(diff)}. "
                      "Fix: distill with the config the teacher was trained with (e.g. "
                      "--config=quickstart:distill=1 for a quickstart run)")
  out = ml_collections.ConfigDict(config.to_dict())
  for k in ("image_size", "channels", "num_classes"):
    out.data[k] = teacher_run_config.data[k]
  out.model = ml_collections.ConfigDict(teacher_run_config.model.to_dict())
  return out
