"""FARMER training loop (big_vision shape: mesh -> input -> model from shapes -> shard -> one jitted
step -> loop), checkpoint/resume and SIGTERM. The step is train/step.py's, the state
train/state.py's; the post-training report is train/report.py's."""

import contextlib
import signal
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from farmer_jax import sharding
from farmer_jax.artifacts import runs, storage
from farmer_jax.config.parse import RunConfig, parse, resolved_config
from farmer_jax.config.resume import config_changes
from farmer_jax.errors import ConfigError
from farmer_jax.data.pipeline import TrainInput, eval_batches, state_holder
from farmer_jax.errors import UserError
from farmer_jax.model import Farmer, abstract_params
from farmer_jax.artifacts.checkpoint import Checkpointer
from farmer_jax.artifacts.lock import WorkdirBusyError, WorkdirLock, WorkdirLockLost
from farmer_jax.artifacts.metrics import MetricWriter, trim_metrics
from farmer_jax.train.optim import make_optimizer
from farmer_jax.eval.likelihood import eval_scalars
from farmer_jax.train.report import evaluate, format_test_bpd, res_summary, write_report
from farmer_jax.train.state import abstract_state, init_state, state_shardings
from farmer_jax.train.step import make_train_step


class Trainer:
  """Builds everything from a parsed run config (resuming from the workdir); ``fit()`` trains.

  ``config``: a RunConfig parsed for this workdir and these devices (``config.parse``), or a
  ConfigDict, parsed here (the whole run config, the workdir and the mesh vs these devices: raises
  before any file is written)."""

  def __init__(self, config, workdir: str, quiet: bool = False, devices=None,
               config_change_ok: bool = False, stop: "threading.Event | None" = None):
    if not isinstance(config, RunConfig):
      config = parse(config, workdir, num_devices=len(devices) if devices is not None else None)
    self.run = config
    self.config = config.source
    self.mcfg = config.model
    self.config_change_ok = config_change_ok
    # set by SIGTERM (see install_sigterm)
    self.stop = stop if stop is not None else threading.Event()
    self.lock = None
    self.input = None
    self._created_dirs = []   # directories the lock created, removed on close if still empty
    self.workdir = workdir
    self.rundir = runs.RunDir(workdir)
    self.quiet = quiet
    self.t = config.train
    # ---- one run per workdir: the lock is the first file written, before anything is built, so
    # a busy workdir is refused at once; then build and resume from its newest checkpoint ----
    # A SIGTERM during the build ends the process at once, releasing this lock first (nothing
    # else is written yet); from the restore on (it may move a bad checkpoint aside) it only sets
    # stop: fit() stops before its first step and close() releases the lock (install_sigterm).
    _STARTING.append(self)
    try:
      self._take_lock()
      self._build(devices)
      _ABANDONABLE.clear()
      _STARTING.remove(self)
      self._restore()
    except BaseException:
      with contextlib.suppress(OSError):   # reported: the failure itself, not the close's
        self.close()
      if self in _STARTING:
        _STARTING.remove(self)
      raise
    self.preempted = self.preempt_saved = False
    self._trace_from = None   # the first traced step while a profiler trace is open

  def _build(self, devices):
    """Mesh -> input pipeline -> model and optimizer from shapes -> the sharded state and the
    jitted step."""
    t, run = self.t, self.run
    # ---- mesh ----
    self.mesh = sharding.make_mesh(run.mesh, devices)
    self.rules = run.sharding_rules
    # ---- input pipeline ----
    self.batch_sh = sharding.batch_sharding(self.mesh, self.rules)
    self.input = TrainInput(run.data, t.batch_size, t.seed,
                            jax.process_index(), jax.process_count(),
                            put=lambda b: sharding.global_batch(b, self.mesh, self.batch_sh))
    # ---- model and optimizer from shapes ----
    self.model = Farmer(self.mcfg)
    self.tx, self.lr_fn = make_optimizer(t)
    self.param_sh = sharding.param_shardings(abstract_params(self.mcfg, boxed=True), self.mesh,
                                             self.rules, run.fsdp)
    # the state (born sharded) and the one jitted, donating step
    self.step_args = ()   # extra (never donated) arguments of train_step after (state, batch, rng)
    self._build_state_and_step()
    self.num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self.state["params"]))
    self.rng = jax.random.key(t.seed + 1)

  def _build_state_and_step(self):
    """Pretraining: a freshly initialised Farmer state and its train step (distill/trainer.py
    overrides this for the student)."""
    t, ema = self.t, self.t.ema_decay > 0
    self.abstract_state = abstract_state(self.mcfg, self.tx, ema)
    self.state_sh = state_shardings(self.tx, self.abstract_state, self.param_sh, self.mesh)
    flow = self._init_flow() if t.init_flow else None
    with self.mesh_context():
      self.state = jax.jit(lambda rng, f: init_state(self.mcfg, self.tx, rng, ema, flow=f),
                           out_shardings=self.state_sh)(jax.random.key(t.seed), flow)
    rep = sharding.replicated(self.mesh)
    step = make_train_step(self.model, self.mcfg, t, self.tx, self.lr_fn)
    self.train_step = jax.jit(step, in_shardings=(self.state_sh, self.batch_sh, rep),
                              out_shardings=(self.state_sh, rep), donate_argnums=(0,))

  def _init_flow(self):
    """The AF params of ``train.init_flow`` (a TARFlow checkpoint) for a fresh run; None when the
    run has checkpoints (resume restores them instead). ConfigError naming the field if the file
    is unreadable or does not fit model.* (before anything is written)."""
    from farmer_jax.interop.tarflow import tarflow_to_params
    from farmer_jax.interop.torch_checkpoint import load_state_dict
    ckpt = Checkpointer(self.rundir.checkpoints, read_only=True)
    try:
      if storage.isdir(ckpt.directory) and ckpt.steps():
        return None
    finally:
      ckpt.close()
    path = self.t.init_flow
    try:
      flow = tarflow_to_params(load_state_dict(path), self.mcfg)
    except (OSError, ValueError) as e:
      raise ConfigError(f"config.train.init_flow={path!r} cannot start this model's AF: {e}. "
                        "Fix: pass a TARFlow checkpoint of this AF, or set the model.* fields "
                        "named above") from None
    self.log(f"AF initialised from the TARFlow checkpoint {path}")
    return flow

  def progress_postfix(self, avg):
    """What the progress bar shows from a logged row of metrics."""
    return {"loss(nats/dim)": f"{avg['loss']:.3f}", "sigma": f"{avg['noise_sigma']:.3f}"}

  @property
  def eval_every(self):
    """Steps between bits/dim evaluations during training (``config.eval.every``; 0 = none)."""
    return self.run.eval.every

  def periodic_eval(self, writer, step):
    """Bits/dim of the eval split at ``step`` (``config.eval.every``) -> metrics.jsonl and
    TensorBoard as ``eval/bpd``, ``eval/bpd_uncond`` and the NLL terms."""
    self._check_finite()
    res = evaluate(self, leave=False)
    writer.write(step, eval_scalars(res), prefix="eval")
    self.log(f"step {step}: {format_test_bpd(res_summary(res))}")

  def _take_lock(self):
    """Process 0 takes the workdir lock; with several processes every one learns the outcome, so
    a busy workdir stops them all at once instead of leaving the others in a collective."""
    error = None
    if jax.process_index() == 0:
      # a bucket has no empty folders to clean up
      self._created_dirs = ([] if storage.is_url(self.workdir) else
                            storage.missing_dirs(self.workdir))
      self.lock = WorkdirLock(self.workdir, say=self.log)   # seen by a start-up SIGTERM
      try:
        self.lock.acquire()
      except Exception as e:  # noqa: BLE001 - every process learns the outcome before one raises
        with contextlib.suppress(Exception):
          self.lock.release()          # a no-op unless it failed after taking the lock
        self.lock = None
        error = e
    if jax.process_count() > 1:
      busy = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
      if int(busy) and error is None:
        raise WorkdirBusyError(f"process 0 could not take the workdir lock of {self.workdir} "
                               "(its message says why: another run, or the storage)")
    if error is not None:
      raise error

  def close(self):
    """Stops the input's threads/workers, releases the workdir lock (and removes the directories
    this run created but never wrote to)."""
    if self.input is not None:
      self.input.close()
    self.release_lock()

  def release_lock(self):
    """Releases the workdir lock and removes the directories it created, if still empty."""
    if self.lock is not None:
      self.lock.release()
      self.lock = None
    storage.remove_empty_dirs(self._created_dirs)
    self._created_dirs = []

  def _restore(self):
    t = self.t
    self.ckpt = Checkpointer(
        self.rundir.checkpoints, keep=t.ckpt_keep, keep_period=t.ckpt_keep_period)
    self.restored_step = None
    if self.ckpt.steps():   # compare configs first: a clear diff beats an Orbax tree-mismatch error
      self._check_same_model()
    restored = self.ckpt.restore_latest(self.abstract_state, self.state_sh, say=self.log)
    if restored is None:
      self.input.start(0)
      return
    self.state, meta, self.restored_step = restored
    if meta.get("seed") != t.seed:
      raise UserError(f"the checkpoint in {self.ckpt.directory} was written with "
                      f"train.seed={meta.get('seed')}, this run has {t.seed}; resume with the "
                      "same config or use a fresh --workdir")
    holder = state_holder()
    has_state = self.ckpt.restore_data(self.restored_step, holder)
    how = self.input.start(int(self.state["step"]), (meta.get("data", {}),
                                                      holder.state if has_state else None))
    self.log(f"resumed from {self.ckpt.directory} at step {self.restored_step}; {how}")

  def _check_same_model(self):
    """Resuming must not silently change what the checkpoint's params mean: settings that shapes
    cannot detect (the AR order, the scale function, the data) are compared with the run's saved
    config."""
    saved = runs.read_saved_config(self.workdir)
    if saved is None:
      return
    diff = config_changes(saved, self.config)
    if diff and self.config_change_ok:
      self.log("resuming with a changed data/model config (--config_change_ok): "
               + "; ".join(diff))
    elif diff:
      raise ConfigError(
          f"the checkpoint in {self.workdir} was trained with another data/model config: "
          f"{'; '.join(diff)}. Fix: resume with the run's own settings (e.g. "
          "--config.<key>=<saved value>), use a fresh --workdir, or pass --config_change_ok if "
          "the change is intended")

  def mesh_context(self):
    """Mesh + logical-axis rules active while tracing / running jitted code."""
    return sharding.mesh_context(self.mesh, self.rules)

  def log(self, msg):
    if not self.quiet and jax.process_index() == 0:
      tqdm.write(msg)

  def _check_finite(self):
    bad = int(self.state["bad_step"])
    if bad >= 0:
      raise FloatingPointError(
          f"non-finite loss or gradient at step {bad}; stopping before anything is saved. "
          "Lower train.lr, enable train.grad_clip, or raise train.noise_min.")

  def fit(self, stop_at=None):
    """Trains to ``train.steps`` (or only up to step ``stop_at``, e.g. for a staged run), then
    checkpoints."""
    t = self.t
    end = t.steps if stop_at is None else min(int(stop_at), t.steps)
    start = int(self.state["step"])
    stopped = self.stop.is_set()
    if jax.process_count() > 1:   # all processes stop, or none (a lone one would hang a step)
      stopped = bool(np.asarray(multihost_utils.process_allgather(np.array(stopped))).any())
    if stopped:
      self.log("SIGTERM before training started: exiting; nothing new to save")
      self.preempted = True
      return []
    self._check_owned()
    storage.makedirs(self.workdir)
    if jax.process_index() == 0:
      # every model field, defaults written out
      runs.write_saved_config(self.workdir, resolved_config(self.config))
      dropped = trim_metrics(self.rundir.metrics, start)
      if dropped:
        self.log(dropped)
    writer = MetricWriter(self.workdir)
    prior = (f"dimred={self.mcfg.dimred}" if self.mcfg.prior == "ar"
             else f"prior={self.mcfg.prior}")
    self.log(f"{'FARMER' if self.mcfg.prior == 'ar' else 'AF'}: {self.num_params / 1e6:.2f}M "
             f"params, N={self.mcfg.num_tokens} tokens of d={self.mcfg.token_dim}, {prior}, "
             f"mesh={dict(self.mesh.shape)}")
    pending, history = [], []
    bar = tqdm(total=t.steps, initial=start, disable=self.quiet or jax.process_index() != 0,
               desc="train", dynamic_ncols=True)
    tick, tick_step = time.time(), start
    stop = self.stop
    eval_every = self.eval_every   # config.eval.every, parsed once (not on every step)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(
        signal.SIGTERM) in (signal.SIG_DFL, None):
      install_sigterm(stop)
    try:
      with self.mesh_context():
        for s in range(start, end):
          self._trace_before(s)
          batch = next(self.input)
          self.state, m = self.train_step(self.state, batch, self.rng, *self.step_args)
          pending.append(m)
          self._trace_after(s)
          bar.update(1)
          preempted, lock_state = self._stop_signals(s, stop)
          if lock_state:
            self._stop_unowned(lock_state)
          if preempted:
            self.log(f"SIGTERM: saving a checkpoint at step {s + 1} and exiting; re-run the same "
                     "command to resume")
            self.save_checkpoint()
            self.preempted = self.preempt_saved = True
            break
          if t.ckpt_every and (s + 1) % t.ckpt_every == 0 and s + 1 < end:
            self.save_checkpoint()
          if (s + 1) % t.log_every == 0 or s + 1 == end:
            self._check_finite()
            vals = jax.device_get(pending)
            avg = {k: float(np.mean([v[k] for v in vals])) for k in vals[0]}
            now = time.time()
            avg["steps_per_s"] = (s + 1 - tick_step) / max(now - tick, 1e-9)
            tick, tick_step = now, s + 1
            pending = []
            writer.write(s + 1, avg)
            history.append({"step": s + 1, **avg})
            bar.set_postfix(self.progress_postfix(avg))
          if eval_every and (s + 1) % eval_every == 0 and s + 1 < t.steps:
            self.periodic_eval(writer, s + 1)
      self._trace_after(int(self.state["step"]) - 1, force=True)
      if not self.preempted and int(self.state["step"]) > start:
        self._check_owned()
        self.save_checkpoint()
    finally:   # also on a non-finite step or Ctrl-C: pending saves finish, metrics reach the run
      bar.close()
      self.ckpt.close()
      lost = self.lock.lost if self.lock is not None else None
      writer.close(sync=not (lost and lost.taken))   # never over another run's metrics
    return history

  def _check_owned(self):
    """Before a write outside the step loop's checks (the config at the start, the final
    checkpoint): stops, as the loop would, if another run took the workdir lock meanwhile."""
    lost = self.lock.lost if self.lock is not None else None
    state = 0 if lost is None else 2 if lost.taken else 1
    if jax.process_count() > 1:
      state = int(np.asarray(multihost_utils.process_allgather(np.array(state))).max())
    if state == 2:
      self._stop_unowned(state)

  def _stop_signals(self, s, stop):
    """(whether SIGTERM reached any process, the workdir lock's state: 0 owned, 1 not refreshable
    but still ours, 2 taken by another run); every step with one process, with several every
    ``train.preempt_check_every`` steps (the check is an all-process sync)."""
    lost = self.lock.lost if self.lock is not None else None
    lock_state = 0 if lost is None else 2 if lost.taken else 1
    if jax.process_count() == 1:
      return stop.is_set(), lock_state
    if (s + 1) % self.t.preempt_check_every:
      return False, 0
    flags = multihost_utils.process_allgather(np.array([int(stop.is_set()), lock_state]))
    flags = np.asarray(flags).reshape(-1, 2).max(axis=0)
    return bool(flags[0]), int(flags[1])

  def _stop_unowned(self, lock_state):
    """Stops training once this run can no longer prove it owns the workdir: it saves first only
    if the lock is still its own (not refreshable, e.g. a full disk), never into a workdir that
    another run has taken."""
    step = int(self.state["step"])
    if lock_state == 1:
      self.save_checkpoint()
    lost = self.lock.lost if self.lock is not None else None
    if lost is None:    # another process's view: process 0 holds the lock and its message
      lost = WorkdirLockLost(
          f"process 0 lost the workdir lock of {self.workdir} "
          f"({'taken by another run' if lock_state == 2 else 'not refreshable'}); its message "
          "says more", taken=lock_state == 2)
    raise WorkdirLockLost(f"at step {step}: {lost}", lost.taken) from None

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

  def eval_batches(self):
    """(this process's batches, number of batches, number of examples) of ``config.eval.split``
    (data/pipeline.py ``eval_batches``: every example once, masked padding). The eval batch is
    rounded up to a multiple of the mesh's data-parallel slots and of the process count."""
    e = self.run.eval
    return eval_batches(self.run.data, e.split,
                        sharding.eval_batch_size(e.batch_size, self.mesh, self.rules),
                        jax.process_index(), jax.process_count())

  def eval_params(self):
    return self.state.get("ema", self.state["params"])

  def save_checkpoint(self):
    """Async save of the full train state (never of a state that saw a non-finite step)."""
    self._check_finite()
    step = int(self.state["step"])
    data_meta, data_state = self.input.checkpoint()
    self.ckpt.save(step, self.state, {"step": step, "seed": int(self.t.seed), "data": data_meta},
                   data=data_state)


# Start-up, until the build is done: a SIGTERM may end the process at once (install_sigterm),
# after releasing the workdir lock of the Trainer being built (the only file written so far).
_ABANDONABLE = threading.Event()
_STARTING = []


def install_sigterm(stop: threading.Event, abandon=None):
  """SIGTERM (preemption) sets ``stop``; the training loop saves at the next step boundary and
  exits cleanly. With ``abandon`` (a function that ends the process), a SIGTERM while
  ``_ABANDONABLE`` is set (start-up until the build is done: config, lock, data, model,
  compilation; nothing but the lock is written yet) releases the lock and calls it instead. From
  the restore on, start-up completes and fit() stops before its first step. Returns a function
  restoring the previous handler.

  The handler never raises: an exception from it can land inside a gc callback, where Python drops
  it, and unwinding out of an XLA compilation leaves that compilation running on a thread of XLA's,
  under which interpreter shutdown frees the XLA client (a segfault)."""
  if threading.current_thread() is not threading.main_thread():
    return lambda: None

  def handler(*_):
    stop.set()
    if abandon is not None and _ABANDONABLE.is_set():
      _ABANDONABLE.clear()   # once: a second SIGTERM while this one releases only sets stop
      try:
        for tr in list(_STARTING):
          tr.release_lock()
      except BaseException:  # noqa: BLE001 - best effort: a lock left behind goes stale
        pass
      finally:
        abandon()

  prev = signal.signal(signal.SIGTERM, handler)
  return lambda: signal.signal(signal.SIGTERM, prev if prev is not None else signal.SIG_DFL)


def train_and_report(config, workdir, quiet=False, config_change_ok=False, abandon=None):
  """The `farmer_jax train` command: train, then report (train/report.py: test bits/dim,
  samples.png, summary.json); returns (summary dict, trainer). ``abandon``: see install_sigterm.

  The test bits/dim (uniform dequantization) is reported twice on the same noise: ``test_bpd``
  with the true labels, -log p(x|y), and ``test_bpd_uncond`` with the null label, -log p(x|null)
  (the literature's ImageNet number); both are equal for an unconditional model
  (``class_conditional`` False).
  """
  t0 = time.time()
  with preemptible(abandon) as stop:
    tr = Trainer(config, workdir, quiet=quiet, config_change_ok=config_change_ok, stop=stop)
    with closing(tr):
      history = tr.fit()
      train_s = time.time() - t0
      if tr.preempted:   # SIGTERM: the checkpoint (if any step ran) is saved; no eval, sampling
        return {"steps": int(tr.state["step"]), "preempted": True, "saved": tr.preempt_saved}, tr
      summary = write_report(tr, history, train_s, t0)
  return summary, tr


@contextlib.contextmanager
def preemptible(abandon=None):
  """A command's SIGTERM handling (install_sigterm) for its whole run; yields the stop Event its
  Trainer takes. Start-up is abandonable until the Trainer is built."""
  stop = threading.Event()
  _ABANDONABLE.set()
  restore = install_sigterm(stop, abandon)
  try:
    yield stop
  finally:
    _ABANDONABLE.clear()
    restore()   # after the Trainer's close: the previous handler may end the process at once


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
