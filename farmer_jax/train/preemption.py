"""SIGTERM (preemption) handling, all of it: every SIGTERM handler the package installs is
installed here.

A command's life under SIGTERM:
  - from its start until its trainer is built (imports, config, the workdir lock, data, model,
    compilation; nothing but the lock is written yet) a SIGTERM ends the process at once with exit
    status 0: ``exit_on_sigterm`` before the trainer exists, then ``preemptible``'s handler, which
    first releases the workdir lock (``Preemption.starting``);
  - from the restore on (it may move a bad checkpoint aside) a SIGTERM only sets ``stop``: start-up
    completes, the train loop stops before its next step (saving a checkpoint if a step ran) and
    the command ends normally, saying it was preempted.

What the process says when it ends (its stdout line and exit status) is the command's
(commands/exits.py), passed in as ``abandon``.

A handler never raises: an exception from it can land inside a gc callback, where Python drops it,
and unwinding out of an XLA compilation leaves that compilation running on a thread of XLA's,
under which interpreter shutdown frees the XLA client (a segfault).
"""

import contextlib
import signal
import threading


def _on_main_thread():
  return threading.current_thread() is threading.main_thread()


def install_sigterm(handler):
  """Makes ``handler`` the SIGTERM handler (signals can only be handled on the main thread:
  elsewhere this does nothing); returns a function restoring the previous one."""
  if not _on_main_thread():
    return lambda: None
  prev = signal.signal(signal.SIGTERM, handler)
  return lambda: signal.signal(signal.SIGTERM, prev if prev is not None else signal.SIG_DFL)


def exit_on_sigterm(abandon):
  """Until a trainer installs its handler, a SIGTERM (preemption during imports, config parsing or
  jax start-up) calls ``abandon``, which ends the process cleanly, instead of the default kill
  (status 143)."""
  install_sigterm(abandon)


class Preemption:
  """One run's SIGTERM state. ``stop`` is set by SIGTERM; the train loop saves at the next step
  boundary and stops.

  With ``abandon`` (a function that ends the process), a SIGTERM during start-up, until
  ``started()``, first calls the ``release`` given to ``starting`` (the workdir lock, the only file
  written so far) and then ``abandon``. Without it a SIGTERM only sets ``stop``."""

  def __init__(self, abandon=None):
    self.stop = threading.Event()
    self._abandon = abandon
    self._abandonable = abandon is not None
    self._release = None

  def starting(self, release):
    """Start-up has written something that ``release`` undoes (releases the workdir lock); None
    once start-up has closed it itself."""
    self._release = release

  def started(self):
    """Start-up is done: from now on a SIGTERM only sets ``stop``."""
    self._abandonable = False
    self._release = None

  def handler(self, *_):
    self.stop.set()
    if not self._abandonable:
      return
    self._abandonable = False   # once: a second SIGTERM while this one releases only sets stop
    try:
      if self._release is not None:
        self._release()
    except BaseException:  # noqa: BLE001 - best effort: a lock left behind goes stale
      pass
    finally:
      self._abandon()

  def catch_unhandled(self):
    """Unless a SIGTERM handler is installed (a command's ``preemptible``), this run's handler is
    installed now: a trainer used as a library still saves and stops on SIGTERM."""
    if _on_main_thread() and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
      install_sigterm(self.handler)


@contextlib.contextmanager
def preemptible(abandon=None):
  """A command's SIGTERM handling for its whole run; yields the Preemption its trainer takes.
  Start-up is abandonable until the trainer is built."""
  preemption = Preemption(abandon)
  restore = install_sigterm(preemption.handler)
  try:
    yield preemption
  finally:
    preemption.started()
    restore()   # after the trainer's close: the previous handler may end the process at once
