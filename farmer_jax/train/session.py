"""One run's hold on its workdir: the lock (one run per workdir; the first file a run writes), the
checkpoints it restores from and saves to, and what it writes when training begins (config.json,
metrics.jsonl trimmed to the resumed step, the metric writer). Knows nothing of the model: the
trainer hands it states and their shapes."""

import contextlib

import jax
import numpy as np
from jax.experimental import multihost_utils

from farmer_jax.artifacts import runs, storage
from farmer_jax.artifacts.checkpoint import Checkpointer
from farmer_jax.artifacts.lock import WorkdirBusyError, WorkdirLock, WorkdirLockLost
from farmer_jax.artifacts.metrics import MetricWriter, trim_metrics
from farmer_jax.config.parse import resolved_config
from farmer_jax.config.resume import config_changes
from farmer_jax.data.pipeline import state_holder
from farmer_jax.errors import ConfigError, UserError

# lock_state(): the workdir is ours; the lock cannot be refreshed but is still ours; another run
# took it
OWNED, UNREFRESHABLE, TAKEN = 0, 1, 2


class Session:
  """The workdir of one run (``run``: its RunConfig). Nothing is written until ``acquire``.
  ``say``: the run's console log."""

  def __init__(self, run, workdir, say, config_change_ok=False):
    self.run = run
    self.workdir = workdir
    self.rundir = runs.RunDir(workdir)
    self.say = say
    self.config_change_ok = config_change_ok
    self.lock = None
    self.ckpt = None
    self._created_dirs = []   # directories the lock created, removed on release if still empty

  # ------------------------------------------------------------------------------------ the lock

  def acquire(self):
    """Process 0 takes the workdir lock; with several processes every one learns the outcome, so
    a busy workdir stops them all at once instead of leaving the others in a collective."""
    error = None
    if jax.process_index() == 0:
      # a bucket has no empty folders to clean up
      self._created_dirs = ([] if storage.is_url(self.workdir) else
                            storage.missing_dirs(self.workdir))
      self.lock = WorkdirLock(self.workdir, say=self.say)   # seen by a start-up SIGTERM
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

  def release(self):
    """Releases the workdir lock and removes the directories it created, if still empty."""
    if self.lock is not None:
      self.lock.release()
      self.lock = None
    storage.remove_empty_dirs(self._created_dirs)
    self._created_dirs = []

  def lock_state(self):
    """This process's view of the lock: OWNED, UNREFRESHABLE or TAKEN (other processes than 0
    hold no lock: OWNED)."""
    lost = self.lock.lost if self.lock is not None else None
    return OWNED if lost is None else TAKEN if lost.taken else UNREFRESHABLE

  def lost(self, step, lock_state):
    """The WorkdirLockLost that stops training at ``step`` once the workdir is no longer provably
    ours (``lock_state``, agreed by every process)."""
    lost = self.lock.lost if self.lock is not None else None
    if lost is None:    # another process's view: process 0 holds the lock and its message
      lost = WorkdirLockLost(
          f"process 0 lost the workdir lock of {self.workdir} "
          f"({'taken by another run' if lock_state == TAKEN else 'not refreshable'}); its message "
          "says more", taken=lock_state == TAKEN)
    return WorkdirLockLost(f"at step {step}: {lost}", lost.taken)

  # ------------------------------------------------------------------------------- checkpoints

  def restore(self, abstract_state, shardings):
    """The newest readable checkpoint of a state shaped ``abstract_state``, placed by
    ``shardings``: (state, step, data meta, data iterator state or None); None for a fresh run.
    A checkpoint written with another seed, or with another data/model config (unless
    ``config_change_ok``), is refused."""
    t = self.run.train
    self.ckpt = Checkpointer(
        self.rundir.checkpoints, keep=t.ckpt_keep, keep_period=t.ckpt_keep_period)
    if self.ckpt.steps():   # compare configs first: a clear diff beats an Orbax tree-mismatch error
      self._check_same_model()
    restored = self.ckpt.restore_latest(abstract_state, shardings, say=self.say)
    if restored is None:
      return None
    state, meta, step = restored
    if meta.get("seed") != t.seed:
      raise UserError(f"the checkpoint in {self.ckpt.directory} was written with "
                      f"train.seed={meta.get('seed')}, this run has {t.seed}; resume with the "
                      "same config or use a fresh --workdir")
    holder = state_holder()
    has_state = self.ckpt.restore_data(step, holder)
    return state, step, meta.get("data", {}), holder.state if has_state else None

  def _check_same_model(self):
    """Resuming must not silently change what the checkpoint's params mean: settings that shapes
    cannot detect (the AR order, the scale function, the data) are compared with the run's saved
    config."""
    saved = runs.read_saved_config(self.workdir)
    if saved is None:
      return
    diff = config_changes(saved, self.run.source)
    if diff and self.config_change_ok:
      self.say("resuming with a changed data/model config (--config_change_ok): "
               + "; ".join(diff))
    elif diff:
      raise ConfigError(
          f"the checkpoint in {self.workdir} was trained with another data/model config: "
          f"{'; '.join(diff)}. Fix: resume with the run's own settings (e.g. "
          "--config.<key>=<saved value>), use a fresh --workdir, or pass --config_change_ok if "
          "the change is intended")

  def save(self, state, data):
    """Async save of ``state`` with the input's ``data`` checkpoint (meta, iterator state)."""
    step = int(state["step"])
    data_meta, data_state = data
    self.ckpt.save(step, state, {"step": step, "seed": int(self.run.train.seed),
                                 "data": data_meta}, data=data_state)

  # ------------------------------------------------------------------------------ the run's files

  def begin(self, step):
    """Training begins at ``step``: config.json (every model field, defaults written out), the
    metrics of steps after ``step`` dropped (a resumed run logs them again); returns the metric
    writer."""
    storage.makedirs(self.workdir)
    if jax.process_index() == 0:
      runs.write_saved_config(self.workdir, resolved_config(self.run.source))
      dropped = trim_metrics(self.rundir.metrics, step)
      if dropped:
        self.say(dropped)
    return MetricWriter(self.workdir)

  def end(self, writer):
    """Training ended (also on a failure): pending checkpoint saves finish and the metrics reach
    the workdir, unless another run took it (never written over its metrics)."""
    self.ckpt.close()
    lost = self.lock.lost if self.lock is not None else None
    writer.close(sync=not (lost and lost.taken))
