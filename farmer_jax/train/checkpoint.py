"""Orbax checkpoints of the train state: async saves, keep-last-n (+ periodic keepers), restore onto any mesh,
fallback past unreadable checkpoints.

A checkpoint step holds two items: ``state`` (params, optimizer state, EMA, step, bad_step; sharded arrays, written
by every process) and ``meta`` (JSON: the data-iterator position and the RNG seed; the input pipeline is a pure
function of (seed, step), so that is its whole state).
"""

import logging
import os

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:

  def __init__(self, directory, keep=2, keep_period=0, async_save=True):
    self.directory = os.path.abspath(directory)
    self.keep, self.keep_period, self.async_save = keep, keep_period, async_save
    self._mngr = None

  def _manager(self, create):
    if self._mngr is None:
      if not create and not os.path.isdir(self.directory):
        return None
      opts = ocp.CheckpointManagerOptions(max_to_keep=self.keep, keep_period=self.keep_period or None,
                                          enable_async_checkpointing=self.async_save, create=create)
      self._mngr = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "meta"))
    return self._mngr

  def save(self, step, state, meta):
    """Starts an (async) save of ``state`` at ``step``; the device->host copy finishes before this returns."""
    self._manager(create=True).save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self):
    if self._mngr is not None:
      self._mngr.wait_until_finished()

  def close(self):
    if self._mngr is not None:
      self._mngr.wait_until_finished()
      self._mngr.close()
      self._mngr = None

  def steps(self):
    m = self._manager(create=False)
    return sorted(m.all_steps()) if m is not None else []

  def restore_latest(self, abstract_state, shardings, say=print):
    """Restores the newest readable checkpoint onto ``shardings``. Returns (state, meta, step) or None.

    An unreadable (truncated/corrupt) newest checkpoint is reported and skipped in favour of the previous one. If
    none can be read, raises ValueError (usually: the workdir was written by a different config).
    """
    steps = self.steps()
    if not steps:
      return None
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    errors = []
    for step in reversed(steps):
      try:
        r = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                             meta=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous checkpoint
        errors.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
        say(f"checkpoint {self.directory}/{step} is unreadable ({type(e).__name__}); falling back to an earlier one")
        continue
      if errors:
        say(f"restored checkpoint step {step} after skipping {len(errors)} unreadable newer one(s)")
      return r.state, dict(r.meta), step
    raise ValueError(f"no checkpoint in {self.directory} could be restored for this config; use a fresh --workdir "
                     "or the config that wrote it. Errors: " + " | ".join(errors))
