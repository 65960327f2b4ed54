"""A workdir in a bucket (gs://...) stays a URL everywhere: run-folder paths, the lock, metrics,
config.json, the sample grid, and the directory handed to Orbax; a training run checkpoints into
it and resumes from it. The bucket is a local stand-in (tests/fake_gcs.py)."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_gcs import fake_gcs  # noqa: E402

from farmer_jax import configlib  # noqa: E402
from farmer_jax.artifacts import storage  # noqa: E402
from farmer_jax.artifacts.runs import RunDir  # noqa: E402

URL = "gs://fake-bucket/runs/a"


def test_url_paths_are_never_rewritten():
  run = RunDir(URL)
  assert run.checkpoints == URL + "/checkpoints" and run.lock == URL + "/.farmer_jax.lock"
  assert run.config == URL + "/config.json"
  assert storage.absolute(URL) == URL and storage.parent(URL + "/x/") == URL
  assert storage.join("gs://b", "c", "d") == "gs://b/c/d"
  assert storage.absolute("rel") == os.path.abspath("rel")


@pytest.mark.slow  # ~25-35 s on 2 cores; CI runs it
def test_training_run_checkpoints_into_and_resumes_from_a_bucket(tmp_path, monkeypatch):
  from farmer_jax.sampling.images import save_grid
  from farmer_jax.config.parse import parse
  from farmer_jax.train.trainer import start
  root, cwd = tmp_path / "bucket", tmp_path / "cwd"
  root.mkdir()
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  c = configlib.load("quickstart:tiny")
  c.train.update(steps=4, log_every=2, warmup_steps=1)
  bucket = root / "fake-bucket" / "runs" / "a"
  with fake_gcs(str(root)) as orbax_dirs:
    tr = start(parse(c, URL), URL, quiet=True)
    assert (bucket / ".farmer_jax.lock").exists()     # the lock is in the bucket
    tr.fit(stop_at=2)
    tr.close()
    assert not (bucket / ".farmer_jax.lock").exists()
    tr = start(parse(c, URL), URL, quiet=True)
    assert tr.restored_step == 2
    tr.fit()
    tr.close()
    save_grid(np.zeros((1, 2, 4, 4, 1), np.uint8), RunDir(URL).samples)
  assert set(orbax_dirs) == {URL + "/checkpoints"}
  assert sorted(os.listdir(bucket / "checkpoints")) == ["2", "4"]
  assert {"config.json", "metrics.jsonl", "tb", "samples.png"} <= set(os.listdir(bucket))
  rows = [json.loads(line) for line in (bucket / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [2, 4]
  assert os.listdir(bucket / "tb")            # TensorBoard events were copied to the bucket
  assert os.listdir(cwd) == []                # nothing landed in a local "gs:" directory
