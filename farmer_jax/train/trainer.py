"""The training loop of pretraining and distillation, in big_vision's shape: mesh -> input -> model
and optimizer from shapes -> the task's sharded state and one jitted step -> restore -> loop.

What differs between pretraining and distillation is a ``Task`` value (the state, the step and its
extra arguments, what the progress bar shows, the periodic evaluation), built by a function of the
``Setup`` they share (``pretraining`` here; distill/trainer.py ``distillation``). ``start`` takes
the workdir (train/session.py), builds the Setup and the Task and restores; ``Trainer.fit`` is
the loop. SIGTERM: train/preemption.py. The post-training report: train/report.py."""

import contextlib
import dataclasses
import sys
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from farmer_jax import sharding, xla_options
from farmer_jax.artifacts import runs, storage
from farmer_jax.artifacts.metrics import flat_hparams
from farmer_jax.config.parse import RunConfig, resolved_config
from farmer_jax.data.pipeline import TrainInput, eval_batches
from farmer_jax.errors import ConfigError, UserError, brief
from farmer_jax.eval.likelihood import eval_scalars
from farmer_jax.model import Farmer, abstract_params
from farmer_jax.train.optim import make_optimizer
from farmer_jax.train.preemption import Preemption, preemptible
from farmer_jax.train.report import (evaluate, format_test_bpd, log_grid, periodic_classes,
                                     res_summary, sample_grid, write_curves, write_report)
from farmer_jax.train.session import TAKEN, UNREFRESHABLE, Session
from farmer_jax.train.state import abstract_state, init_state, state_shardings
from farmer_jax.train.step import make_train_step


@dataclasses.dataclass(frozen=True)
class Setup:
  """What every task builds on: the run config, the mesh and its logical-axis rules, the input
  pipeline with its batch sharding, the model and its optimizer, and the shardings of the model's
  params."""
  run: RunConfig
  workdir: str
  log: Callable[[str], None]
  mesh: Any
  batch_sh: Any
  input: TrainInput
  model: Farmer
  tx: Any
  lr_fn: Callable
  param_sh: Any

  def mesh_context(self):
    """Mesh + logical-axis rules active while tracing / running jitted code."""
    return sharding.mesh_context(self.mesh, self.run.sharding_rules)

  def born_sharded(self, init, state_sh, *args):
    """``init(*args)`` jitted straight into ``state_sh``: a state that never exists unsharded."""
    with self.mesh_context():
      return jax.jit(init, out_shardings=state_sh)(*args)

  def jit_step(self, step, state_sh, arg_shardings=()):
    """``step(state, batch, rng, *args) -> (state, metrics)`` jitted on the mesh, the state
    donated; ``arg_shardings``: those of the extra (never donated) arguments. On a TPU mesh it
    compiles with ``config.train.xla_options`` (xla_options.py)."""
    rep = sharding.replicated(self.mesh)
    return jax.jit(step, in_shardings=(state_sh, self.batch_sh, rep) + tuple(arg_shardings),
                   out_shardings=(state_sh, rep), donate_argnums=(0,),
                   compiler_options=xla_options.for_devices(self.mesh.devices.flat,
                                                            self.run.train.xla_options))


@dataclasses.dataclass(frozen=True)
class Task:
  """What a run trains: ``init()`` -> the fresh state (born sharded; called only when there is no
  checkpoint to resume), the state's shapes and shardings, the jitted ``step``
  (``Setup.jit_step``) and its extra arguments, what the progress shows of a logged row, and
  ``evaluate(trainer, writer, step)`` every ``eval_every`` steps (0: never), the metrics TensorBoard
  shows beside the hyperparameters.

  Building a Task runs nothing on the devices, so the same Task also serves a program compiled
  for a slice this machine does not have (aot/programs.py: abstract step arguments)."""
  init: Callable[[], Any]
  abstract_state: Any
  state_sh: Any
  step: Callable
  step_args: tuple = ()
  postfix: Callable[[dict], dict] = lambda row: {}
  eval_every: int = 0
  evaluate: Optional[Callable] = None
  # the scalar tags TensorBoard's HPARAMS tab shows beside the run's hyperparameters
  hparam_metrics: tuple = ()


# ------------------------------------------------------------------------------------- pretraining


def pretraining(setup):
  """Pretraining: a freshly initialised Farmer state (its AF from ``train.init_flow`` if set), the
  train step, bits/dim every ``config.eval.every`` steps."""
  run, t, mcfg, tx = setup.run, setup.run.train, setup.run.model, setup.tx
  ema = t.ema_decay > 0
  abstract = abstract_state(mcfg, tx, ema)
  state_sh = state_shardings(tx, abstract, setup.param_sh, setup.mesh)

  def init():
    flow = _init_flow(setup) if t.init_flow else None
    return setup.born_sharded(lambda rng, f: init_state(mcfg, tx, rng, ema, flow=f), state_sh,
                              jax.random.key(t.seed), flow)

  step = make_train_step(setup.model, mcfg, t, tx, setup.lr_fn)
  return Task(init, abstract, state_sh, setup.jit_step(step, state_sh),
              postfix=lambda row: {"loss(nats/dim)": f"{row['loss']:.3f}",
                                   "sigma": f"{row['noise_sigma']:.3f}"},
              eval_every=run.eval.every, evaluate=_periodic_eval,
              hparam_metrics=("eval/bpd", "eval/bpd_uncond"))


def _init_flow(setup):
  """The AF params of ``train.init_flow`` (a TARFlow checkpoint) for a fresh run (a resumed one
  restores its checkpoint instead). ConfigError naming the field if the file is unreadable or
  does not fit model.* (before training writes anything)."""
  from farmer_jax.interop.tarflow import tarflow_to_params
  from farmer_jax.interop.torch_checkpoint import load_state_dict
  path = setup.run.train.init_flow
  try:
    flow = tarflow_to_params(load_state_dict(path), setup.run.model)
  except (OSError, ValueError) as e:
    raise ConfigError(f"config.train.init_flow={path!r} cannot start this model's AF: {e}. "
                      "Fix: pass a TARFlow checkpoint of this AF, or set the model.* fields "
                      "named above") from None
  setup.log(f"AF initialised from the TARFlow checkpoint {path}")
  return flow


def _periodic_eval(tr, writer, step):
  """Bits/dim of the eval split at ``step`` -> metrics.jsonl and TensorBoard as ``eval/bpd``,
  ``eval/bpd_uncond`` and the NLL terms; the grid of ``config.sample.periodic_classes`` classes
  -> WORKDIR/samples/step_N.png and TensorBoard's ``samples`` (a grid with non-finite samples is
  reported and skipped, not fatal). Neither touches the train state or its keys: the training
  trajectory is the same with or without them."""
  tr.check_finite()
  res = evaluate(tr, leave=False)
  writer.write(step, eval_scalars(res), prefix="eval")
  said = format_test_bpd(res_summary(res))
  classes = periodic_classes(tr.run)
  if classes:
    path = tr.rundir.step_grid(step)
    try:
      images = sample_grid(tr, path, classes)
    except UserError as e:   # non-finite samples (every process sees them): training goes on
      said += f"; no sample grid: {e}"
    else:
      log_grid(writer, images, step)
      said += f"; samples -> {path}"
  tr.log(f"step {step}: {said}")


# ------------------------------------------------------------------------------------- start-up


def start(run: RunConfig, workdir: str, task=pretraining, *, quiet=False, devices=None,
          config_change_ok=False, preemption: Optional[Preemption] = None):
  """A Trainer for ``run`` (parsed for this workdir and these ``devices``, default all) training
  ``task(setup) -> Task``, resumed from the workdir's newest checkpoint.

  One run per workdir: the lock is the first file written, before anything is built, so a busy
  workdir is refused at once. A SIGTERM during the build (``preemption`` with ``abandon``) ends the
  process after releasing the lock; from the restore on it only sets ``preemption.stop``, and
  ``fit`` stops before its first step. A failed start stops the input and releases the lock."""
  log = _logger(quiet)
  preemption = preemption if preemption is not None else Preemption()
  session = Session(run, workdir, log, config_change_ok)
  inp = None
  preemption.starting(session.release)
  try:
    session.acquire()
    setup = make_setup(run, sharding.make_mesh(run.mesh, devices), workdir, log)
    t, mesh, batch_sh = run.train, setup.mesh, setup.batch_sh
    inp = TrainInput(run.data, t.batch_size, t.seed, jax.process_index(), jax.process_count(),
                     put=lambda b: sharding.global_batch(b, mesh, batch_sh))
    setup = dataclasses.replace(setup, input=inp)
    built = task(setup)
    preemption.started()
    state, restored_step = _restore(session, built, inp, log)
  except BaseException:
    with contextlib.suppress(OSError):   # reported: the failure itself, not the close's
      _close(inp, session)
    preemption.starting(None)
    raise
  return Trainer(setup, built, session, state, restored_step, preemption, quiet)


def make_setup(run: RunConfig, mesh, workdir=None, log=lambda msg: None, input=None):
  """The Setup of ``run`` on ``mesh``: batch and param shardings, model, optimizer. ``start`` adds
  the input pipeline; a program compiled for a target slice has none (aot/programs.py)."""
  tx, lr_fn = make_optimizer(run.train)
  param_sh = sharding.param_shardings(abstract_params(run.model, boxed=True), mesh,
                                      run.sharding_rules, run.fsdp)
  return Setup(run, workdir, log, mesh, sharding.batch_sharding(mesh, run.sharding_rules), input,
               Farmer(run.model), tx, lr_fn, param_sh)


def _restore(session, task, inp, log):
  """(state, restored step or None): the newest checkpoint's, or the task's fresh one; starts the
  input where that state stopped."""
  restored = session.restore(task.abstract_state, task.state_sh)
  if restored is None:
    state = task.init()
    inp.start(0)
    return state, None
  state, step, data_meta, data_state = restored
  how = inp.start(int(state["step"]), (data_meta, data_state))
  log(f"resumed from {session.ckpt.directory} at step {step}; {how}")
  return state, step


def _logger(quiet):
  def log(msg):
    if not quiet and jax.process_index() == 0:
      tqdm.write(msg)
  return log


def _close(inp, session):
  if inp is not None:
    inp.close()
  session.release()


def _any_process(values, reduce):
  """``reduce`` (np.any, np.max) of ``values`` over every process (a sync of all of them)."""
  if jax.process_count() == 1:
    return values
  gathered = np.asarray(multihost_utils.process_allgather(np.asarray(values)))
  return reduce(gathered.reshape((-1,) + np.shape(values)), axis=0)


# ------------------------------------------------------------------------------------- the loop


class Trainer:
  """A started run (see ``start``): its Setup, Task and state, and the workdir it holds; ``fit()``
  trains, ``close()`` stops the input and releases the workdir."""

  def __init__(self, setup, task, session, state, restored_step, preemption, quiet):
    self.setup, self.task, self.session = setup, task, session
    self.state, self.restored_step = state, restored_step
    self.preemption, self.quiet = preemption, quiet
    # progress bars (training, eval, sampling) on process 0's terminal only: in a log file (pods,
    # SLURM) every bar frame would be a line; _Progress prints plain lines there instead
    self.bars = not quiet and jax.process_index() == 0 and _terminal(sys.stderr)
    self.run, self.t, self.mcfg = setup.run, setup.run.train, setup.run.model
    self.workdir, self.rundir = session.workdir, session.rundir
    self.mesh, self.batch_sh, self.input, self.model = (setup.mesh, setup.batch_sh, setup.input,
                                                        setup.model)
    self.train_step, self.log, self.mesh_context = task.step, setup.log, setup.mesh_context
    self.num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state["params"]))
    self.rng = jax.random.key(self.t.seed + 1)
    self.preempted = self.preempt_saved = False
    self._trace_from = None   # the first traced step while a profiler trace is open

  @property
  def lock(self):
    return self.session.lock

  def fit(self, stop_at=None):
    """Trains to ``train.steps`` (or only up to step ``stop_at``, e.g. for a staged run), then
    checkpoints; returns the logged rows ({'step', metrics..., 'steps_per_s'})."""
    t = self.t
    end = t.steps if stop_at is None else min(int(stop_at), t.steps)
    start = int(self.state["step"])
    # all processes stop, or none (a lone one would hang a step)
    if _any_process(self.preemption.stop.is_set(), np.any):
      self.log("SIGTERM before training started: exiting; nothing new to save")
      self.preempted = True
      return []
    writer = self._begin(start)
    history, rows = [], _Rows(start)
    progress = _Progress(start, t.steps, self.task.postfix, bar=self.bars,
                         lines=not self.bars and jax.process_index() == 0)
    self.preemption.catch_unhandled()
    try:
      with self.mesh_context():
        for s in range(start, end):
          self._trace_before(s)
          self.state, m = self.train_step(self.state, next(self.input), self.rng,
                                          *self.task.step_args)
          rows.add(m)
          self._trace_after(s)
          progress.update()
          # the row of a preemption step is logged too: the resumed run logs only later steps
          if (s + 1) % t.log_every == 0 or s + 1 == end:
            self.check_finite()
            history.append(rows.log(s + 1, writer))
            progress.logged(history[-1])
          if self._preempted(s):
            break
          if t.ckpt_every and (s + 1) % t.ckpt_every == 0 and s + 1 < end:
            self.save_checkpoint()
          if self.task.eval_every and (s + 1) % self.task.eval_every == 0 and s + 1 < t.steps:
            self.task.evaluate(self, writer, s + 1)
      self._trace_after(int(self.state["step"]) - 1, force=True)
      if not self.preempted and int(self.state["step"]) > start:
        self._check_owned()
        self.save_checkpoint()
    finally:   # also on a non-finite step or Ctrl-C: pending saves finish, metrics reach the run
      progress.close()
      self.session.end(writer)
    return history

  def _begin(self, start):
    """Before the first step: the workdir must still be ours; config.json, the metrics and the
    periodic sample grids trimmed to ``start`` (this run draws the later ones again), the
    hyperparameters to TensorBoard, the model's line on the console; returns the metric writer."""
    self._check_owned()
    writer = self.session.begin(start)
    if jax.process_index() == 0:
      for step, path in self.rundir.step_grids().items():
        if step > start:
          storage.remove(path)
      writer.hparams(flat_hparams(resolved_config(self.run.source).to_dict()),
                     self.task.hparam_metrics)
    m = self.mcfg
    prior = f"dimred={m.dimred}" if m.prior == "ar" else f"prior={m.prior}"
    self.log(f"{'FARMER' if m.prior == 'ar' else 'AF'}: {self.num_params / 1e6:.2f}M "
             f"params, N={m.num_tokens} tokens of d={m.token_dim}, {prior}, "
             f"mesh={dict(self.mesh.shape)}")
    return writer

  def _preempted(self, s):
    """After step execution ``s``: stops (raises) once the workdir is no longer provably ours;
    on SIGTERM saves a checkpoint and returns True. Checked every step with one process, with
    several every ``train.preempt_check_every`` steps (an all-process sync)."""
    if jax.process_count() > 1 and (s + 1) % self.t.preempt_check_every:
      return False
    stop, lock_state = _any_process(
        np.array([int(self.preemption.stop.is_set()), self.session.lock_state()]), np.max)
    if lock_state:
      self._stop_unowned(int(lock_state))
    if stop:
      self.log(f"SIGTERM: saving a checkpoint at step {s + 1} and exiting; re-run the same "
               "command to resume")
      self.save_checkpoint()
      self.preempted = self.preempt_saved = True
    return bool(stop)

  def _check_owned(self):
    """Before a write outside the step loop's checks (the config at the start, the final
    checkpoint): stops, as the loop would, if another run took the workdir lock meanwhile."""
    lock_state = int(_any_process(self.session.lock_state(), np.max))
    if lock_state == TAKEN:
      self._stop_unowned(lock_state)

  def _stop_unowned(self, lock_state):
    """Stops training once this run can no longer prove it owns the workdir: it saves first only
    if the lock is still its own (not refreshable, e.g. a full disk), never into a workdir that
    another run has taken."""
    step = int(self.state["step"])
    if lock_state == UNREFRESHABLE:
      self.save_checkpoint()
    raise self.session.lost(step, lock_state) from None

  def _trace_before(self, s):
    """Starts the profiler trace before step execution s = train.profile_start (if
    train.profile_steps > 0); every process writes its host's trace into WORKDIR/profile."""
    t = self.t
    if t.profile_steps and self._trace_from is None and s == t.profile_start:
      jax.profiler.start_trace(storage.join(self.workdir, runs.PROFILE))
      self._trace_from = s

  def _trace_after(self, s, force=False):
    """Stops an open trace after its last step (or, ``force``, wherever training stopped)."""
    if self._trace_from is None:
      return
    if force or s + 1 == self.t.profile_start + self.t.profile_steps:
      jax.block_until_ready(self.state["step"])
      jax.profiler.stop_trace()
      self.log(f"profiler trace of step executions {self._trace_from}..{s} -> "
               f"{storage.join(self.workdir, runs.PROFILE)}")
      self._trace_from = None

  def check_finite(self):
    """FloatingPointError if a step was not applied for a non-finite loss or gradient."""
    bad = int(self.state["bad_step"])
    if bad >= 0:
      raise FloatingPointError(
          f"non-finite loss or gradient at step {bad}; stopping before anything is saved. "
          "Lower train.lr, enable train.grad_clip, or raise train.noise_min.")

  def save_checkpoint(self):
    """Async save of the full train state (never of a state that saw a non-finite step)."""
    self.check_finite()
    self.session.save(self.state, self.input.checkpoint())

  def eval_batches(self):
    """(this process's batches, number of batches, number of examples) of ``config.eval.split``
    (data/pipeline.py ``eval_batches``: every example once, masked padding). The eval batch is
    rounded up to a multiple of the mesh's data-parallel slots and of the process count."""
    e = self.run.eval
    batch = sharding.padded_batch_size(e.batch_size, self.mesh, self.run.sharding_rules)
    return eval_batches(self.run.data, e.split, batch, jax.process_index(), jax.process_count())

  def eval_params(self):
    return self.state.get("ema", self.state["params"])

  def close(self):
    """Stops the input's threads/workers, releases the workdir lock (and removes the directories
    this run created but never wrote to)."""
    _close(self.input, self.session)


def _terminal(stream):
  """Whether ``stream`` is a terminal (a file, a pipe or a closed stream is not)."""
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


class _Progress:
  """The training progress: a tqdm bar on ``stream`` (``bar``: a terminal), or (``lines``) one plain
  line per logged row on ``out`` (default stdout), every ``train.log_every`` steps:
  ``step S/T: <the task's postfix>, R steps/s, ETA H:MM:SS``. A log file (pods, SLURM, --quiet)
  gets these lines instead of a bar frame per step."""

  def __init__(self, start, total, postfix, bar, lines, stream=None, out=None):
    self.total, self.postfix, self.show_bar, self.lines, self.out = total, postfix, bar, lines, out
    self.bar = tqdm(total=total, initial=start, disable=not bar, desc="train", dynamic_ncols=True,
                    file=stream)

  def update(self):
    self.bar.update(1)

  def logged(self, row):
    """A logged row ({'step', metrics..., 'steps_per_s'}): the bar's postfix, or a line."""
    if self.show_bar:
      self.bar.set_postfix(self.postfix(row))
    elif self.lines:
      print(progress_line(row, self.postfix(row), self.total), file=self.out or sys.stdout,
            flush=True)

  def close(self):
    self.bar.close()


def progress_line(row, shown, total):
  """'step 1200/400000: loss(nats/dim) 3.123, sigma 0.099, 2.41 steps/s, ETA 45:51:07': a logged
  ``row`` with the task's ``shown`` metrics, its steps/s and the time left to step ``total`` at
  that rate."""
  rate, step = row["steps_per_s"], row["step"]
  eta = tqdm.format_interval((total - step) / rate) if rate > 0 else "?"
  metrics = "".join(f"{k} {v}, " for k, v in shown.items())
  return f"step {step}/{total}: {metrics}{rate:.3g} steps/s, ETA {eta}"


class _Rows:
  """The step metrics since the last logged row, averaged into the next one with steps/s."""

  def __init__(self, step):
    self.pending, self.tick, self.tick_step = [], time.time(), step

  def add(self, metrics):
    self.pending.append(metrics)

  def log(self, step, writer):
    vals = jax.device_get(self.pending)
    avg = {k: float(np.mean([v[k] for v in vals])) for k in vals[0]}
    now = time.time()
    avg["steps_per_s"] = (step - self.tick_step) / max(now - self.tick, 1e-9)
    self.tick, self.tick_step, self.pending = now, step, []
    writer.write(step, avg)
    return {"step": step, **avg}


# ------------------------------------------------------------------------------------ the command


def train_and_report(run, workdir, quiet=False, config_change_ok=False, abandon=None):
  """The `farmer_jax train` command: train, then report (train/report.py: test bits/dim,
  samples.png, curves.png, summary.json; a preempted run: curves.png); returns (summary dict,
  trainer). ``abandon``: what a SIGTERM during start-up calls (train/preemption.py).

  The test bits/dim (uniform dequantization) is reported twice on the same noise: ``test_bpd``
  with the true labels, -log p(x|y), and ``test_bpd_uncond`` with the null label, -log p(x|null)
  (the literature's ImageNet number); both are equal for an unconditional model
  (``class_conditional`` False).
  """
  t0 = time.time()
  with preemptible(abandon) as preemption:
    tr = start(run, workdir, quiet=quiet, config_change_ok=config_change_ok,
               preemption=preemption)
    with closing(tr):
      history = tr.fit()
      train_s = time.time() - t0
      if tr.preempted:   # SIGTERM: the checkpoint (if any step ran) is saved; no eval, sampling
        try:
          write_curves(tr)
        except Exception as e:  # noqa: BLE001 - a picture must not turn a clean stop into a failure
          tr.log(f"curves.png was not written ({brief(e)})")
        return preempted_summary(tr), tr
      summary = write_report(tr, history, train_s, t0)
  return summary, tr


def preempted_summary(tr):
  """What a preempted run reports (commands/exits.py ``preempted`` says it)."""
  return {"steps": int(tr.state["step"]), "preempted": True, "saved": tr.preempt_saved}


@contextlib.contextmanager
def closing(tr):
  """Closes ``tr`` after the block; when the block failed, that failure is the one reported, not
  a failure to close that it caused (a lock file in a workdir that became unwritable)."""
  try:
    yield tr
  except BaseException:
    with contextlib.suppress(OSError):
      tr.close()
    raise
  tr.close()
