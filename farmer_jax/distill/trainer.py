"""Distillation (Algorithm 2) as a task of the training loop (train/trainer.py): the same mesh,
input pipeline, sharded jitted donating step (``make_guarded_step``), Orbax checkpoints with exact
resume, SIGTERM handling, metrics and progress bar. The state holds the student's params
(distill/student.py); the frozen teacher's params are a sharded, never-donated step argument.

Dequantization: Gaussian noise at ``train.noise_min`` (pretraining's final sigma) on every step:
the student learns the inverse of the teacher on the data distribution the teacher ended on.
"""

import dataclasses
import json
import time
from typing import Any

import jax
import jax.numpy as jnp

from farmer_jax import conventions, sharding
from farmer_jax.artifacts import storage
from farmer_jax.distill.student import (MAX_NOISE, distill_loss, init_student, make_student,
                                        teacher_path)
from farmer_jax.errors import ConfigError
from farmer_jax.model import flow_label
from farmer_jax.train.preemption import preemptible
from farmer_jax.train.state import new_state, state_shardings
from farmer_jax.train.step import make_guarded_step
from farmer_jax.train.trainer import Task, closing, preempted_summary, start


@dataclasses.dataclass
class Teacher:
  """The pretrained model a student learns to invert: ``name`` (what summary.json records) and its
  params (fp32; ShapeDtypeStructs for a step compiled for a target slice, aot/programs.py). The
  params are handed over: ``distillation`` places them on the mesh and drops this reference, so
  that no unsharded copy stays alive while the student trains."""
  name: str
  params: Any


def distillation(teacher):
  """The task of Algorithm 2 with ``teacher`` (a Teacher): the student, a copy of the teacher's AF,
  trained to invert it; the progress bar shows the loss as 'mse'. The student has no likelihood
  of its own: no bits/dim during distillation."""

  def build(setup):
    t, mcfg, tx = setup.run.train, setup.run.model, setup.tx
    if t.init_flow:
      raise ConfigError(f"config.train.init_flow={t.init_flow!r} is for pretraining: a student "
                        "starts as a copy of its teacher's AF. Fix: set "
                        "--config.train.init_flow=''")
    with setup.mesh_context():
      params = sharding.place(teacher.params, setup.param_sh)
    teacher.params = None
    ema = t.ema_decay > 0
    abstract = jax.eval_shape(lambda p: new_state(init_student(p), tx, ema), params)
    state_sh = state_shardings(tx, abstract, setup.param_sh["flow"], setup.mesh)
    init = lambda: setup.born_sharded(lambda p: new_state(init_student(p), tx, ema), state_sh,
                                      params)

    def batch_loss(params, batch, rng, s, teacher):
      k_noise, k_s = jax.random.split(rng)
      x = conventions.dequantize(k_noise, batch["image"], "gaussian", t.noise_min, mcfg.pixels)
      y = batch["label"].astype(jnp.int32)
      loss, per_block = distill_loss(mcfg, params, teacher, x, y, k_s)
      return loss, {f"block_{i}": per_block[i] for i in range(mcfg.flow_blocks)}

    step = make_guarded_step(batch_loss, tx, setup.lr_fn, t.ema_decay)
    return Task(init, abstract, state_sh, setup.jit_step(step, state_sh, (setup.param_sh,)),
                step_args=(params,), postfix=lambda row: {"mse": f"{row['loss']:.4g}"})

  return build


def make_reconstruction_error(cfg):
  """Jitted f(student params, teacher params, eval batch {'image', 'label', 'mask'}) -> (sum over
  the real rows of ||G(F(x)) - x||^2, of ||x||^2); x: patchified bin centres, the teacher's Z^0."""
  student = make_student(cfg)

  @jax.jit
  def errs(sp, teacher, b):
    x = conventions.uint8_to_centre(b["image"], cfg.pixels)
    zs = teacher_path(cfg, teacher, x, b["label"])
    xr, _ = student.apply({"params": sp}, zs[-1], flow_label(cfg, b["label"]))
    m = b["mask"].astype(jnp.float32)
    return (jnp.sum(m * jnp.sum((xr - zs[0]) ** 2, axis=(1, 2))),
            jnp.sum(m * jnp.sum(zs[0] ** 2, axis=(1, 2))))

  return errs


def reconstruction_error(tr, student_params):
  """Relative squared error ||G(F(x)) - x||^2 / ||x||^2 of the student over every example of the
  eval split (``make_reconstruction_error``), sharded over the training mesh like the
  pretraining eval (train/report.py)."""
  batches, steps, _ = tr.eval_batches()
  errs = make_reconstruction_error(tr.mcfg)
  (teacher,) = tr.task.step_args
  num = den = 0.0
  it = iter(batches)
  for _ in range(steps):
    b = sharding.global_batch(next(it), tr.mesh, tr.batch_sh)
    n_, d_ = jax.device_get(errs(student_params, teacher, b))
    num, den = num + float(n_), den + float(d_)
  return num / den


def distill_and_report(run, workdir, teacher, quiet=False, config_change_ok=False, abandon=None,
                       t0=None):
  """The `farmer_jax distill` command's run: Algorithm 2 on ``run`` (the student's RunConfig: the
  teacher's model, commands/distill.py) with ``teacher`` (a Teacher), then summary.json with the
  student's and the undistilled copy's reconstruction errors on the eval split. Returns (summary,
  trainer). ``abandon``: what a SIGTERM during start-up calls (train/preemption.py); ``t0``: when
  the command started (summary.json's total_seconds), default now."""
  t0 = time.time() if t0 is None else t0
  with preemptible(abandon) as preemption:
    tr = start(run, workdir, distillation(teacher), quiet=quiet,
               config_change_ok=config_change_ok, preemption=preemption)
    with closing(tr):
      history = tr.fit()
      if tr.preempted:
        return preempted_summary(tr), tr
      return _report(tr, history, teacher.name, t0), tr


def _report(tr, history, teacher, t0):
  """summary.json of a finished distillation, and its line on the console."""
  (teacher_params,) = tr.task.step_args
  with tr.mesh_context():
    student = reconstruction_error(tr, tr.eval_params())   # what `export --student` takes
    copy = reconstruction_error(tr, init_student(teacher_params))
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
  return summary
