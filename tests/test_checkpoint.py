"""Checkpointer: refuses retention settings that would lose checkpoints, never deletes the newest
one, and moves an unreadable newest checkpoint aside (kept) so the resumed run can write that step
again."""

import errno
import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from farmer_jax.artifacts.checkpoint import Checkpointer
from farmer_jax.artifacts.runs import CHECKPOINTS, RunDir


def snapshot(root):
  """{relative path: bytes} of every file under ``root`` (directories as None): a byte-for-byte
  picture of a tree."""
  out = {}
  for d, dirs, files in os.walk(root):
    for name in dirs:
      out[os.path.relpath(os.path.join(d, name), root)] = None
    for name in files:
      p = os.path.join(d, name)
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = f.read()
  return out


def truncate_tree(path):
  """Truncates every file under ``path`` to a third of its size, as a crash mid-write or a bad disk
  would."""
  n = 0
  for d, _, files in os.walk(path):
    for name in files:
      p = os.path.join(d, name)
      with open(p, "r+b") as fh:
        fh.truncate(max(os.path.getsize(p) // 3, 1))
      n += 1
  assert n, f"nothing to truncate under {path}"


def copy_run_with_new_step(trained_run, dest, new_step, mutate=None):
  """Copies the trained run to ``dest`` and adds a checkpoint at ``new_step`` holding its final
  state (passed through ``mutate(state) -> state`` first). Returns (workdir copy, the state
  written)."""
  workdir, _, tr = trained_run
  shutil.copytree(workdir, dest)
  ck = Checkpointer(RunDir(dest).checkpoints)
  state, meta, step = ck.restore_latest(tr.task.abstract_state, tr.task.state_sh)
  assert step == 200
  if mutate is not None:
    state = mutate(state)
  ck.save(new_step, state, dict(meta, step=new_step, data_step=new_step))
  ck.close()
  assert Checkpointer(RunDir(dest).checkpoints).steps() == [200, new_step]
  return dest, state


@pytest.mark.parametrize("kw", [
    dict(keep=0),
    dict(keep=-1),
    dict(keep=None),
    dict(keep=1.5),
    dict(keep=True),
    dict(keep_period=-1),
    dict(keep_period=0.5),
    dict(keep_period=None)
])
def test_checkpointer_refuses_settings_that_lose_checkpoints(tmp_path, kw):
  name = next(iter(kw))
  with pytest.raises(
      ValueError, match=f"checkpoint {name}={kw[name]!r} is invalid: it must be an integer >= "):
    Checkpointer(str(tmp_path / "ck"), **kw)
  assert not (tmp_path / "ck").exists()


def _tiny_ckpt_io():
  abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  sh = {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
  return abstract, sh


@pytest.mark.parametrize("keep,period,saves,kept", [(1, 0, [1, 2, 3], [3]),
                                                    (2, 2, [1, 2, 3, 4, 5], [2, 4, 5]),
                                                    (1, 0, [5, 3], [3])])
def test_retention_always_keeps_the_newest_checkpoint(tmp_path, keep, period, saves, kept):
  ck = Checkpointer(str(tmp_path / "ck"), keep=keep, keep_period=period)
  for s in saves:
    ck.save(s, {"w": jnp.full((3,), float(s))}, {"step": s})
    ck.wait()
  ck.close()
  ck = Checkpointer(str(tmp_path / "ck"), keep=keep, keep_period=period)
  assert ck.steps() == kept
  state, meta, step = ck.restore_latest(*_tiny_ckpt_io())
  assert step == kept[-1] == saves[-1] and meta == {"step": saves[-1]}
  np.testing.assert_array_equal(state["w"], np.full((3,), float(saves[-1])))


def test_corrupt_newest_checkpoint_is_moved_aside_and_its_step_rewritable(trained_run, tmp_path):
  _, _, tr = trained_run
  wd, state400 = copy_run_with_new_step(trained_run, tmp_path / "run", 400)
  ckdir = wd / CHECKPOINTS
  truncate_tree(ckdir / "400" / "state")
  bad = snapshot(ckdir / "400")
  said = []
  ck = Checkpointer(str(ckdir))
  state, meta, step = ck.restore_latest(tr.task.abstract_state, tr.task.state_sh, say=said.append)
  assert step == 200 and meta["step"] == 200
  # moved aside, byte-for-byte, to a name orbax does not list as a step; gone from the step list
  assert not (ckdir / "400").exists()
  assert snapshot(ckdir / "400.unreadable") == bad
  assert ck.steps() == [200]
  assert any(
      f"{ckdir / '400'}" in m and f"aside to {ckdir / '400.unreadable'}" in m for m in said), said
  assert any("restored checkpoint step 200" in m for m in said), said
  # the resumed run reaches step 400 again: saving it must work (a step moved aside is not
  # listed, so Orbax does not raise StepAlreadyExistsError)
  ck.save(400, state400, dict(meta, step=400, data_step=400))
  ck.close()
  ck = Checkpointer(str(ckdir))
  assert ck.steps() == [200, 400]
  state, meta, step = ck.restore_latest(tr.task.abstract_state, tr.task.state_sh, say=said.append)
  assert step == 400 and meta["step"] == 400
  chex.assert_trees_all_equal(jax.device_get(state), jax.device_get(state400), strict=True)
  ck.close()
  # a second corruption of the same step keeps the first one's remains too
  truncate_tree(ckdir / "400" / "state")
  ck = Checkpointer(str(ckdir))
  assert ck.restore_latest(tr.task.abstract_state, tr.task.state_sh, say=said.append)[2] == 200
  assert (ckdir / "400.unreadable").is_dir() and (
      ckdir / "400.unreadable-2").is_dir() and ck.steps() == [200]


def test_checkpoints_of_another_config_are_refused_and_left_alone(trained_run, tmp_path):
  """Every step failing means 'wrong config', not 'corrupt': nothing may be moved or changed."""
  workdir, _, tr = trained_run
  wd = tmp_path / "run"
  shutil.copytree(workdir, wd)
  before = snapshot(wd)
  other = dict(tr.task.abstract_state)
  other["params"] = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape + (2,), a.dtype),
                                 other["params"])
  with pytest.raises(
      ValueError,
      match="could be restored for this config: they were written by a different config"):
    Checkpointer(RunDir(wd).checkpoints).restore_latest(other, tr.task.state_sh, say=lambda m: None)
  assert snapshot(wd) == before


# Saves a 4 MB state into argv[1] with files limited to 64 KB (RLIMIT_FSIZE; SIGXFSZ ignored, so
# a write past it fails with EFBIG, as one onto a full disk fails with ENOSPC) and prints the error.
_LIMITED_SAVE = """
import resource, signal, sys
import numpy as np
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
from farmer_jax.artifacts.checkpoint import Checkpointer
ck = Checkpointer(sys.argv[1])
try:
  ck.save(7, {"w": np.random.default_rng(0).random((1024, 1024), np.float32)}, {"step": 7})
  ck.close()
except OSError as e:
  print("errno", e.errno, e)
"""


def test_failed_checkpoint_write_is_one_oserror_and_leaves_no_tmp(tmp_path):
  """A write that fails in Orbax's background threads (here: past a file size limit) surfaces as
  one OSError naming the checkpoints directory, the step and the cause; the step's half-written
  ``*.orbax-checkpoint-tmp`` is removed."""
  ckdir = tmp_path / "ck"
  r = subprocess.run([sys.executable, "-c", _LIMITED_SAVE, str(ckdir)], capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"errno {errno.EFBIG} " in r.stdout, r.stdout + r.stderr[-3000:]
  assert f"writing checkpoint step 7 to {ckdir} failed: File too large" in r.stdout
  assert os.listdir(ckdir) == []


def test_checkpoints_removed_during_a_save(tmp_path, monkeypatch):
  """`rm -rf checkpoints` while a save is in flight: one OSError (ENOENT) naming the directory,
  and no half-written temporary directory is left."""
  import orbax.checkpoint as ocp
  ckdir = tmp_path / "ck"
  ck = Checkpointer(str(ckdir))
  state = {f"w{i}": np.random.default_rng(i).random((64, 64), np.float32) for i in range(4)}
  ck.save(1, state, {"step": 1})
  ck.wait()
  # The removal lands at a fixed point of the background write (its data written, its commit
  # not yet made), not wherever a race between two threads happens to put it.
  temporary = ocp.path.atomicity.AtomicRenameTemporaryPath
  finalize = temporary.finalize

  async def removed_first(self):
    shutil.rmtree(ckdir, ignore_errors=True)   # rm -rf
    return await finalize(self)

  monkeypatch.setattr(temporary, "finalize", removed_first)
  ck.save(2, state, {"step": 2})
  with pytest.raises(OSError, match=f"checkpoint step 2 to {ckdir} failed: No such file or "
                     "directory") as e:
    ck.close()
  assert e.value.errno == errno.ENOENT
  assert not ckdir.exists() or not [n for n in os.listdir(ckdir) if "tmp" in n]


def test_a_failed_save_is_reported_not_the_lock_it_leaves(monkeypatch):
  """A checkpoint write failing because the workdir became unwritable also makes closing the run
  fail (its lock file cannot be removed): the save's error is the one raised."""
  from farmer_jax.train import trainer as trainer_lib
  save_error = OSError(errno.EACCES, "writing checkpoint step 10 to /w/checkpoints failed")

  class Run:
    def __init__(self, *_, **__):
      pass

    def fit(self):
      raise save_error

    def close(self):
      raise PermissionError(errno.EACCES, "Permission denied", "/w/.farmer_jax.lock")

  monkeypatch.setattr(trainer_lib, "start", Run)
  with pytest.raises(OSError) as e:
    trainer_lib.train_and_report(None, "/w")
  assert e.value is save_error


@pytest.mark.slow   # a training subprocess: ~30 s
def test_train_whose_checkpoint_cannot_be_written_is_one_line(tmp_path):
  """`farmer_jax train` whose checkpoint write fails in Orbax's threads (past a file size limit,
  as on a full disk): ONE line naming the checkpoints directory and the cause, exit 2, no Orbax
  tracebacks, no half-written ``*.orbax-checkpoint-tmp``."""
  from test_export import _file_size_limit
  wd = tmp_path / "run"
  r = subprocess.run([sys.executable, "-m", "farmer_jax", "train",
                      "--config=quickstart:tiny", f"--workdir={wd}",
                      "--config.train.steps=2", "--quiet"], capture_output=True, text=True,
                     timeout=600, preexec_fn=_file_size_limit(64 << 10))
  assert r.returncode == 2, r.stderr[-3000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f"farmer_jax train: [Errno {errno.EFBIG}] writing checkpoint step 2 to "
      f"{RunDir(wd).checkpoints} failed: File too large"), r.stderr[-3000:]
  assert os.listdir(RunDir(wd).checkpoints) == []
  assert not os.path.exists(RunDir(wd).lock)


def test_checkpoints_removed_between_saves(tmp_path):
  """`rm -rf checkpoints` under a running training: the next save stops with one OSError naming
  the directory (instead of silently starting a new one without the run's older steps)."""
  ckdir = tmp_path / "ck"
  ck = Checkpointer(str(ckdir))
  ck.save(1, {"w": np.ones(3, np.float32)}, {"step": 1})
  ck.wait()
  shutil.rmtree(ckdir)
  with pytest.raises(OSError, match=f"writing checkpoint step 2 to {ckdir} failed: No such file "
                     "or directory") as e:
    ck.save(2, {"w": np.ones(3, np.float32)}, {"step": 2})
  assert e.value.errno == errno.ENOENT and not ckdir.exists()
  ck.close()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("chattr"),
                    reason="an unwritable directory for root: chattr +i (root only)")
def test_checkpoints_directory_made_unwritable(tmp_path):
  """A checkpoints directory that became unwritable under a running training: the next save stops
  at once with one OSError naming the directory and the cause (Orbax itself would wait minutes for
  its step directory, then raise a TimeoutError)."""
  ckdir = tmp_path / "ck"
  ck = Checkpointer(str(ckdir))
  ck.save(1, {"w": np.ones(3, np.float32)}, {"step": 1})
  ck.wait()
  subprocess.run(["chattr", "+i", str(ckdir)], check=True)
  try:
    with pytest.raises(OSError, match=f"writing checkpoint step 2 to {ckdir} failed: Operation "
                       "not permitted") as e:
      ck.save(2, {"w": np.ones(3, np.float32)}, {"step": 2})
    assert e.value.errno == errno.EPERM
  finally:
    subprocess.run(["chattr", "-i", str(ckdir)], check=True)
  ck.close()
  assert sorted(os.listdir(ckdir)) == ["1"]
