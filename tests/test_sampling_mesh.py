"""`farmer_jax sample` and `fid` across a mesh and across processes draw the same samples as on one
device: sample j's key is fold_in(key(seed), j) whatever the device count, the process count, the
batch and the params' sharding (FSDP over 4 devices here). Each runs as the CLI in subprocesses
with fake CPU devices; the 2-process runs join over jax.distributed on 127.0.0.1."""

import json
import os
import shutil
import socket
import subprocess
import sys

import chex
import numpy as np
import pytest

from conftest import fake_devices_env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cli(args, devices, processes=1, cwd=None):
  """Runs ``farmer_jax ARGS`` as ``processes`` processes of ``devices`` fake CPU devices each."""
  base = [sys.executable, "-m", "farmer_jax"] + args
  if processes > 1:
    addr = f"127.0.0.1:{_free_port()}"
    cmds = [base + ["--distributed=explicit", f"--coordinator_address={addr}",
                    f"--num_processes={processes}", f"--process_id={i}"]
            for i in range(processes)]
  else:
    cmds = [base]
  procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=fake_devices_env(devices), cwd=cwd) for c in cmds]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, out + err[-3000:]
  return outs[0][0]


@pytest.fixture(scope="module")
def sharded_export(exported, tmp_path_factory):
  """The session's export with its run's mesh made ('data', 2) x ('fsdp', 4) and every param
  FSDP-sharded over the 4 'fsdp' devices (on fewer devices the mesh falls back to data parallel)."""
  _, model, _, _ = exported
  out = tmp_path_factory.mktemp("sharded") / "model"
  shutil.copytree(model, out)
  with open(out / "config.json") as f:
    config = json.load(f)
  config["mesh"] = [["data", 2], ["fsdp", 4]]
  config["fsdp"]["min_params"] = 0
  with open(out / "config.json", "w") as f:
    json.dump(config, f)
  return out


@pytest.mark.slow   # 5 sampling runs, 7 processes: ~3 min
def test_samples_do_not_depend_on_devices_processes_or_batch(sharded_export, tmp_path):
  """The same uint8 samples at one sample per device, on 1 device, on 8 (params FSDP-sharded) and
  on 2 processes. Across per-device batch sizes XLA's CPU kernels may round differently: there
  the float differences may move a pixel to the next level, rarely (<= 1 level, <= 0.1%)."""
  common = ["sample", f"--model={sharded_export}", "--classes=0,3,7", "--num=5", "--cfg=2",
            "--seed=3"]
  exact = {"1 device, batch 1": (1, 1, ["--batch=1"]),
           "8 devices (data 2 x fsdp 4), batch 8": (8, 1, ["--batch=8"]),
           "2 processes x 4 devices, batch 8": (4, 2, ["--batch=8"])}
  rounding = {"1 device, batch 8": (1, 1, ["--batch=8"]),
              "8 devices, the default batch (64 per device)": (8, 1, [])}
  got = {}
  for i, (name, (devices, processes, extra)) in enumerate({**exact, **rounding}.items()):
    npz = tmp_path / f"s{i}.npz"
    out = _cli(common + extra + [f"--npz={npz}"], devices, processes)
    assert "15 samples" in out
    with np.load(npz) as z:   # the ADM evaluator's layout: uint8 images under arr_0
      got[name] = (z["arr_0"], z["labels"])
  first = next(iter(exact))
  images, labels = got[first]
  chex.assert_shape(images, (15, 32, 32, 1))
  chex.assert_type(images, np.uint8)
  assert list(labels) == [0] * 5 + [3] * 5 + [7] * 5
  assert len({im.tobytes() for im in images}) == 15   # 15 different samples
  for name, (im, lab) in got.items():
    assert np.array_equal(lab, labels), name
    d = np.abs(im.astype(int) - images)
    where = f"{name} vs {first}: {(d > 0).sum()} pixel(s) differ, by up to {d.max()}"
    if name in exact:
      assert np.array_equal(im, images), where
    else:
      assert d.max() <= 1 and (d > 0).mean() <= 1e-3, where


@pytest.mark.slow   # 2 fid runs (the MNIST CNN trains in each process): ~2 min
def test_fid_across_processes_gathers_the_same_features(sharded_export, tmp_path):
  """fid with 2 processes (each drawing its share of every batch, one sample per device, and
  computing its share's features) writes the features and scores of the 1-device run; the feature
  network sees other batches, so its outputs agree to float rounding."""
  results = {}
  for name, devices, processes, batch in (("one", 1, 1, 1), ("two", 4, 2, 8)):
    out = tmp_path / f"{name}.json"
    _cli(["fid", f"--model={sharded_export}", "--features=mnist", "--num=20", f"--batch={batch}",
          "--cfg=0", f"--out={out}", "--quiet"], devices, processes, cwd=tmp_path)
    with open(out) as f:
      result = json.load(f)
    chunks = sorted(c for c in os.listdir(result["dump"]) if c.startswith("chunk_"))
    pool = np.concatenate([np.load(os.path.join(result["dump"], c))["pool"] for c in chunks])
    results[name] = (result, pool, len(chunks))
  (one, pool1, chunks1), (two, pool2, chunks2) = results["one"], results["two"]
  assert (chunks1, chunks2) == (20, 3)   # batches of 1; of 8, 8 and 4
  assert pool1.shape == (20, pool1.shape[1]) and two["count"] == one["count"] == 20
  assert len({r.tobytes() for r in pool1}) == 20
  np.testing.assert_allclose(pool2, pool1, rtol=1e-4, atol=1e-5)
  assert two["fid"] == pytest.approx(one["fid"], rel=1e-4)
  assert two["class_consistency"] == one["class_consistency"]
