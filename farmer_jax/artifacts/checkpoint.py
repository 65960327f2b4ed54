"""Orbax checkpoints of the train state: async saves, keep-last-n (+ periodic keepers), restore onto
any mesh, fallback past unreadable checkpoints.

A checkpoint step holds three items: ``state`` (params, optimizer state, EMA, step, bad_step;
sharded arrays, written by every process), ``meta`` (JSON: step, seed and the input's layout, see
data/pipeline.py) and ``data`` (the grain iterator state of every process, one JSON file each,
written by grain's Orbax handler ``grain.checkpoint.CheckpointSave``).

An unreadable step (truncated or corrupt files) newer than a readable one is skipped on restore. The
trainer's Checkpointer moves it aside, to ``<directory>/<step>.unreadable`` (``.unreadable-2``, ...
if taken): kept for inspection, but no longer a step, so the resumed run can write that step number
again. Orbax lists only directories named by the bare step number (and, for legacy layouts,
``*_<digits>``), so the ``.unreadable`` suffix is never mistaken for a checkpoint or deleted by
retention. A ``read_only`` Checkpointer (export) skips and reports such steps and changes nothing.
"""

import contextlib
import errno
import logging
import numbers
import os
import re
import tempfile
import time

import grain.checkpoint
import jax
import orbax.checkpoint as ocp

from farmer_jax.artifacts import storage
from farmer_jax.errors import UserError, brief

ITEMS = ("state", "meta", "data")


class UnreadableCheckpoints(UserError):
  """No checkpoint of a directory could be restored; ``errors`` has one line per step tried."""

  def __init__(self, directory, errors):
    self.directory, self.errors = directory, errors
    super().__init__(
        f"no checkpoint in {directory} could be restored for this config: they were written by a "
        "different config (resume with the config that wrote them, or use a fresh --workdir) or "
        "are truncated/corrupt (nothing was moved; move them aside or use a fresh --workdir). "
        "Errors: " + " | ".join(errors))


_WHY = {errno.ENOENT: " (was the directory removed while training?)",
        errno.EACCES: " (is the directory writable?)", errno.EPERM: " (is the directory writable?)",
        errno.EROFS: " (a read-only filesystem)"}
# tensorstore (Orbax's array writer) names the OS error of a failed write in its message, or only
# the status of it (e.g. a file it wrote is gone when it reads it back)
_OS_ERROR_CODE = re.compile(r"\[os_error_code='?(\d+)'?\]")
_STATUS_ERRNO = {"NOT_FOUND": errno.ENOENT, "PERMISSION_DENIED": errno.EACCES}


_BUG_TYPES = (TypeError, AttributeError, NameError, KeyError, IndexError, AssertionError)


def os_error_in(e):
  """The OSError behind a failed Orbax write: one in ``e``'s chain of causes, or one that a
  tensorstore error names (``[os_error_code=N]``, or a NOT_FOUND / PERMISSION_DENIED status);
  None if there is none (then it is not the filesystem's doing)."""
  if isinstance(e, _BUG_TYPES):   # a bug raised while handling an OSError stays a bug
    return None
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno:
      return e
    m = _OS_ERROR_CODE.search(str(e))
    code = int(m.group(1)) if m else _STATUS_ERRNO.get(str(e).split(":", 1)[0])
    if code:
      return OSError(code, os.strerror(code))
    e = e.__cause__ or e.__context__
  return None


@contextlib.contextmanager
def _quiet_absl():
  """A read-only manager logs an absl WARNING for each option read_only overrides: expected."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(max(level, logging.ERROR))
  try:
    yield
  finally:
    logger.setLevel(level)


def _check_count(name, value, lo, what):
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
    raise ValueError(f"checkpoint {name}={value!r} is invalid: it must be an integer >= {lo} "
                     f"({what})")


class Checkpointer:
  """The checkpoints of one run. ``read_only``: restore only; unreadable steps are skipped and
  reported but never moved (export must not modify the run)."""

  def __init__(self, directory, keep=2, keep_period=0, read_only=False):
    # Refused here as well as in config validation: keep=0 would let retention delete every
    # checkpoint (the final one included) and a negative value only fails at the first save, after
    # the compute is spent.
    _check_count("keep", keep, 1, "how many of the newest checkpoints to keep; train.ckpt_keep")
    _check_count("keep_period", keep_period, 0,
                 "0: none; N: also keep every step divisible by N; train.ckpt_keep_period")
    self.directory = storage.absolute(directory)  # a URL (gs://...) is kept as given
    self.keep, self.keep_period = int(keep), int(keep_period)
    self.read_only = read_only
    self._mngr = None
    self._saving = None    # the step of the save in flight, if any

  def _manager(self, create):
    if self._mngr is None:
      if not create and not storage.isdir(self.directory):
        return None
      if self.read_only:
        opts = ocp.CheckpointManagerOptions(read_only=True)
      else:
        opts = ocp.CheckpointManagerOptions(max_to_keep=self.keep,
                                            keep_period=self.keep_period or None, create=create)
      with _quiet_absl() if self.read_only else contextlib.nullcontext():
        self._mngr = ocp.CheckpointManager(self.directory, options=opts, item_names=ITEMS)
    return self._mngr

  def save(self, step, state, meta, data=None):
    """Starts an (async) save of ``state`` at ``step`` (and of ``data``, an iterator state item for
    grain's handler, if given); the device->host copy finishes before this returns."""
    if self.read_only:
      raise ValueError(f"{self.directory} was opened read-only; nothing may be saved there")
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data)
    with self._writing():
      mngr = self._manager(create=True)
      mngr.wait_until_finished()   # a failure of the previous (async) save is reported as its own
      self._saving = int(step)
      # Orbax creates the step's directory in a thread of its own and a failure there ends in a
      # timeout minutes later: a directory removed or made unwritable is reported now instead.
      err = self._probe()
      if err is not None:
        raise err
      mngr.save(int(step), args=ocp.args.Composite(**items), force=True)

  @contextlib.contextmanager
  def _writing(self):
    """A failed write (disk full, the directory removed or not writable) becomes one OSError
    naming the directory, the step and the cause, and the step's half-written temporary directory
    is removed; any other failure is a bug and propagates as it is."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 - sorted just below
      err = os_error_in(e) or self._probe()
      if err is None:
        raise
      step, self._saving = self._saving, None
      self._abandon()
      if step is not None and jax.process_index() == 0:
        self._remove_tmp(step)
      what = f"writing checkpoint step {step}" if step is not None else "writing a checkpoint"
      why = _WHY.get(err.errno, "")
      raise OSError(err.errno, f"{what} to {self.directory} failed: {err.strerror}{why}") from e

  def _probe(self):
    """The OSError that creating a file in the (local) directory raises now; None if it works."""
    if storage.is_url(self.directory):
      return None
    try:
      fd, path = tempfile.mkstemp(prefix=".write-check-", dir=self.directory)
    except OSError as e:
      return e
    os.close(fd)
    with contextlib.suppress(OSError):
      os.remove(path)
    return None

  def _remove_tmp(self, step):
    """Removes what a failed save of ``step`` left (Orbax's ``<step>.orbax-checkpoint-tmp*``).
    Writes that Orbax had handed to tensorstore still land after its manager is closed (creating
    their folders again), so this repeats until the folder stays gone for 0.2 s (at most 3 s)."""
    for _ in range(15):
      found = False
      with contextlib.suppress(OSError):   # best effort: the failure itself is what is reported
        for name in storage.listdir(self.directory):
          if name.startswith(f"{step}.orbax-checkpoint-tmp"):
            found = True
            storage.P(storage.join(self.directory, name)).rmtree()
      if not found:
        return
      time.sleep(0.2)

  def _abandon(self):
    """Closes the manager after a failed write (which its close raises again: dropped)."""
    mngr, self._mngr = self._mngr, None
    if mngr is not None:
      with contextlib.suppress(Exception):
        mngr.close()

  def restore_data(self, step, holder):
    """Restores this process's saved iterator state of ``step`` into ``holder`` (an object with
    ``set_state``) through grain's handler; returns False if there is none for this process (a
    checkpoint without input state, or written with another process count)."""
    try:
      with _quiet_absl() if self.read_only else contextlib.nullcontext():
        self._manager(create=False).restore(
            int(step), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(holder)))
    except (ValueError, KeyError, FileNotFoundError):
      return False
    return True

  def wait(self):
    if self._mngr is not None:
      with self._writing():
        self._mngr.wait_until_finished()
        self._saving = None

  def close(self):
    if self._mngr is not None:
      self.wait()
      with self._writing():
        self._mngr.close()
      self._mngr = None

  def steps(self):
    m = self._manager(create=False)
    return sorted(m.all_steps()) if m is not None else []

  def restore_latest(self, abstract_state=None, shardings=None, say=print):
    """Restores the newest readable checkpoint. Returns (state, meta, step) or None if there is
    none. ``abstract_state`` + ``shardings``: restored onto that mesh; None: as saved, or onto this
    process's first device where the saving topology (devices, processes) is not this one.

    An unreadable (truncated/corrupt) newer checkpoint is reported through ``say`` and skipped in
    favour of the previous one (and moved aside unless read-only). If none can be read, raises
    UnreadableCheckpoints (usually: the workdir was written by a different config).
    """
    steps = self.steps()
    if not steps:
      return None
    errors, bad = [], []
    for step in reversed(steps):
      try:
        state, meta = self.restore(step, abstract_state, shardings)
      except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous one
        errors.append(f"step {step}: {brief(e)}")
        bad.append(step)
        say(f"checkpoint {self.directory}/{step} is unreadable ({type(e).__name__}); falling back "
            "to an earlier one")
        continue
      if bad and not self.read_only:
        # Only now, with an older step readable under the same target, is "unreadable" known to
        # mean corrupt rather than "written by another config" (then every step fails, and
        # nothing is touched).
        self._move_aside(bad, say)
        say(f"restored checkpoint step {step} after skipping {len(bad)} unreadable newer one(s)")
      return state, meta, step
    raise UnreadableCheckpoints(self.directory, errors)

  def restore(self, step, abstract_state=None, shardings=None):
    """(state, meta) of checkpoint ``step`` (one of ``steps()``), placed as ``restore_latest``
    places it; raises what Orbax raises when it cannot be read."""
    self._manager(create=False)
    target = None
    if abstract_state is not None:
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract_state, shardings)
    # without a target, a checkpoint saved by another topology (a pod's run read on one host)
    # restores onto this process's first device
    fallback = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target, fallback_sharding=fallback),
                              meta=ocp.args.JsonRestore())
    with _quiet_absl() if self.read_only else contextlib.nullcontext():
      r = self._mngr.restore(int(step), args=args)
    return r.state, dict(r.meta)

  def _move_aside(self, steps, say):
    """Renames unreadable step directories out of orbax's view (process 0 only), then re-opens the
    manager so its step list no longer holds them (a later save at the same step would otherwise
    raise StepAlreadyExistsError)."""
    self.close()
    if jax.process_index() == 0:
      for step in steps:
        src = storage.join(self.directory, str(step))
        dst = storage.join(self.directory, f"{step}.unreadable")
        n = 1
        while storage.exists(dst):
          n += 1
          dst = storage.join(self.directory, f"{step}.unreadable-{n}")
        try:
          storage.rename(src, dst)
        except OSError as e:
          raise UserError(f"checkpoint {src} is unreadable and could not be moved aside ({e}); "
                          f"move it out of {self.directory} yourself, then rerun") from e
        say(f"moved unreadable checkpoint {src} aside to {dst} (kept for inspection; delete it "
            "when done)")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("farmer_jax_checkpoint_move_aside")
    self._manager(create=False)
