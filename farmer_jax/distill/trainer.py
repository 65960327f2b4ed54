"""`farmer_jax distill`: Algorithm 2 on the pretraining machinery (train/trainer.py): the same
mesh, input pipeline, sharded jitted donating step (``make_guarded_step``), Orbax checkpoints with
exact resume, SIGTERM handling, metrics and progress bar. The state holds the student's params
(distill/student.py); the frozen teacher's params are a sharded, never-donated step argument.

Dequantization: Gaussian noise at ``train.noise_min`` (pretraining's final sigma) on every step:
the student learns the inverse of the teacher on the data distribution the teacher ended on.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections

from farmer_jax import conventions, sharding
from farmer_jax.artifacts import runs, storage
from farmer_jax.errors import ConfigError
from farmer_jax.config.resume import config_changes
from farmer_jax.distill.student import (MAX_NOISE, distill_loss, init_student, make_student,
                                        teacher_path)
from farmer_jax.model import flow_label
from farmer_jax.train.state import new_state, state_shardings
from farmer_jax.train.step import make_guarded_step
from farmer_jax.train.trainer import Trainer, closing, preemptible


def load_teacher(path, say=print):
  """(run config, params) of a teacher: an export directory or a training run (its newest
  readable checkpoint, EMA params if kept)."""
  from farmer_jax.artifacts.export import ExportError, is_export_dir, latest_run_params, load_model
  f32 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)  # noqa: E731
  if storage.is_url(path) and storage.exists(storage.join(path, runs.EXPORT_META)):
    raise ConfigError(f"--teacher={path} is an export in a bucket; exports are read locally. Fix: "
                      "copy it to a local directory (gcloud storage cp -r) or pass the training "
                      "run's workdir")
  if not storage.is_url(path) and is_export_dir(path):
    _, params, config, _ = load_model(path)
    return config, f32(params)    # a bfloat16 export: the student still trains in fp32
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
  return config, f32(params)


def teacher_config(config, teacher_run_config):
  """``config`` (unlocked copy) with the teacher's data shape and model sections: the student is
  the teacher's AF. A config whose own model or data shape differs from the teacher's is refused
  with the differences (distill with the teacher's config file)."""
  diff = [d for d in config_changes(teacher_run_config, config)
          if d.startswith("model.") or d.split(":")[0] in ("data.image_size", "data.channels",
                                                           "data.num_classes")]
  if diff:
    raise ConfigError(f"--config describes another model than the teacher's: {'; '.join(diff)}. "
                      "Fix: distill with the config the teacher was trained with (e.g. "
                      "configs/quickstart.py:distill=1 for a quickstart run)")
  out = ml_collections.ConfigDict(config.to_dict())
  for k in ("image_size", "channels", "num_classes"):
    out.data[k] = teacher_run_config.data[k]
  out.model = ml_collections.ConfigDict(teacher_run_config.model.to_dict())
  return out


class DistillTrainer(Trainer):
  """A Trainer whose state is the student's: ``fit()`` runs Algorithm 2."""

  def __init__(self, config, workdir, teacher, **kw):
    same = (storage.absolute(workdir).rstrip("/") == storage.absolute(teacher).rstrip("/") if
            storage.is_url(workdir) else os.path.realpath(workdir) == os.path.realpath(teacher))
    if same:
      raise ConfigError(f"--workdir={workdir} is the teacher's own folder (--teacher={teacher}); "
                        "the student's checkpoints and config would go into it. Fix: pass a new "
                        "--workdir for the student (e.g. --workdir=RUN_distill)")
    self.teacher_path = teacher
    say = (lambda _: None) if kw.get("quiet") else print
    run_config, self.host_teacher = load_teacher(teacher, say=say)
    super().__init__(teacher_config(config, run_config), workdir, **kw)

  def _build_state_and_step(self):
    t, ema = self.t, self.t.ema_decay > 0
    if t.init_flow:
      raise ConfigError(f"config.train.init_flow={t.init_flow!r} is for pretraining: a student "
                        "starts as a copy of its teacher's AF. Fix: set "
                        "--config.train.init_flow=''")
    mcfg = self.mcfg
    teacher_sh = self.param_sh
    with self.mesh_context():
      self.teacher = jax.device_put(self.host_teacher, teacher_sh)
    del self.host_teacher
    student_sh = self.param_sh["flow"]
    self.abstract_state = jax.eval_shape(
        lambda p: new_state(init_student(p), self.tx, ema), self.teacher)
    self.state_sh = state_shardings(self.tx, self.abstract_state, student_sh, self.mesh)
    with self.mesh_context():
      self.state = jax.jit(lambda p: new_state(init_student(p), self.tx, ema),
                           out_shardings=self.state_sh)(self.teacher)

    def batch_loss(params, batch, rng, s, teacher):
      k_noise, k_s = jax.random.split(rng)
      x = conventions.dequantize(k_noise, batch["image"], "gaussian", t.noise_min,
                                 mcfg.pixels)
      y = batch["label"].astype(jnp.int32)
      loss, per_block = distill_loss(mcfg, params, teacher, x, y, k_s)
      return loss, {f"block_{i}": per_block[i] for i in range(mcfg.flow_blocks)}

    rep = sharding.replicated(self.mesh)
    step = make_guarded_step(batch_loss, self.tx, self.lr_fn, t.ema_decay)
    self.train_step = jax.jit(step, in_shardings=(self.state_sh, self.batch_sh, rep, teacher_sh),
                              out_shardings=(self.state_sh, rep), donate_argnums=(0,))
    self.step_args = (self.teacher,)

  eval_every = 0   # the student has no likelihood of its own: no bits/dim during distillation

  def progress_postfix(self, avg):
    return {"mse": f"{avg['loss']:.4g}"}


def reconstruction_error(tr, student_params):
  """Relative squared error ||G(F(x)) - x||^2 / ||x||^2 of the student over every example of the
  eval split (x: patchified bin centres, the teacher's Z^0), sharded over the training mesh like
  the pretraining eval (train/report.py)."""
  batches, steps, _ = tr.eval_batches()
  student, cfg = make_student(tr.mcfg), tr.mcfg

  @jax.jit
  def errs(sp, teacher, b):
    x = conventions.uint8_to_centre(b["image"], cfg.pixels)
    zs = teacher_path(cfg, teacher, x, b["label"])
    xr, _ = student.apply({"params": sp}, zs[-1], flow_label(cfg, b["label"]))
    m = b["mask"].astype(jnp.float32)
    return (jnp.sum(m * jnp.sum((xr - zs[0]) ** 2, axis=(1, 2))),
            jnp.sum(m * jnp.sum(zs[0] ** 2, axis=(1, 2))))

  num = den = 0.0
  it = iter(batches)
  for _ in range(steps):
    b = sharding.global_batch(next(it), tr.mesh, tr.batch_sh)
    n_, d_ = jax.device_get(errs(student_params, tr.teacher, b))
    num, den = num + float(n_), den + float(d_)
  return num / den


def distill_and_report(config, workdir, teacher, quiet=False, config_change_ok=False,
                       abandon=None):
  """The `farmer_jax distill` command: Algorithm 2, then summary.json with the student's and the
  undistilled copy's reconstruction errors on the eval split. Returns (summary, trainer).
  ``abandon``: what a SIGTERM during start-up calls (train/trainer.py install_sigterm)."""
  t0 = time.time()
  with preemptible(abandon) as stop:
    tr = DistillTrainer(config, workdir, teacher, quiet=quiet, config_change_ok=config_change_ok,
                        stop=stop)
    with closing(tr):
      return _distill(tr, teacher, t0)


def _distill(tr, teacher, t0):
  """Algorithm 2 on a built DistillTrainer, then the report (see distill_and_report)."""
  history = tr.fit()
  if tr.preempted:
    return {"steps": int(tr.state["step"]), "preempted": True, "saved": tr.preempt_saved}, tr
  with tr.mesh_context():
    student = reconstruction_error(tr, tr.eval_params())   # what `export --student` takes
    copy = reconstruction_error(tr, init_student(tr.teacher))
  summary = {"steps": int(tr.state["step"]), "teacher": teacher,
             "final_loss": history[-1]["loss"] if history else None,
             "final_block_losses": {k: v for k, v in (history[-1] if history else {}).items()
                                    if k.startswith("block_")},
             "recon_rel_mse_student": student, "recon_rel_mse_copy": copy,
             "student_noise_max": MAX_NOISE, "total_seconds": time.time() - t0}
  if jax.process_index() == 0:
    storage.write_text(tr.rundir.summary, json.dumps(summary, indent=2))
  split = tr.run.eval.split
  tr.log(f"student reconstruction error (relative MSE on {split}): {student:.3g} (the "
         f"undistilled copy: {copy:.3g})")
  return summary, tr

