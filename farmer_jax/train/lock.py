"""A workdir lock: one training run per workdir at a time.

The lock file (``runs.LOCK`` in the run folder) holds JSON {pid, host, started, beat}. A local
one is created atomically (O_CREAT | O_EXCL); in a bucket (``gs://...``, no create-if-absent
through epath) it is written and read back, which leaves a race window of one round trip between
two runs started at the same moment. A heartbeat thread rewrites ``beat`` (seconds since the epoch).
A lock is *stale*, and is taken over with a message, when its holder is on this host and its pid
is gone, or when its heartbeat is older than ``stale_after`` seconds (a holder on another host
that died; a lock without ``beat`` uses the file's mtime). A live holder makes the second run fail
with an error naming its pid and host.
"""

import json
import os
import socket
import threading
import time

from farmer_jax import storage
from farmer_jax.runs import RunDir


class WorkdirBusyError(RuntimeError):
  """Another live run holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:      # exists, owned by someone else
    return True
  return True


class WorkdirLock:

  def __init__(self, workdir: str, heartbeat: float = 30.0, stale_after: float = 600.0, say=print):
    self.path = RunDir(workdir).lock
    self.heartbeat, self.stale_after, self.say = heartbeat, stale_after, say
    self._stop = threading.Event()
    self._mutex = threading.Lock()   # a heartbeat write never overlaps release's removal
    self._thread = None
    self.held = False

  def _read(self):
    try:
      return json.loads(storage.read_text(self.path))
    except (OSError, ValueError):
      return None

  def _age(self, info):
    """Seconds since the holder's last heartbeat (``beat``, else the file's mtime)."""
    if isinstance(info.get("beat"), (int, float)):
      return time.time() - info["beat"]
    return time.time() - storage.P(self.path).stat().mtime

  def _stale_reason(self, info):
    """None if the holder looks alive, else why the lock is stale."""
    if info is None:
      return "unreadable lock file"
    host, pid = info.get("host"), int(info.get("pid", -1))
    if host == socket.gethostname():
      if pid == os.getpid():
        return "held by this process"
      return None if _pid_alive(pid) else f"pid {pid} on this host is gone"
    try:
      age = self._age(info)
    except OSError:
      return "lock vanished"
    return f"no heartbeat from {host} for {age:.0f}s" if age > self.stale_after else None

  def _create(self, me):
    """Creates the lock file holding ``me``; FileExistsError if it exists (or, in a bucket, if
    another run's write won)."""
    text = json.dumps(me)
    if not storage.is_url(self.path):
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      with os.fdopen(fd, "w") as f:
        f.write(text)
      return
    if storage.exists(self.path):
      raise FileExistsError(self.path)
    storage.write_text(self.path, text)
    if self._read() != me:
      raise FileExistsError(self.path)

  def acquire(self):
    storage.makedirs(storage.parent(self.path))
    self.me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "beat": time.time(),
    }
    for _ in range(3):
      try:
        self._create(self.me)
      except FileExistsError:
        info = self._read()
        why = self._stale_reason(info)
        if why is None:
          raise WorkdirBusyError(
              f"{storage.parent(self.path)} is in use by another training run "
              f"(pid {info.get('pid')} on host {info.get('host')}, started "
              f"{info.get('started')}). Fix: wait for it to finish, stop it, or use another "
              f"--workdir; if that run is dead, delete {self.path}")
        if why != "held by this process":
          self.say(f"taking over a stale workdir lock ({why})")
        storage.remove(self.path)
        continue
      self.held = True
      self._thread = threading.Thread(target=self._beat, daemon=True)
      self._thread.start()
      return self
    raise WorkdirBusyError(f"could not acquire {self.path} (another run keeps re-creating it)")

  def _beat(self):
    while not self._stop.wait(self.heartbeat):
      with self._mutex:
        if self._stop.is_set():
          return
        try:
          storage.write_text(self.path, json.dumps(dict(self.me, beat=time.time())))
        except OSError:
          return

  def release(self):
    if not self.held:
      return
    with self._mutex:   # waits for an in-flight heartbeat write; none starts after this
      self._stop.set()
    if self._thread is not None:       # joined: no thread of ours is alive at interpreter shutdown
      self._thread.join(timeout=5)
      self._thread = None
    info = self._read()
    if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
      storage.remove(self.path)
    self.held = False
