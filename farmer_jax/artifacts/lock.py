"""A workdir lock: one training run per workdir at a time.

The lock file (``runs.LOCK`` in the run folder) holds JSON {pid, host, started, beat, token} and,
under a scheduler, the run's identity {run, attempt} (``run_identity``). Every version of the file
is written whole, so a reader sees a complete lock or none:

* local (or NFS) file: created by linking a complete temporary file into place (``link`` fails if
  the name exists);
* ``gs://`` bucket: google-cloud-storage uploads with a generation precondition
  (``if_generation_match=0`` creates, ``=<generation we read>`` replaces).

Taking over, refreshing and releasing are compare-and-swap against the exact version judged (or
last written): in a bucket the generation precondition; locally the file is renamed to a unique
name (one renamer gets it), checked to be that version, and only then is the new lock linked in
(or the old one deleted); a runner-up that renamed another version puts it back. Of two runs that
read the same stale lock, exactly one holds it, and a heartbeat never overwrites a takeover.

A lock is taken over, with a message, when its holder is on this host and its pid is gone, when it
is an earlier process of this run (same ``run`` identity, newer ``attempt``, another host: a SLURM
requeue or a preempted VM's replacement), or when its heartbeat is older than ``stale_after``
seconds (a holder that died on another host, or whose pid was reused here; a lock without
``beat`` uses the file's mtime). A live holder makes the second run fail with an error naming its
pid and host; a file that is not a lock is an error naming it.

A heartbeat thread rewrites ``beat`` every ``heartbeat`` seconds, conditioned on the version it
last wrote, which proves the run still owns the workdir. A failed write (full disk, an NFS or
bucket hiccup) is retried with back-off. ``lost`` is set, and the training loop stops at the next
step, when another run has taken the lock (``taken``: stop without writing, the workdir is theirs)
or when no write has succeeded for ``stale_after / 2`` seconds (the lock is still ours, since no
other run may judge it stale before ``stale_after``: save, then stop).
"""

import errno
import json
import math
import os
import socket
import threading
import time
import uuid
from typing import NamedTuple

from farmer_jax.artifacts import storage
from farmer_jax.artifacts.runs import RunDir
from farmer_jax.errors import UserError, brief


class WorkdirBusyError(UserError, RuntimeError):
  """Another live run holds the workdir, or its lock file is not a lock. Also a RuntimeError, so
  that ``except RuntimeError`` around a run still catches it."""


class WorkdirLockLost(WorkdirBusyError):
  """This run can no longer prove that it owns its workdir. ``taken``: another run holds the lock
  now (nothing may be written); else the lock could not be refreshed but is still ours."""

  def __init__(self, message, taken):
    super().__init__(message)
    self.taken = taken


def run_identity(env=None):
  """(run, attempt) of this process's run under a scheduler, (None, None) outside one.

  ``FARMER_RUN_ID`` (e.g. a TPU queued-resource name, set in the start-up script) names the run
  and every new process of it replaces the previous one (attempt None). Under SLURM the run is the
  cluster's job id and the attempt ``SLURM_RESTART_COUNT``, so a requeued job replaces its earlier
  attempt but two trainings inside one allocation stay two runs."""
  env = os.environ if env is None else env
  if env.get("FARMER_RUN_ID"):
    return env["FARMER_RUN_ID"], None
  if env.get("SLURM_JOB_ID"):
    try:
      attempt = int(env.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
      attempt = 0
    return f"slurm:{env.get('SLURM_CLUSTER_NAME', '')}/{env['SLURM_JOB_ID']}", attempt
  return None, None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:      # exists, owned by someone else
    return True
  return True


class _Seen(NamedTuple):
  """One version of the lock file: its text, what pins that version, its mtime (seconds)."""
  text: str
  version: object
  mtime: float


class _Changed(Exception):
  """The lock file is no longer the version a conditional write was based on."""


# link() errors of file systems without hard links
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}


class _LocalFile:
  """The lock file on a local or network file system; a version is (device, inode, text)."""

  def __init__(self, path):
    self.path = path

  def read(self):
    for _ in range(20):
      try:
        fd = os.open(self.path, os.O_RDONLY)
      except FileNotFoundError:
        return None
      with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        text = f.read().decode(errors="replace")
      if text or time.time() - st.st_mtime > 2:
        break
      time.sleep(0.05)    # just created without link() (see create) and not yet written
    return _Seen(text, (st.st_dev, st.st_ino, text), st.st_mtime)

  def _aside(self, what):
    return f"{self.path}.{what}-{uuid.uuid4().hex[:8]}"

  def create(self, text):
    """Creates the file holding ``text``; FileExistsError if there is one."""
    tmp = self._aside("new")
    try:
      with open(tmp, "w") as f:
        f.write(text)
      try:
        os.link(tmp, self.path)     # atomic create-if-absent of the complete file
      except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
          raise
        return self._create_exclusive(text)
      st = os.stat(tmp)
    finally:
      storage.remove(tmp)
    return (st.st_dev, st.st_ino, text)

  def _create_exclusive(self, text):
    """create() where the file system has no hard links (e.g. gcsfuse): O_EXCL, then one write
    (a reader that finds the file still empty waits, see read)."""
    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
      with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        st = os.fstat(f.fileno())
    except BaseException:
      storage.remove(self.path)   # an empty lock file would read as a malformed one for ever
      raise
    return (st.st_dev, st.st_ino, text)

  def swap(self, text, seen):
    """Replaces the version ``seen`` by ``text``; _Changed if the file is another version."""
    aside = self._aside("stale")
    try:
      os.rename(self.path, aside)     # of several runs renaming at once, one gets this inode
    except FileNotFoundError:
      raise _Changed() from None
    got = _LocalFile(aside).read()
    if got is None or got.version != seen.version:
      self._put_back(aside)       # not the version judged stale
      raise _Changed()
    try:
      version = self.create(text)
    except FileExistsError:       # another run created one while the name was free
      storage.remove(aside)
      raise _Changed() from None
    except BaseException:         # the write failed (disk full, ...): the old version goes back
      self._put_back(aside)
      raise
    storage.remove(aside)
    return version

  def _put_back(self, aside):
    """Moves a file renamed aside back into place, unless a new lock was created meanwhile."""
    try:
      os.link(aside, self.path)
    except FileExistsError:
      pass
    except OSError:               # no hard links here, or the link itself failed (disk full)
      if not os.path.exists(self.path):
        os.rename(aside, self.path)
    storage.remove(aside)

  def update(self, text, version):
    """Replaces the file by ``text`` if it is still ``version`` (a heartbeat), as swap does: a
    check then a plain replace could overwrite a lock another run swapped in between the two;
    _Changed otherwise."""
    cur = self.read()
    if cur is None or cur.version != version:
      raise _Changed()
    return self.swap(text, cur)

  def remove(self, version):
    """Removes the file if it is still ``version`` (renamed aside first, then compared)."""
    aside = self._aside("released")
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return
    got = _LocalFile(aside).read()
    if got is not None and got.version == version:
      storage.remove(aside)
    else:
      self._put_back(aside)


def _gcs_client():
  """A google-cloud-storage client (the project is not needed to read or write objects)."""
  from google.cloud import storage as gcs
  try:
    return gcs.Client()
  except OSError:
    return gcs.Client(project=None)


class _GcsObject:
  """The lock file in a ``gs://`` bucket; a version is the object's generation. Failures of the
  service are raised as OSError (the heartbeat retries those)."""

  def __init__(self, url, client=None):
    self.url = url
    self.bucket_name, _, self.name = url[len("gs://"):].partition("/")
    self._client = client

  def _call(self, fn):
    from google.api_core import exceptions
    from google.auth import exceptions as auth_exceptions
    try:
      return fn()
    except (exceptions.PreconditionFailed, exceptions.NotFound):
      raise
    except Exception as e:  # noqa: BLE001 - the client's transport/auth/service errors
      if isinstance(e, OSError):
        raise
      denied = isinstance(e, (auth_exceptions.GoogleAuthError, exceptions.Unauthorized,
                              exceptions.Forbidden))
      raise OSError(errno.EACCES if denied else errno.EIO, brief(e), self.url) from e

  def _bucket(self):
    if self._client is None:
      self._client = self._call(_gcs_client)
    return self._client.bucket(self.bucket_name)

  def read(self):
    from google.api_core import exceptions
    for _ in range(5):   # the object may change between its metadata and its download
      blob = self._call(lambda: self._bucket().get_blob(self.name))
      if blob is None:
        return None
      try:
        data = self._call(lambda: blob.download_as_bytes(if_generation_match=blob.generation))
      except (exceptions.PreconditionFailed, exceptions.NotFound):
        continue
      mtime = blob.updated.timestamp() if blob.updated is not None else time.time()
      return _Seen(data.decode(errors="replace"), blob.generation, mtime)
    raise OSError(errno.EIO, "the lock object keeps changing while being read", self.url)

  def _upload(self, text, generation):
    blob = self._bucket().blob(self.name)
    self._call(lambda: blob.upload_from_string(text, content_type="application/json",
                                               if_generation_match=generation))
    return blob.generation

  def create(self, text):
    from google.api_core import exceptions
    try:
      return self._upload(text, 0)
    except exceptions.PreconditionFailed:
      raise FileExistsError(errno.EEXIST, "exists", self.url) from None

  def swap(self, text, seen):
    return self.update(text, seen.version)

  def update(self, text, version):
    from google.api_core import exceptions
    try:
      return self._upload(text, version)
    except (exceptions.PreconditionFailed, exceptions.NotFound):
      raise _Changed() from None

  def remove(self, version):
    from google.api_core import exceptions
    try:
      self._call(lambda: self._bucket().blob(self.name).delete(if_generation_match=version))
    except (exceptions.PreconditionFailed, exceptions.NotFound):
      pass


def _lock_file(path):
  if path.startswith("gs://"):
    return _GcsObject(path)
  if storage.is_url(path):
    raise WorkdirBusyError(f"the workdir lock {path} needs a local path or a gs:// bucket (no "
                           "other object store offers the conditional writes it relies on). "
                           "Fix: use a local, NFS or gs:// --workdir")
  return _LocalFile(path)


class WorkdirLock:

  def __init__(self, workdir: str, heartbeat: float = 30.0, stale_after: float = 600.0, say=print,
               env=None):
    self.path = RunDir(workdir).lock
    self.workdir = storage.parent(self.path)
    self.heartbeat, self.stale_after, self.say = heartbeat, stale_after, say
    # heartbeat failures are retried this long; less than stale_after, so the lock is still ours
    self.give_up = stale_after / 2
    self.run, self.attempt = run_identity(env)
    self._file = _lock_file(self.path)
    self._stop = threading.Event()
    self._mutex = threading.Lock()   # a heartbeat write never overlaps release's removal
    self._thread = None
    self.held = False
    self.lost = None                 # a WorkdirLockLost once ownership can no longer be proven

  # ---- reading a lock ----

  def _parse(self, seen):
    """The holder's fields; WorkdirBusyError naming the file if it is not a lock."""
    try:
      info = json.loads(seen.text)
    except (ValueError, RecursionError):
      info = None
    ok = (isinstance(info, dict) and type(info.get("pid")) is int and 0 < info["pid"] < 2**31
          and isinstance(info.get("host"), str) and info["host"]
          and (info.get("beat") is None
               or (type(info["beat"]) in (int, float) and math.isfinite(info["beat"]))))
    if not ok:
      text = seen.text if len(seen.text) <= 80 else seen.text[:77] + "..."
      raise WorkdirBusyError(
          f"{self.path} is not a farmer_jax workdir lock (expected JSON with a positive integer "
          f"pid and a host; it holds {text!r}). Fix: if no training is using {self.workdir}, "
          f"delete {self.path} and re-run")
    return info

  def _takeover_reason(self, info, seen):
    """None if the holder may be alive, else why its lock is taken over ('' for one of ours)."""
    host, pid = info["host"], info["pid"]
    here = host == socket.gethostname()
    if here and pid == os.getpid():
      return ""
    if here and not _pid_alive(pid):
      return f"it is stale: pid {pid} on this host is gone"
    if (not here and self.run is not None and info.get("run") == self.run
        and (self.attempt is None or not isinstance(info.get("attempt"), int)
             or self.attempt > info["attempt"])):
      return f"it belongs to an earlier process of this run ({self.run}, on host {host})"
    # a live holder beats every `heartbeat` seconds; on this host a live pid without beats is
    # another process that reused the pid (e.g. after a reboot)
    beat = info.get("beat")
    age = time.time() - (beat if beat is not None else seen.mtime)
    if age > self.stale_after:
      return f"it is stale: no heartbeat from {host} (pid {pid}) for {age:.0f}s"
    return None

  def _busy(self, info):
    run = f", run {info['run']}" if info.get("run") else ""
    return WorkdirBusyError(
        f"{self.workdir} is in use by another training run (pid {info['pid']} on host "
        f"{info['host']}{run}, started {info.get('started')}). Fix: wait for it to finish, stop "
        f"it, or use another --workdir; if that run is dead, delete {self.path}")

  # ---- taking, refreshing, releasing ----

  def _text(self):
    return json.dumps(dict(self.me, beat=time.time()))

  def acquire(self):
    """Takes the lock (WorkdirBusyError if a live run holds it) and starts the heartbeat."""
    if not storage.is_url(self.path):
      storage.makedirs(self.workdir)
    self.me = {"pid": os.getpid(), "host": socket.gethostname(),
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "token": uuid.uuid4().hex}
    if self.run is not None:
      self.me.update(run=self.run, attempt=self.attempt)
    took = ""                       # why a holder's lock was taken over, if one was
    for _ in range(5):
      seen = self._file.read()
      if seen is None:
        try:
          self._version = self._file.create(self._text())
        except FileExistsError:
          continue
        break
      info = self._parse(seen)
      if info.get("token") == self.me["token"]:   # our own write, whose reply was lost
        self._version = seen.version
        break
      why = self._takeover_reason(info, seen)
      if why is None:
        raise self._busy(info)
      try:
        self._version = self._file.swap(self._text(), seen)
      except _Changed:              # another run changed it first: judge the new version
        continue
      took = why
      break
    else:
      raise WorkdirBusyError(f"could not take the workdir lock {self.path}: other runs keep "
                             "changing it. Fix: make sure one training uses "
                             f"{self.workdir} at a time, then re-run")
    self.held = True   # before anything else: a start-up SIGTERM's release must see it
    if took:
      self.say(f"took over the workdir lock {self.path}: {took}")
    self._last_ok = time.monotonic()
    self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
    self._thread.start()
    return self

  def _refresh(self):
    """One heartbeat write, conditioned on the version we wrote last (the thread calls this).
    Raises OSError if the write fails, WorkdirLockLost(taken=True) if another run holds the
    lock."""
    text = self._text()
    try:
      self._version = self._file.update(text, self._version)
      return
    except _Changed:
      pass
    seen = self._file.read()
    if seen is None:      # removed by hand, or in the instant a runner-up puts a lock back
      try:
        self._version = self._file.create(text)
        return
      except FileExistsError:
        seen = self._file.read()
    if seen is not None:
      try:
        info = self._parse(seen)
      except WorkdirBusyError:
        info = {}
      if info.get("token") == self.me["token"]:
        self._version = seen.version
        return
      run = f", run {info['run']}" if info.get("run") else ""
      holder = (f"pid {info.get('pid')} on host {info.get('host')}{run}" if info
                else f"{seen.text[:40]!r}")
    else:
      holder = "no one"
    raise WorkdirLockLost(
        f"another training run took over the workdir lock {self.path} (it now holds "
        f"{holder}): this run stopped without saving, so as not to write into that run's "
        f"checkpoints. Fix: let one training at a time use {self.workdir} (a restarted process "
        "of this run takes over on purpose; otherwise this run's heartbeat may have stalled for "
        f"over {self.stale_after:.0f}s); to go on from the last checkpoint, re-run the same "
        "command once the other run has finished", taken=True)

  def _beat(self):
    wait, backoff = self.heartbeat, 1.0
    while not self._stop.wait(wait):
      with self._mutex:
        if self._stop.is_set():
          return
        try:
          self._refresh()
        except WorkdirLockLost as e:
          self.lost = e
          return
        except OSError as e:        # transient (full disk, NFS or bucket hiccup): retry
          failing = time.monotonic() - self._last_ok
          if failing > self.give_up:
            self.lost = self._unrefreshable(
                f"for {failing:.0f}s ({e})", "check that the storage is reachable and writable "
                "(disk space, bucket access), then re-run the same command to resume")
            return
          wait, backoff = min(backoff, self.heartbeat), backoff * 2
          continue
        except Exception as e:  # noqa: BLE001 - a heartbeat that cannot run must not die silently
          self.lost = self._unrefreshable(
              f"({brief(e)})", "re-run the same command to resume (--debug shows where it failed)")
          self.lost.__cause__ = e
          return
        self._last_ok = time.monotonic()
        wait, backoff = self.heartbeat, 1.0

  def _unrefreshable(self, detail, fix):
    """The WorkdirLockLost of a lock that is still ours but could not be refreshed: the run saves,
    then stops."""
    return WorkdirLockLost(
        f"the workdir lock {self.path} could not be refreshed {detail}: this run saved a "
        f"checkpoint and stopped rather than train on without proving it owns {self.workdir}. "
        f"Fix: {fix}", taken=False)

  def release(self):
    """Stops the heartbeat and removes the lock if it is still ours (best effort: a lock left
    behind is stale once its pid or heartbeat is gone)."""
    if not self.held:
      return
    with self._mutex:   # waits for an in-flight heartbeat write; none starts after this
      self._stop.set()
    if self._thread is not None:       # joined: no thread of ours is alive at interpreter shutdown
      self._thread.join(timeout=5)
      self._thread = None
    self.held = False
    if self.lost is not None and self.lost.taken:
      return
    try:
      self._file.remove(self._version)
    except OSError as e:
      self.say(f"could not remove the workdir lock {self.path}: {e}")
