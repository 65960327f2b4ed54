"""benchmarks/ablation.py --quick: every variant of the paper's ablations trains, is scored under
each of its sampler settings and lands in the table; a finished run is read back, and a workdir
trained with other settings is refused."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "ablation.py")


def _run(out, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, SCRIPT, "--quick", f"--out={out}", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=1500)


@pytest.mark.slow
def test_ablation_quick_produces_the_table(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  from ablation import VARIANTS
  out = tmp_path / "abl"
  r = _run(out)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  md = (out / "ablation.md").read_text()
  rows = {line.split("|")[1].strip(): line for line in md.splitlines()
          if line.startswith("| ") and line.split("|")[1].strip() in VARIANTS}
  assert set(rows) == set(VARIANTS), md
  res = json.loads((out / "ablation.json").read_text())["results"]
  for name, recs in res.items():
    (rec,) = recs
    assert np.isfinite(rec["test_bpd"]) and rec["train_seconds"] > 0
    scores = rec["scores"]
    assert "cfg0" in scores and all(np.isfinite(v["mnist_fid"]) for v in scores.values())
    if name != "tarflow":     # the AR prior's resampling CFG (TARFlow: quick's AF is unconditional)
      assert rec["columns"]["resampling"] in scores, scores.keys()
  assert "naive_cfg3" in res["farmer"][0]["scores"]                # resampling vs naive CFG
  pools = {k: v for k, v in res["farmer"][0]["scores"].items() if "redundant_distinct" in v}
  assert set(pools) == {"resampling_cfg3_per_token16", "resampling_cfg3_shared64"}, pools
  # per-token pools: every z^R of an image is its own draw; one shared pool of 64 + 64: at most 64
  assert pools["resampling_cfg3_per_token16"]["redundant_distinct"] == 64
  assert 1 <= pools["resampling_cfg3_shared64"]["redundant_distinct"] <= 64
  assert "Redundant pool" in md

  summary = out / "farmer" / "seed0" / "summary.json"
  before = summary.stat().st_mtime_ns
  r = _run(out, "--runs", "farmer")                            # read back, not retrained
  assert r.returncode == 0, r.stderr[-3000:]
  assert summary.stat().st_mtime_ns == before

  other = tmp_path / "other"
  shutil.copytree(out / "farmer" / "seed0", other / "k1" / "seed0")   # FARMER's run as K = 1's
  r = _run(other, "--runs", "k1@0")
  assert r.returncode != 0 and "was trained with model.mixtures_informative=" in r.stderr, r.stderr
