"""The workdir lock (artifacts/lock.py): one run per workdir, kept while the run lives, taken over
only from a dead holder or an earlier process of the same run, and exactly once when runs race.

Bucket workdirs use google-cloud-storage's conditional writes, which cannot be reached offline:
those tests run the lock against tests/fake_gcs.py's FakeGcsClient (generations and
``if_generation_match`` preconditions as the service has them)."""

import errno
import functools
import json
import multiprocessing
import os
import socket
import time

import pytest

from farmer_jax.artifacts import lock as lockmod
from farmer_jax.artifacts import storage
from farmer_jax.artifacts.lock import WorkdirBusyError, WorkdirLock, WorkdirLockLost
from farmer_jax.artifacts.runs import LOCK

QUIET = lambda _: None  # noqa: E731


def _holder(pid=4242, host="elsewhere", beat=None, **extra):
  """Another run's lock text (a fresh heartbeat unless ``beat`` is given)."""
  return json.dumps(dict(pid=pid, host=host, started="earlier",
                         beat=time.time() if beat is None else beat, **extra))


def _wait_for(cond, timeout=20.0):
  """Polls ``cond`` until it is true (True) or ``timeout`` seconds pass (False)."""
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if cond():
      return True
    time.sleep(0.02)
  return False


def _overwritten(path, theirs, lk):
  """Writes another run's lock over ``lk``'s (whole, as a run writes it) until ``lk``'s heartbeat
  notices: a plain write, unlike a takeover's swap, can land inside a heartbeat's check-then-write
  and be overwritten, so it is repeated."""
  for _ in range(10):
    storage.write_text(path, theirs)
    if _wait_for(lambda: lk.lost is not None, timeout=2.0):
      return True
  return False


def test_heartbeat_survives_transient_write_errors(tmp_path, monkeypatch):
  """A failed heartbeat write (full disk, NFS hiccup) is retried: beats resume afterwards and the
  run keeps its lock."""
  lk = WorkdirLock(str(tmp_path), heartbeat=0.05, say=QUIET).acquire()
  link, fails = os.link, [3]

  def flaky(src, dst, **kw):   # the heartbeat's new version is linked into place
    if os.fspath(dst) == lk.path and fails[0]:
      fails[0] -= 1
      raise OSError(errno.ENOSPC, "No space left on device", dst)
    link(src, dst, **kw)

  monkeypatch.setattr(os, "link", flaky)
  beat = lambda: json.loads((tmp_path / LOCK).read_text())["beat"]  # noqa: E731
  assert _wait_for(lambda: not fails[0]), "the heartbeat stopped trying"
  after_failures = time.time()
  assert _wait_for(lambda: beat() > after_failures), "no heartbeat after the transient errors"
  assert getattr(lk, "lost", None) is None
  lk.release()
  assert not (tmp_path / LOCK).exists()


def test_heartbeat_gives_up_while_the_lock_is_still_ours(tmp_path, monkeypatch):
  """Writes failing for longer than ``stale_after / 2`` mark the lock lost but not taken (the run
  saves and stops); release still removes it."""
  lk = WorkdirLock(str(tmp_path), heartbeat=0.05, stale_after=0.5, say=QUIET).acquire()
  link = os.link

  def broken(src, dst, **kw):
    if os.fspath(dst) == lk.path:
      raise OSError(errno.EIO, "Input/output error", dst)
    link(src, dst, **kw)

  monkeypatch.setattr(os, "link", broken)
  assert _wait_for(lambda: lk.lost is not None)
  assert not lk.lost.taken
  assert "could not be refreshed" in str(lk.lost) and "Input/output error" in str(lk.lost)
  assert (tmp_path / LOCK).exists(), "a failed heartbeat leaves the previous version in place"
  monkeypatch.setattr(os, "link", link)
  lk.release()
  assert not (tmp_path / LOCK).exists()


def test_a_lock_taken_by_another_run_is_noticed_and_left_to_it(tmp_path):
  lk = WorkdirLock(str(tmp_path), heartbeat=0.05, say=QUIET).acquire()
  theirs = _holder()
  assert _overwritten(tmp_path / LOCK, theirs, lk), "the heartbeat did not notice the takeover"
  assert lk.lost.taken and "pid 4242 on host elsewhere" in str(lk.lost)
  lk.release()
  assert (tmp_path / LOCK).read_text() == theirs, "the new holder's lock must stay"


def test_a_takeover_between_a_heartbeats_check_and_write_is_not_undone(tmp_path):
  """Another run swapping its lock in while a heartbeat has read (its own) version but not yet
  written: the heartbeat must not overwrite it (a check then a plain replace did, and the run that
  took over trained on believing it held the lock), it must see the loss."""
  lk = WorkdirLock(str(tmp_path), heartbeat=3600, say=QUIET).acquire()
  other = WorkdirLock(str(tmp_path), heartbeat=3600, say=QUIET)   # same pid: takes over at once
  real_read, done = lk._file.read, []

  def read():
    seen = real_read()
    if not done:
      done.append(other.acquire())
    return seen

  lk._file.read = read
  with pytest.raises(WorkdirLockLost, match="another training run took over"):
    lk._refresh()
  assert json.loads((tmp_path / LOCK).read_text())["token"] == other.me["token"]
  lk.lost = WorkdirLockLost("taken", taken=True)
  lk.release()
  assert json.loads((tmp_path / LOCK).read_text())["token"] == other.me["token"]
  other.release()
  assert not (tmp_path / LOCK).exists()


def _race_child(workdir, rounds, start, judged, results):
  """One of two runs: each round, read the parent's stale lock, wait until the other run has read
  it too, then take it over (or be refused)."""
  for r in range(rounds):
    start.wait()
    lk = WorkdirLock(workdir, heartbeat=3600, say=QUIET)
    read, first = lk._file.read, [True]

    def read_then_wait(read=read, first=first):
      seen = read()
      if first[0]:
        first[0] = False
        judged.wait()        # both runs judged the same stale version
      return seen

    lk._file.read = read_then_wait
    try:
      lk.acquire()
      results.put((r, os.getpid(), "held"))
    except WorkdirBusyError:
      results.put((r, os.getpid(), "busy"))
    start.wait()             # the parent has looked at the lock file
    lk.release()
    start.wait()             # released: the parent writes the next stale lock


def test_two_runs_racing_for_a_stale_lock_one_wins(tmp_path):
  """Two real processes read the same stale lock, then both take it over at once: in every round
  exactly one holds it and the file names that one."""
  rounds = 8
  ctx = multiprocessing.get_context("spawn")
  start, judged = ctx.Barrier(3, timeout=60), ctx.Barrier(2, timeout=60)
  results = ctx.Queue()
  procs = [ctx.Process(target=_race_child, args=(str(tmp_path), rounds, start, judged, results))
           for _ in range(2)]
  for p in procs:
    p.start()
  try:
    for r in range(rounds):
      # stale two ways: a dead pid on this host, or an old heartbeat from another host
      stale = (_holder(pid=1 << 22, host=socket.gethostname()) if r % 2 else
               _holder(beat=0.0))
      (tmp_path / LOCK).write_text(stale)
      start.wait()
      got = sorted(results.get(timeout=60) for _ in procs)
      holders = [pid for _, pid, what in got if what == "held"]
      assert len(holders) == 1, f"round {r}: {got}"
      assert json.loads((tmp_path / LOCK).read_text())["pid"] == holders[0]
      start.wait()
      start.wait()
  finally:
    for p in procs:
      p.join(timeout=60)
      if p.is_alive():
        p.kill()
  assert [p.exitcode for p in procs] == [0, 0]
  assert sorted(os.listdir(tmp_path)) == [], "no lock or renamed-aside file is left"


def test_a_live_pid_that_stopped_beating_is_stale(tmp_path):
  """On this host a live pid whose lock has no heartbeat for stale_after is not the holder (the pid
  was reused, e.g. after a reboot): taken over; with a recent heartbeat it is refused."""
  (tmp_path / LOCK).write_text(_holder(pid=os.getppid(), host=socket.gethostname()))
  with pytest.raises(WorkdirBusyError, match=f"pid {os.getppid()}"):
    WorkdirLock(str(tmp_path), stale_after=60, say=QUIET).acquire()
  (tmp_path / LOCK).write_text(_holder(pid=os.getppid(), host=socket.gethostname(), beat=0.0))
  said = []
  WorkdirLock(str(tmp_path), stale_after=60, say=said.append).acquire().release()
  assert f"no heartbeat from {socket.gethostname()} (pid {os.getppid()})" in said[0]


def test_lock_on_a_file_system_without_hard_links(tmp_path, monkeypatch):
  """Where link() is refused (e.g. gcsfuse) the lock is created with O_EXCL instead."""
  def no_link(*_):
    raise OSError(errno.EPERM, "Operation not permitted")

  monkeypatch.setattr(os, "link", no_link)
  (tmp_path / LOCK).write_text(_holder(beat=0.0))
  said = []
  lk = WorkdirLock(str(tmp_path), say=said.append).acquire()
  assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid() and "stale" in said[0]
  lk.release()
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("env, earlier, takes_over", [
    # a SLURM requeue (new node, restart count up) replaces its earlier attempt at once
    ({"SLURM_JOB_ID": "77", "SLURM_CLUSTER_NAME": "c", "SLURM_RESTART_COUNT": "1"},
     {"run": "slurm:c/77", "attempt": 0}, True),
    # two trainings in one allocation are two runs
    ({"SLURM_JOB_ID": "77", "SLURM_CLUSTER_NAME": "c"}, {"run": "slurm:c/77", "attempt": 0},
     False),
    ({"SLURM_JOB_ID": "78", "SLURM_CLUSTER_NAME": "c", "SLURM_RESTART_COUNT": "1"},
     {"run": "slurm:c/77", "attempt": 0}, False),
    # a preempted VM's replacement names the run itself
    ({"FARMER_RUN_ID": "qr-farmer-1"}, {"run": "qr-farmer-1"}, True),
    ({"FARMER_RUN_ID": "qr-farmer-2"}, {"run": "qr-farmer-1"}, False),
    ({}, {}, False),
])
def test_a_new_process_of_the_same_run_takes_over_at_once(tmp_path, monkeypatch, env, earlier,
                                                          takes_over):
  """A fresh lock from another host is taken over at once by a later process of the same run
  (same scheduler identity); any other run is refused."""
  for k in ("FARMER_RUN_ID", "SLURM_JOB_ID", "SLURM_CLUSTER_NAME", "SLURM_RESTART_COUNT"):
    monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  (tmp_path / LOCK).write_text(_holder(**earlier))
  said = []
  if not takes_over:
    with pytest.raises(WorkdirBusyError, match="pid 4242 on host elsewhere"):
      WorkdirLock(str(tmp_path), say=said.append).acquire()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == 4242
    return
  lk = WorkdirLock(str(tmp_path), say=said.append).acquire()
  mine = json.loads((tmp_path / LOCK).read_text())
  assert mine["pid"] == os.getpid() and mine["run"] == earlier["run"]
  assert "earlier process of this run" in said[0]
  lk.release()


@pytest.mark.parametrize("text", ["not json", "", "[1, 2]", '{"host": "h"}',
                                  '{"pid": 0, "host": "h"}', '{"pid": "12", "host": "h"}',
                                  '{"pid": 12}', '{"pid": 12, "host": "h", "beat": "soon"}',
                                  '{"pid": 12, "host": "h", "beat": NaN}',
                                  '{"pid": 99999999999999999999, "host": "h"}',
                                  pytest.param("[" * 100000 + "]" * 100000, id="deep")])
def test_a_malformed_lock_file_is_a_clear_error(tmp_path, text):
  (tmp_path / LOCK).write_text(text)
  with pytest.raises(WorkdirBusyError) as e:
    WorkdirLock(str(tmp_path), say=QUIET).acquire()
  msg = str(e.value)
  assert f"{tmp_path / LOCK} is not a farmer_jax workdir lock" in msg and "\n" not in msg
  assert f"Fix: if no training is using {tmp_path}, delete {tmp_path / LOCK}" in msg
  assert (tmp_path / LOCK).read_text() == text, "the file is left for the user to judge"


def test_busy_workdir_is_refused_before_anything_is_built(tmp_path, monkeypatch):
  """The lock is taken before the input pipeline, the model and the jitted step are built, so a
  second run is refused at once; the holder's lock is untouched."""
  from farmer_jax import configlib
  from farmer_jax.config.parse import parse
  from farmer_jax.train import trainer as trainer_mod

  def built(*_, **__):
    raise AssertionError("built before the workdir lock was taken")

  def start(workdir):
    trainer_mod.start(parse(configlib.load("quickstart:tiny"), workdir), workdir, built,
                      quiet=True)

  monkeypatch.setattr(trainer_mod, "TrainInput", built)
  theirs = _holder(pid=os.getppid(), host=socket.gethostname())
  (tmp_path / LOCK).write_text(theirs)
  with pytest.raises(WorkdirBusyError, match=f"pid {os.getppid()} on host"):
    start(str(tmp_path))
  assert (tmp_path / LOCK).read_text() == theirs
  # a build that fails after the lock was taken releases it and leaves no workdir behind
  with pytest.raises(AssertionError, match="built before"):
    start(str(tmp_path / "new" / "run"))
  assert not (tmp_path / "new").exists()
  # ... also when the task's build fails (the input pipeline built and stopped again)
  monkeypatch.undo()
  with pytest.raises(AssertionError, match="built before"):
    start(str(tmp_path / "new" / "run"))
  assert not (tmp_path / "new").exists()


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The blob of the lock of gs://b/run in a FakeGcsClient that the lock uses."""
  from fake_gcs import FakeGcsClient   # here: the race test's spawned runs need not import it
  client = FakeGcsClient(str(tmp_path / "bucket"))
  monkeypatch.setattr(lockmod, "_gcs_client", lambda: client)
  return client.bucket("b").blob("run/" + LOCK)


def test_bucket_takeover_is_conditional_on_the_stale_generation(bucket, monkeypatch):
  """In a bucket, of two runs that read the same stale lock only the first write wins (generation
  precondition); the other is refused naming the winner."""
  bucket.upload_from_string(_holder(beat=0.0))
  stale_gen = bucket.generation
  lk = WorkdirLock("gs://b/run", say=QUIET)
  read = lk._file.read

  def read_then_lose_the_race():
    seen = read()
    if seen is not None and seen.version == stale_gen:  # another run takes it over meanwhile
      bucket.upload_from_string(_holder(pid=777, host="winner"), if_generation_match=stale_gen)
    return seen

  monkeypatch.setattr(lk._file, "read", read_then_lose_the_race)
  with pytest.raises(WorkdirBusyError, match="pid 777 on host winner"):
    lk.acquire()
  assert json.loads(bucket.download_as_bytes())["host"] == "winner"


def test_bucket_lock_heartbeat_and_release_prove_ownership(bucket):
  """In a bucket the heartbeat keeps writing conditioned on its own generation, notices another
  run's write, and release then leaves that run's lock alone; an owned lock is deleted."""
  lk = WorkdirLock("gs://b/run", heartbeat=0.05, say=QUIET).acquire()
  generation = lambda: bucket.client.generations[bucket.path]  # noqa: E731
  first = generation()
  assert _wait_for(lambda: generation() >= first + 2), "no heartbeat writes"
  bucket.upload_from_string(_holder(pid=777, host="winner"))
  assert _wait_for(lambda: lk.lost is not None) and lk.lost.taken
  assert "pid 777 on host winner" in str(lk.lost)
  lk.release()
  assert json.loads(bucket.download_as_bytes())["host"] == "winner"
  bucket.delete()
  WorkdirLock("gs://b/run", say=QUIET).acquire().release()
  assert not os.path.exists(bucket.path)


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
  """(config, workdir) of a 4-step tiny training whose lock beats every 0.05 s."""
  from farmer_jax import configlib
  from farmer_jax.train import session as session_mod
  monkeypatch.setattr(session_mod, "WorkdirLock",
                      functools.partial(WorkdirLock, heartbeat=0.05, stale_after=0.5))
  c = configlib.load("quickstart:tiny")
  c.train.update(steps=4, log_every=2, warmup_steps=1)
  return c, tmp_path


def test_training_stops_without_writing_when_another_run_took_its_lock(tiny_run):
  from farmer_jax.config.parse import parse
  from farmer_jax.train.trainer import start
  c, workdir = tiny_run
  tr = start(parse(c, str(workdir)), str(workdir), quiet=True)
  theirs = _holder()
  assert _overwritten(workdir / LOCK, theirs, tr.lock)
  with pytest.raises(WorkdirLockLost, match="at step 0: another training run took over .*pid "
                     "4242 on host elsewhere.* stopped without saving"):
    tr.fit()   # checked before fit writes anything (config.json, the metrics trim)
  tr.close()
  assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")
  assert not (workdir / "config.json").exists() and not (workdir / "metrics.jsonl").exists()
  assert (workdir / LOCK).read_text() == theirs


@pytest.mark.slow  # ~15-30 s on 2 cores (one more tiny build); the taken case above is the fast one
def test_training_saves_and_stops_when_its_lock_cannot_be_refreshed(tiny_run, monkeypatch):
  """The lock is still ours but unwritable (full disk): a checkpoint is saved, then the run stops
  with one line (exit 2)."""
  from farmer_jax.commands import exits
  from farmer_jax.config.parse import parse
  from farmer_jax.train.trainer import start
  c, workdir = tiny_run
  link, lock_path = os.link, str(workdir / LOCK)

  def broken(src, dst, **kw):   # the heartbeat's new version cannot be linked into place
    if os.fspath(dst) == lock_path:
      raise OSError(errno.ENOSPC, "No space left on device", dst)
    link(src, dst, **kw)

  tr = start(parse(c, str(workdir)), str(workdir), quiet=True)
  monkeypatch.setattr(os, "link", broken)
  assert _wait_for(lambda: tr.lock.lost is not None)
  with pytest.raises(WorkdirLockLost) as e:
    tr.fit()
  tr.close()
  code, msg = exits.failure(e.value)
  assert code == 2 and msg.startswith("at step 1: the workdir lock") and "saved a checkpoint" in msg
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1"]
  assert not (workdir / LOCK).exists()
