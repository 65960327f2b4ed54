"""End-to-end training on the real quickstart data (reduced model), test bpd (class-conditional and
unconditional), non-finite handling, sampling."""

import io
import json
import os
import sys

import chex
import jax
import numpy as np
import pytest

from farmer_jax import configlib  # noqa: E402

from conftest import init_farmer, variant  # noqa: E402
from farmer_jax.conventions import bits_per_dim  # noqa: E402
from farmer_jax.data.mnist import load_mnist5k  # noqa: E402
from farmer_jax.eval.likelihood import (dequantize_examples, evaluate_bpd,  # noqa: E402
                                        make_eval_step)
from farmer_jax.artifacts.runs import RunDir  # noqa: E402
from farmer_jax.train.report import format_test_bpd  # noqa: E402
from farmer_jax.config.parse import parse  # noqa: E402
from farmer_jax.train.trainer import start, train_and_report  # noqa: E402


def test_mnist5k_split_is_fixed_and_disjoint():
  tr, ltr = load_mnist5k("train")
  te, lte = load_mnist5k("test")
  chex.assert_shape([tr, te], [(4500, 32, 32, 1), (500, 32, 32, 1)])
  chex.assert_type([tr, te], np.uint8)
  np.testing.assert_array_equal(np.bincount(lte), 50)
  assert tr[:, :2].max() == 0 and tr[:, 2:30,
                                     2:30].max() == 255  # 2-pixel zero padding around 28x28
  flat = {x.tobytes() for x in tr}
  assert sum(x.tobytes() in flat for x in te) <= 2  # MNIST has a few exact duplicates
  te2, _ = load_mnist5k("test")
  np.testing.assert_array_equal(te, te2)


def test_quickstart_tiny_trains_and_loss_goes_down(trained_run):
  tmp_path, summary, _ = trained_run
  run = RunDir(tmp_path)
  c = configlib.load("quickstart:tiny")
  all_rows = [json.loads(l) for l in open(run.metrics)]
  rows = [r for r in all_rows if "train/loss" in r]
  assert [r["step"] for r in rows] == [50, 100, 150, 200]
  for k in ("loss", "ar_nll", "logdet_per_dim", "noise_sigma", "lr", "grad_norm", "steps_per_s"):
    assert np.isfinite(rows[-1][f"train/{k}"]), k
  # the training loss is the NLL of Gaussian-noised data in nats/dim, never reported as an 8-bit bpd
  assert not [k for r in rows for k in r if "bpd" in k], rows[-1]
  # the end-of-training test bits/dim goes to the metrics as eval/* (config.eval.every = 0: once)
  (ev,) = [r for r in all_rows if "train/loss" not in r]
  assert ev["step"] == 200 and ev["eval/bpd"] == summary["test_bpd"]
  assert ev["eval/bpd_uncond"] == summary["test_bpd_uncond"]
  terms = summary["test_terms_bpd"]
  assert sum(terms.values()) == pytest.approx(summary["test_bpd"], rel=1e-6)
  assert ev["eval/bpd_af_logdet"] == terms["af_logdet"]
  first, last = rows[0]["train/loss"], rows[-1]["train/loss"]
  assert last < first - 0.5, (first, last)
  # sigma follows the cosine schedule 0.1 -> 0.005
  assert rows[0]["train/noise_sigma"] > rows[-1]["train/noise_sigma"] >= 0.005
  assert np.isfinite(summary["test_bpd"]) and summary["test_bpd"] < 8.0
  # test bpd is reported class-conditional (-log p(x|y)) and unconditional (-log p(x|null)), on the
  # same noise
  on_disk = json.load(open(run.summary))
  for k in ("test_bpd", "test_bpd_uncond", "test_nats_per_dim", "test_nats_per_dim_uncond"):
    assert np.isfinite(on_disk[k]) and on_disk[k] == summary[k], k
  assert on_disk["class_conditional"] and on_disk["test_count"] == 500
  # the null label changes the likelihood: after 200 steps by ~1e-4 bits/dim (9e-5 measured on an
  # AVX2 machine), far above the float32 rounding of a 500-image mean (< 1e-6)
  assert summary["test_bpd_uncond"] < 8.0 and abs(summary["test_bpd"] -
                                                  summary["test_bpd_uncond"]) > 1e-5
  for sfx in ("", "_uncond"):
    assert summary[f"test_bpd{sfx}"] == pytest.approx(
        bits_per_dim(summary[f"test_nats_per_dim{sfx}"]))
  assert format_test_bpd(summary) == (f"test bpd: {summary['test_bpd']:.4f} (class-conditional), "
                                      f"{summary['test_bpd_uncond']:.4f} (unconditional)")
  assert os.path.getsize(run.samples) > 0 and summary["samples"] == run.samples
  assert os.path.isdir(os.path.join(run.checkpoints, "200"))
  assert os.path.isdir(run.tensorboard)
  # Re-running on the finished workdir resumes from its checkpoint: no further training, identical
  # test bpd.
  again, tr2 = train_and_report(parse(c, str(tmp_path)), str(tmp_path), quiet=True)
  assert tr2.restored_step == 200 and again["steps"] == 200
  assert again["test_bpd"] == summary["test_bpd"] and again["test_bpd_uncond"] == summary[
      "test_bpd_uncond"]
  assert len(open(run.metrics).readlines()) == len(all_rows)   # the final eval logged once


def test_run_and_export_folder_names_are_a_file_format():
  """The names artifacts/runs.py spells are a file format: runs and exports on disk are found by
  them."""
  from farmer_jax.artifacts import runs
  assert (runs.CONFIG, runs.CHECKPOINTS, runs.METRICS, runs.TENSORBOARD, runs.SAMPLES, runs.SUMMARY,
          runs.LOCK) == ("config.json", "checkpoints", "metrics.jsonl", "tb", "samples.png",
                         "summary.json", ".farmer_jax.lock")
  # (an export may also carry the distilled student and a converted TARFlow's latent variance,
  # both optional: older exports stay loadable)
  assert sorted(runs.EXPORT_ENTRIES) == ["config.json", "export.json", "latent_var.npy", "params",
                                         "student"]
  assert (runs.EXPORT_META, runs.EXPORT_PARAMS, runs.EXPORT_STUDENT) == ("export.json", "params",
                                                                         "student")


def test_eval_step_conditional_and_unconditional_share_the_noise(trained_run):
  """The one jitted eval step equals two separate forward passes (true labels; null label) on the
  same uniformly dequantized images (per-example keys from the split index), and hands the mask
  back for the host to drop padding rows."""
  _, _, tr = trained_run
  model, params, mcfg = tr.model, tr.eval_params(), tr.mcfg
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 1), dtype=np.uint8)
  labels = np.array([3, 7, 0, 5], np.int32)
  mask = np.array([True, True, True, False])
  r = jax.device_get(make_eval_step(model)(params, images, labels, mask, 10, 1, 11))
  x = dequantize_examples(11, np.arange(10, 14), 1, images)
  apply = jax.jit(lambda x, y: model.apply({"params": params}, x, y)["log_prob"])
  lp_c = np.asarray(apply(x, labels))
  lp_u = np.asarray(apply(x, np.full(4, mcfg.null_class, np.int32)))
  np.testing.assert_array_equal(r["mask"], mask)
  np.testing.assert_allclose(r["log_prob"], lp_c, rtol=1e-5)
  np.testing.assert_allclose(r["log_prob_uncond"], lp_u, rtol=1e-5)
  np.testing.assert_allclose(r["log_prob"], r["log_prob_i"] + r["log_prob_r"] + r["logdet"],
                             rtol=1e-5)
  assert np.abs(r["log_prob"] - r["log_prob_uncond"]).max() > 1e-3
  # another draw index, other noise
  r2 = jax.device_get(make_eval_step(model)(params, images, labels, mask, 10, 0, 11))
  assert np.all(r2["log_prob"] != r["log_prob"])


def test_unconditional_model_reports_one_bpd_under_both_keys():
  model, params = init_farmer(
      variant(num_classes=0, image_size=4, flow_blocks=1), scale=0.0)  # small: compile time
  images = np.random.default_rng(1).integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)
  res = evaluate_bpd(
      model, params, images, np.zeros(5, np.int32), batch_size=4)  # 2 batches, the last padded
  assert res["count"] == 5 and np.isfinite(res["bpd"])
  assert res["bpd"] == res["bpd_uncond"] and res["nats_per_dim"] == res["nats_per_dim_uncond"]


def test_resume_refuses_a_changed_model_setting_shapes_cannot_see(trained_run):
  """The AR order (or the scale function) changes no param shape: resuming the finished run with
  another value must be refused with the diff, not silently restore params that now mean something
  else."""
  from farmer_jax.errors import ConfigError
  workdir, _, _ = trained_run
  c = configlib.load("quickstart:tiny")
  c.model.ar_order = "same"
  c.model.scale_fn = "softplus"
  with pytest.raises(
      ConfigError,
      match=r"model.ar_order: 'alternate' -> 'same'; model.scale_fn: 'squareplus' -> "):
    start(parse(c, str(workdir)), str(workdir), quiet=True)


def test_nonfinite_loss_stops_before_saving(tmp_path):
  c = configlib.load("quickstart:tiny")
  c.train.update(lr=1e30, min_lr=1e29, warmup_steps=0, grad_clip=0.0, steps=4, log_every=2)
  tr = start(parse(c, str(tmp_path)), str(tmp_path), quiet=True)
  with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step"):
    tr.fit()
  assert not (tmp_path / "checkpoints").exists()
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(tr.state["params"])), \
      "a non-finite step must not be applied"


@pytest.mark.slow  # a trainer's compile: > 10 s on 2 cores
def test_sigterm_on_a_log_step_logs_that_row(tmp_path):
  """A preemption at a log step writes that step's metrics row before stopping: the resumed run
  starts there and logs only later steps, so the row would be missing for good."""
  c = configlib.load("quickstart:tiny")
  c.train.update(steps=100, log_every=2, warmup_steps=1)
  tr = start(parse(c, str(tmp_path)), str(tmp_path), quiet=True)
  step = tr.train_step

  def step_then_sigterm_at_4(state, *args):
    state, m = step(state, *args)
    if int(state["step"]) == 4:
      tr.preemption.stop.set()   # what the SIGTERM handler does
    return state, m

  tr.train_step = step_then_sigterm_at_4
  try:
    tr.fit()
  finally:
    tr.close()
  assert tr.preempted and tr.preempt_saved and int(tr.state["step"]) == 4
  with open(RunDir(str(tmp_path)).metrics) as f:
    assert [r["step"] for r in map(json.loads, f) if "train/loss" in r] == [2, 4]


@pytest.mark.slow  # moved out of the default suite to keep it <= 10 min on 2 cores
def test_step_with_nonfinite_updated_params_is_not_applied(tiny):
  """Loss and gradient finite, but the update makes the params non-finite (what lr=inf does): the
  step must not be applied and bad_step records it, so nothing non-finite can be checkpointed."""
  import jax.numpy as jnp
  import optax
  from farmer_jax.config.schema import TrainConfig
  from farmer_jax.model import Farmer
  from farmer_jax.train.state import new_state
  from farmer_jax.train.step import make_train_step
  cfg, _, params = tiny
  c = configlib.load("quickstart:tiny")
  tx = optax.chain(optax.scale_by_adam(), optax.scale(-jnp.inf))
  t = TrainConfig.from_section(c.train)
  step = jax.jit(make_train_step(Farmer(cfg), cfg, t, tx, lambda s: 0.0))
  new, m = step(new_state(params, tx), _tiny_batch(cfg), jax.random.key(0))
  assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
  assert int(new["bad_step"]) == 0 and int(new["step"]) == 1
  chex.assert_trees_all_equal(new["params"], params)


def _tiny_batch(cfg):
  rng = np.random.default_rng(0)
  return {"image": rng.integers(0, 256, (4, cfg.image_size, cfg.image_size, 1), dtype=np.uint8),
          "label": np.array([0, 1, 2, 0], np.int32)}


@pytest.mark.slow  # moved out of the default suite to keep it <= 10 min on 2 cores
def test_ema_follows_the_applied_params(tiny):
  """With train.ema_decay = d the step keeps ema <- d * ema + (1 - d) * params (the new params)."""
  import dataclasses
  import optax
  from farmer_jax.config.schema import TrainConfig
  from farmer_jax.model import Farmer
  from farmer_jax.train.state import new_state
  from farmer_jax.train.step import make_train_step
  cfg, _, params = tiny
  d = 0.9
  t = dataclasses.replace(TrainConfig.from_section(configlib.load("quickstart:tiny").train),
                          ema_decay=d)
  tx = optax.sgd(0.1)
  step = jax.jit(make_train_step(Farmer(cfg), cfg, t, tx, lambda s: 0.1))
  state = new_state(params, tx, ema=True)
  state["ema"] = jax.tree.map(lambda a: a + 1.0, params)         # an EMA that is not the params
  new, _ = step(state, _tiny_batch(cfg), jax.random.key(0))
  assert int(new["bad_step"]) == -1
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       new["params"], params)
  assert max(jax.tree.leaves(moved)) > 1e-4                        # the params did move
  expect = jax.tree.map(lambda e, p: d * np.asarray(e) + (1 - d) * np.asarray(p), state["ema"],
                        new["params"])
  chex.assert_trees_all_close(new["ema"], expect, rtol=1e-6, atol=1e-7)


def test_workdir_lock(tmp_path):
  """A live holder (same host, live pid) is refused with its pid and host; a dead holder's lock is
  stale and taken over; release removes only our own lock."""
  import socket
  import subprocess
  from farmer_jax.artifacts.runs import LOCK
  from farmer_jax.artifacts.lock import WorkdirBusyError, WorkdirLock
  lock_path = tmp_path / LOCK
  lock_path.write_text(
      json.dumps({
          "pid": os.getppid(),
          "host": socket.gethostname(),
          "started": "earlier"
      }))
  with pytest.raises(WorkdirBusyError, match=rf"pid {os.getppid()} on host {socket.gethostname()}"):
    WorkdirLock(str(tmp_path)).acquire()
  assert json.loads(lock_path.read_text())["pid"] == os.getppid()  # the holder's lock is untouched
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  lock_path.write_text(
      json.dumps({
          "pid": dead.pid,
          "host": socket.gethostname(),
          "started": "earlier"
      }))
  said = []
  lk = WorkdirLock(str(tmp_path), say=said.append).acquire()
  assert json.loads(lock_path.read_text())["pid"] == os.getpid() and "stale" in said[0]
  lk.release()
  assert not lock_path.exists()
  # another host's lock is live until its heartbeat is older than stale_after
  lock_path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "earlier"}))
  with pytest.raises(WorkdirBusyError, match="host elsewhere"):
    WorkdirLock(str(tmp_path), stale_after=60).acquire()
  os.utime(lock_path, (0, 0))
  WorkdirLock(str(tmp_path), stale_after=60, say=said.append).acquire().release()
  assert "no heartbeat from elsewhere" in said[-1]


def test_trim_metrics_drops_rows_past_the_restored_step(tmp_path):
  from farmer_jax.artifacts.metrics import trim_metrics
  p = tmp_path / "metrics.jsonl"
  p.write_text("".join(json.dumps({
      "step": s,
      "train/loss": 1.0
  }) + "\n" for s in (10, 20, 30, 40)) + '{"step": 5')
  said = trim_metrics(str(p), 20)
  assert [json.loads(l)["step"] for l in p.read_text().splitlines()] == [10, 20]
  assert "2 row(s) past step 20" in said and "1 unusable line(s) (line 5: not JSON)" in said


def test_trim_metrics_keeps_the_good_rows_of_a_corrupt_file_and_says_what_it_dropped(tmp_path):
  """A non-UTF-8 line, JSON that is not an object, a row without an integer step: dropped and
  named; every good row before the restored step kept; has_row reads the same file."""
  from farmer_jax.artifacts.metrics import has_row, trim_metrics
  p = tmp_path / "metrics.jsonl"
  good = [json.dumps({"step": s, "train/loss": 1.0}).encode() for s in (10, 20, 30)]
  p.write_bytes(b"\n".join([good[0], b"\xff\xfe garbage", b"[1, 2]", b'"text"',
                            b'{"step": "20"}', b'{"step": true}', good[1], b"", good[2]]) + b"\n")
  assert has_row(str(p), 20, "train") and not has_row(str(p), 20, "eval")
  said = trim_metrics(str(p), 20)
  assert [json.loads(l)["step"] for l in p.read_text().splitlines()] == [10, 20]
  for part in ("line 2: not UTF-8", "line 3: a JSON list, not an object",
               "line 4: a JSON str, not an object", "line 5: no integer 'step'",
               "line 6: no integer 'step'", "1 row(s) past step 20"):
    assert part in said, part


def test_progress_without_a_terminal_is_one_line_per_logged_row(tmp_path, capsys):
  """On a log file (stderr not a terminal, as on pods and SLURM), even under quiet, training prints
  one plain line every train.log_every steps (and at the last step) with the loss, steps/s and
  the ETA, and no progress-bar frames (carriage returns)."""
  c = configlib.load("quickstart:tiny")
  c.train.update(steps=5, log_every=2, warmup_steps=1)
  capsys.readouterr()
  tr = start(parse(c, str(tmp_path)), str(tmp_path), quiet=True)
  try:
    assert not tr.bars    # pytest's captured stderr is no terminal
    history = tr.fit()
  finally:
    tr.close()
  out, err = capsys.readouterr()
  lines = [ln for ln in out.splitlines() if ln.startswith("step ")]
  assert [ln.split(":")[0] for ln in lines] == ["step 2/5", "step 4/5", "step 5/5"], out
  for ln, row in zip(lines, history):
    assert f"loss(nats/dim) {row['loss']:.3f}, sigma {row['noise_sigma']:.3f}, " in ln, ln
    assert f", {row['steps_per_s']:.3g} steps/s, ETA " in ln, ln
  assert lines[-1].endswith("ETA 00:00"), lines[-1]
  assert "\r" not in out + err and "train:" not in err


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_on_a_terminal_is_a_bar_and_no_lines():
  """The control: on a terminal the same rows update a tqdm bar (frames redrawn with carriage
  returns, the loss in its postfix) and print no lines; a closed or plain stream is no terminal."""
  from farmer_jax.train import trainer
  term, out = _Terminal(), io.StringIO()
  p = trainer._Progress(0, 4, lambda row: {"loss": f"{row['loss']:.2f}"}, bar=True, lines=False,
                        stream=term, out=out)
  for s in (1, 2):
    p.update()
    p.update()
    p.logged({"step": 2 * s, "loss": 1.5, "steps_per_s": 10.0})
  p.close()
  assert "\r" in term.getvalue() and "loss=1.50" in term.getvalue() and out.getvalue() == ""
  assert trainer._terminal(term) and not trainer._terminal(io.StringIO())
  closed = io.StringIO()
  closed.close()     # isatty() raises ValueError
  assert not trainer._terminal(closed) and not trainer._terminal(object())
  assert trainer.progress_line({"step": 100, "steps_per_s": 2.0}, {"mse": "0.1"}, 7300) == \
      "step 100/7300: mse 0.1, 2 steps/s, ETA 1:00:00"
