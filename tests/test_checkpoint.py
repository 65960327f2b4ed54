"""Checkpointer: refuses retention settings that would lose checkpoints, never deletes the newest
one, and moves an unreadable newest checkpoint aside (kept) so the resumed run can write that step
again."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from farmer_jax.runs import CHECKPOINTS, RunDir
from farmer_jax.train.checkpoint import Checkpointer


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
  state, meta, step = ck.restore_latest(tr.abstract_state, tr.state_sh)
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
  state, meta, step = ck.restore_latest(tr.abstract_state, tr.state_sh, say=said.append)
  assert step == 200 and meta["step"] == 200
  # moved aside, byte-for-byte, to a name orbax does not list as a step; gone from the step list
  assert not (ckdir / "400").exists()
  assert snapshot(ckdir / "400.unreadable") == bad
  assert ck.steps() == [200]
  assert any(
      f"{ckdir / '400'}" in m and f"aside to {ckdir / '400.unreadable'}" in m for m in said), said
  assert any("restored checkpoint step 200" in m for m in said), said
  # the resumed run reaches step 400 again: saving it must work (was: StepAlreadyExistsError)
  ck.save(400, state400, dict(meta, step=400, data_step=400))
  ck.close()
  ck = Checkpointer(str(ckdir))
  assert ck.steps() == [200, 400]
  state, meta, step = ck.restore_latest(tr.abstract_state, tr.state_sh, say=said.append)
  assert step == 400 and meta["step"] == 400
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(state400))
  ck.close()
  # a second corruption of the same step keeps the first one's remains too
  truncate_tree(ckdir / "400" / "state")
  ck = Checkpointer(str(ckdir))
  assert ck.restore_latest(tr.abstract_state, tr.state_sh, say=said.append)[2] == 200
  assert (ckdir / "400.unreadable").is_dir() and (
      ckdir / "400.unreadable-2").is_dir() and ck.steps() == [200]


def test_checkpoints_of_another_config_are_refused_and_left_alone(trained_run, tmp_path):
  """Every step failing means 'wrong config', not 'corrupt': nothing may be moved or changed."""
  workdir, _, tr = trained_run
  wd = tmp_path / "run"
  shutil.copytree(workdir, wd)
  before = snapshot(wd)
  other = dict(tr.abstract_state)
  other["params"] = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape + (2,), a.dtype),
                                 other["params"])
  with pytest.raises(
      ValueError,
      match="could be restored for this config: they were written by a different config"):
    Checkpointer(RunDir(wd).checkpoints).restore_latest(other, tr.state_sh, say=lambda m: None)
  assert snapshot(wd) == before
