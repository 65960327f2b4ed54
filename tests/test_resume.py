"""Checkpoints: SIGKILL at seeded random points (KILL_SEED) then restart is bit-exact; SIGTERM saves
and exits cleanly; an unreadable newest checkpoint is skipped in favour of the previous one. Real
`farmer_jax train` subprocesses."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from farmer_jax import configlib
from farmer_jax.artifacts.runs import RunDir

STEPS, EVERY = 60, 10
KILL_SEED = 1234          # picks the kill points; fixed and printed so that a failure reproduces


def _cmd(workdir, steps=STEPS, extra=()):
  return [
      sys.executable, "-m", "farmer_jax", "train", "--config=quickstart:tiny",
      f"--workdir={workdir}", f"--config.train.steps={steps}", f"--config.train.ckpt_every={EVERY}",
      "--config.train.log_every=10", "--config.train.warmup_steps=5", "--quiet", *extra
  ]


def _steps(workdir):
  d = RunDir(workdir).checkpoints
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _wait_for_checkpoint(proc, workdir, step, timeout=300):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if any(s >= step for s in _steps(workdir)):
      return
    if proc.poll() is not None:
      raise AssertionError(f"training exited early: {proc.stderr.read()[-2000:]}")
    time.sleep(0.05)
  raise AssertionError("no checkpoint appeared in time")


def _final_state(workdir):
  step = max(_steps(workdir))
  with ocp.CheckpointManager(RunDir(workdir).checkpoints, item_names=("state", "meta")) as m:
    st = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  return step, jax.tree.leaves(st)


def _run(cmd):
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bit_exact(tmp_path):
  ref = tmp_path / "uninterrupted"
  _run(_cmd(ref))
  ref_step, ref_leaves = _final_state(str(ref))
  assert ref_step == STEPS
  kill_after = np.random.default_rng(KILL_SEED).choice(
      np.arange(EVERY, STEPS, EVERY), 2, replace=False)
  print(
      f"KILL_SEED={KILL_SEED}: SIGKILL after the first checkpoint at or past steps "
      f"{kill_after.tolist()}"
  )
  for k in kill_after:
    where = f"KILL_SEED={KILL_SEED}, killed after checkpoint >= {k}"
    wd = tmp_path / f"killed_after_{k}"
    p = subprocess.Popen(_cmd(wd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(p, str(wd), int(k))
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert max(_steps(str(wd))) < STEPS, f"{where}: killed too late to test anything"
    r = _run(_cmd(wd))
    step, leaves = _final_state(str(wd))
    assert step == STEPS, where
    assert len(leaves) == len(ref_leaves), where
    for i, (a, b) in enumerate(zip(ref_leaves, leaves)):
      np.testing.assert_array_equal(
          np.asarray(a), np.asarray(b), err_msg=f"{where}: state leaf {i} differs")
    assert "test bpd" in r.stdout, where
    rows = [json.loads(l) for l in open(RunDir(wd).metrics)]
    logged = [r["step"] for r in rows if "train/loss" in r]
    assert logged == list(range(10, STEPS + 1,
                                10)), f"{where}: metrics.jsonl steps {logged} (resume must trim)"
    # the end-of-training eval, logged once
    assert [r["step"] for r in rows if "eval/bpd" in r] == [STEPS], where


@pytest.mark.slow  # moved out of the default suite to keep it <= 10 min on 2 cores
def test_sigterm_saves_then_exits_and_corrupt_latest_falls_back(tmp_path):
  wd = tmp_path / "run"
  p = subprocess.Popen(
      _cmd(wd, steps=100_000), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_checkpoint(p, str(wd), 2 * EVERY)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=300)
  assert p.returncode == 0, err[-3000:]
  assert "preempted at step" in out
  run = RunDir(wd)
  assert not os.path.exists(run.samples) and not os.path.exists(run.summary), \
      "SIGTERM skips eval + sampling"
  assert not os.path.exists(run.lock), "the workdir lock is released on exit"
  steps = _steps(str(wd))
  assert len(steps) == 2 and steps[-1] >= 2 * EVERY and steps[-1] < 100_000
  # Corrupt every data file of the newest checkpoint: the next start must fall back to the previous
  # one.
  newest = os.path.join(run.checkpoints, str(steps[-1]), "state")
  for root, _, files in os.walk(newest):
    for f in files:
      path = os.path.join(root, f)
      with open(path, "r+b") as fh:
        fh.truncate(max(os.path.getsize(path) // 3, 1))
  from farmer_jax.config.parse import parse
  from farmer_jax.train.trainer import start
  c = configlib.load("quickstart:tiny")
  c.train.update(steps=100_000, ckpt_every=EVERY, log_every=10, warmup_steps=5)
  tr = start(parse(c, str(wd)), str(wd), quiet=True)
  tr.close()
  assert tr.restored_step == steps[-2]
  assert int(tr.state["step"]) == steps[-2]
  moved = os.path.join(run.checkpoints, f"{steps[-1]}.unreadable")
  assert os.path.isdir(moved), "moved aside, kept"
  assert _steps(str(wd)) == steps[:-1]


def _sigterm_handler_installed(pid):
  """Linux: bit 15 of /proc/<pid>/status SigCgt says a SIGTERM handler is installed."""
  try:
    with open(f"/proc/{pid}/status") as f:
      caught = next(int(l.split()[1], 16) for l in f if l.startswith("SigCgt:"))
  except (OSError, StopIteration):
    return False
  return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.skipif(
    not os.path.exists("/proc/self/status"), reason="needs /proc to see when the handler is in")
def test_sigterm_during_startup_exits_cleanly(tmp_path):
  """SIGTERM while the command is still importing / compiling: exit 0 with one line, nothing
  written."""
  wd = tmp_path / "run"
  p = subprocess.Popen(_cmd(wd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  t0 = time.time()
  while not _sigterm_handler_installed(p.pid) and p.poll() is None and time.time() - t0 < 60:
    time.sleep(0.01)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=300)
  assert p.returncode == 0, err[-3000:]
  assert "start-up" in (out + err)
  assert "Traceback" not in err
  assert not os.path.exists(RunDir(wd).checkpoints)


def _sigterm_at(wd, when, cmd=None):
  """Runs ``cmd`` (default: a long `farmer_jax train`; compilations logged) and sends SIGTERM
  ``when(seconds since the handler went in, stderr lines so far)`` says True; returns (exit code,
  stdout, stderr)."""
  env = dict(os.environ, JAX_LOG_COMPILES="1")
  p = subprocess.Popen(cmd or _cmd(wd, steps=100_000), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, env=env)
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(p.stderr), daemon=True)
  reader.start()
  t0 = time.time()
  while not _sigterm_handler_installed(p.pid) and p.poll() is None and time.time() - t0 < 60:
    time.sleep(0.01)
  t_in = time.time()
  while p.poll() is None and not when(time.time() - t_in, lines) and time.time() - t0 < 300:
    time.sleep(0.01)
  p.send_signal(signal.SIGTERM)
  out = p.stdout.read()
  p.wait(timeout=300)
  reader.join(timeout=10)
  return p.returncode, out, "".join(lines)


def _assert_clean_preemption(wd, code, out, err, where):
  assert code == 0, f"{where}: exit {code}\n{err[-3000:]}"
  assert "Fatal Python error" not in err and "Traceback" not in err, where
  assert "preempted" in out, f"{where}: no one-line message in {out!r}"
  assert not os.path.exists(RunDir(wd).lock), f"{where}: the workdir lock is released"
  if "during start-up" in out:
    assert not os.path.exists(wd), f"{where}: nothing written during start-up"


def test_sigterm_during_compilation_exits_0(tmp_path):
  """SIGTERM while XLA compiles (the state's initialisation, on a thread of XLA's): exit 0 with
  one line and nothing written, without interpreter shutdown: that, while the thread still
  compiles, is a segfault (exit 139)."""
  wd = str(tmp_path / "run")
  lowered = []   # when the init function went to XLA's compiler (the line right before)

  def compiling(t, lines):
    if not lowered and any("MLIR module conversion jit(<lambda>)" in l for l in lines):
      lowered.append(t)
    return bool(lowered) and t > lowered[0] + 0.05

  code, out, err = _sigterm_at(wd, compiling)
  assert lowered, "SIGTERM during the compilation"
  _assert_clean_preemption(wd, code, out, err, "during compilation")
  assert "preempted during start-up" in out


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.5, 1.5, 3.0, 5.0, 8.0, 12.0, "first steps"])
def test_sigterm_at_any_moment_exits_0(tmp_path, delay):
  """SIGTERM at delays (after the handler is in) spanning config, data, model, compilation and
  the first steps (1 s after the train step's compilation): always exit 0 with the one-line
  message, the lock released."""
  wd = str(tmp_path / "run")
  if delay == "first steps":
    done = []

    def when(t, lines):
      if not done and any("Finished XLA compilation of jit(step)" in l for l in lines):
        done.append(t)
      return bool(done) and t > done[0] + 1.0
  else:
    when = lambda t, _: t >= delay
  code, out, err = _sigterm_at(wd, when)
  _assert_clean_preemption(wd, code, out, err, f"SIGTERM {delay} s after the handler went in")
  if delay == "first steps":
    assert "checkpoint saved" in out and _steps(wd), out


def _distill_cmd(teacher, workdir):
  return [sys.executable, "-m", "farmer_jax", "distill",
          "--config=quickstart:tiny,distill=1", f"--teacher={teacher}",
          f"--workdir={workdir}", "--config.train.steps=100000", "--config.train.log_every=10",
          "--quiet"]


@pytest.mark.parametrize("when",
                         ["compilation", pytest.param("first steps", marks=pytest.mark.slow)])
def test_distill_sigterm_exits_0(trained_run, tmp_path, when):
  """`farmer_jax distill` keeps the same contract as train: SIGTERM during start-up (here while
  the student's state compiles) exits 0 with one line and nothing written; during training it
  saves a checkpoint and exits 0."""
  wd = str(tmp_path / "student")
  seen = []
  name = "jit(<lambda>)" if when == "compilation" else "jit(step)"

  def at(t, lines):
    if not seen and any((f"MLIR module conversion {name}" if when == "compilation"
                         else f"Finished XLA compilation of {name}") in l for l in lines):
      seen.append(t)
    return bool(seen) and t > seen[0] + (0.05 if when == "compilation" else 1.0)

  code, out, err = _sigterm_at(wd, at, _distill_cmd(trained_run[0], wd))
  assert seen, f"SIGTERM during {when}"
  _assert_clean_preemption(wd, code, out, err, f"distill, {when}")
  if when == "compilation":
    assert "preempted during start-up" in out
  else:
    assert "checkpoint saved" in out and _steps(wd), out
