"""End-to-end training on the real quickstart data (reduced model), non-finite handling, sampling."""

import json
import os
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import quickstart  # noqa: E402

from farmer_jax.data.mnist import load_mnist5k  # noqa: E402
from farmer_jax.train.trainer import Trainer, train_and_report  # noqa: E402


def test_mnist5k_split_is_fixed_and_disjoint():
  tr, ltr = load_mnist5k("train")
  te, lte = load_mnist5k("test")
  assert tr.shape == (4500, 32, 32, 1) and te.shape == (500, 32, 32, 1) and tr.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(lte), 50)
  assert tr[:, :2].max() == 0 and tr[:, 2:30, 2:30].max() == 255     # 2-pixel zero padding around 28x28
  flat = {x.tobytes() for x in tr}
  assert sum(x.tobytes() in flat for x in te) <= 2                       # MNIST has a few exact duplicates
  te2, _ = load_mnist5k("test")
  np.testing.assert_array_equal(te, te2)


def test_quickstart_tiny_trains_and_loss_goes_down(trained_run):
  tmp_path, summary, _ = trained_run
  c = quickstart.get_config("tiny")
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [50, 100, 150, 200]
  for k in ("loss", "bpd", "ar_nll", "logdet_per_dim", "noise_sigma", "lr", "grad_norm", "steps_per_s"):
    assert np.isfinite(rows[-1][f"train/{k}"]), k
  first, last = rows[0]["train/loss"], rows[-1]["train/loss"]
  assert last < first - 0.5, (first, last)
  # sigma follows the cosine schedule 0.1 -> 0.005
  assert rows[0]["train/noise_sigma"] > rows[-1]["train/noise_sigma"] >= 0.005
  assert np.isfinite(summary["test_bpd"]) and summary["test_bpd"] < 8.0
  assert os.path.getsize(tmp_path / "samples.png") > 0
  assert os.path.isdir(tmp_path / "checkpoints" / "200")
  assert os.path.isdir(tmp_path / "tb")
  # Re-running on the finished workdir resumes from its checkpoint: no further training, identical test bpd.
  again, tr2 = train_and_report(c, str(tmp_path), quiet=True)
  assert tr2.restored_step == 200 and again["steps"] == 200
  assert again["test_bpd"] == summary["test_bpd"]
  assert len(open(tmp_path / "metrics.jsonl").readlines()) == len(rows)


def test_nonfinite_loss_stops_before_saving(tmp_path):
  c = quickstart.get_config("tiny")
  c.train.update(lr=1e30, min_lr=1e29, warmup_steps=0, grad_clip=0.0, steps=4, log_every=2)
  tr = Trainer(c, str(tmp_path), quiet=True)
  with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step"):
    tr.fit()
  assert not (tmp_path / "checkpoints").exists()
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(tr.state["params"])), \
      "a non-finite step must not be applied"
