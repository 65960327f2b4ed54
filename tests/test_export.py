"""Export (params only, atomic, refuses overwrite, bf16 cast) and the sample command's engine and CLI."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from farmer_jax.sampling.export import ExportError, export_model, load_model
from farmer_jax.sampling.generate import generate, parse_classes, write_outputs
from farmer_jax.sampling.guidance import ResamplingCFG
from farmer_jax.sampling.sampler import SamplerConfig


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
  workdir, _, tr = trained_run
  out = tmp_path_factory.mktemp("exports") / "model"
  meta = export_model(str(workdir), str(out))
  return workdir, out, meta, tr


def test_export_roundtrip(exported):
  workdir, out, meta, tr = exported
  assert meta["step"] == 200 and meta["params"] == "raw" and meta["dtype"] == "float32"
  assert sorted(os.listdir(out)) == ["config.json", "export.json", "params"]
  mcfg, params, config, meta2 = load_model(str(out))
  assert mcfg == tr.mcfg and meta2 == meta
  jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(tr.state["params"]))


def test_export_refuses_overwrite_and_casts(exported, tmp_path):
  workdir, out, _, tr = exported
  with pytest.raises(ExportError, match="already exists; pass --overwrite"):
    export_model(str(workdir), str(out))
  bf = tmp_path / "bf16"
  export_model(str(workdir), str(bf), dtype="bfloat16")
  _, params, _, meta = load_model(str(bf))
  assert meta["dtype"] == "bfloat16"
  assert all(a.dtype == np.dtype("bfloat16") for a in jax.tree.leaves(params))
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p], "no temporary directory may be left behind"
  untrained = tmp_path / "untrained"
  untrained.mkdir()
  with pytest.raises(ExportError, match="has no config.json"):
    export_model(str(untrained), str(tmp_path / "x"))
  (untrained / "config.json").write_text((workdir / "config.json").read_text())
  with pytest.raises(ExportError, match="no checkpoints/ directory"):
    export_model(str(untrained), str(tmp_path / "x"))
  assert not (tmp_path / "x").exists()


def test_incomplete_or_corrupt_exports_are_rejected(exported, tmp_path):
  _, out, _, _ = exported
  with pytest.raises(ExportError, match="does not exist"):
    load_model(str(tmp_path / "nope"))
  partial = tmp_path / "partial"
  partial.mkdir()
  (partial / "config.json").write_text((out / "config.json").read_text())
  with pytest.raises(ExportError, match="missing export.json"):
    load_model(str(partial))
  (partial / "export.json").write_text("{not json")
  (partial / "params").mkdir()
  with pytest.raises(ExportError, match="corrupt metadata"):
    load_model(str(partial))
  (partial / "export.json").write_text((out / "export.json").read_text())
  with pytest.raises(ExportError, match="params could not be restored"):
    load_model(str(partial))


def test_generate_is_seeded_and_batch_size_independent(exported, tmp_path):
  _, out, _, _ = exported
  mcfg, params, _, _ = load_model(str(out))
  s = SamplerConfig(guidance="resampling", cfg=ResamplingCFG(w=1.0), redundant_candidates=16)
  a, la, st = generate(mcfg, params, [3, 7], 3, s, seed=5, batch_size=6, progress=False, return_stats=True)
  assert st["ess_informative"].shape == (6,) and st["ess_redundant"].shape == (6,)
  assert np.all((st["ess_informative"] >= 1) & (st["ess_informative"] <= 10))        # s_c + s_u = 10
  assert np.all((st["ess_redundant"] >= 1) & (st["ess_redundant"] <= 32))           # 2 * 16
  b, lb = generate(mcfg, params, [3, 7], 3, s, seed=5, batch_size=4, progress=False)
  assert a.shape == (2, 3, 32, 32, 1) and a.dtype == np.uint8
  np.testing.assert_array_equal(la, [[3, 3, 3], [7, 7, 7]])
  # uint8 images from different batch sizes: equal up to rare one-level rounding flips at bin edges
  assert np.mean(a == b) > 0.999
  c, _ = generate(mcfg, params, [3, 7], 3, s, seed=6, batch_size=6, progress=False)
  assert np.mean(a != c) > 0.01
  write_outputs(a, la, str(tmp_path / "g.png"), str(tmp_path / "g.npz"), st)
  z = np.load(tmp_path / "g.npz")
  assert z["images"].shape == (6, 32, 32, 1) and list(z["labels"]) == [3, 3, 3, 7, 7, 7]
  np.testing.assert_array_equal(z["ess_redundant"], st["ess_redundant"])


def test_parse_classes():
  assert parse_classes("all", 10) == list(range(10))
  assert parse_classes("2,null", 10) == [2, 10]
  with pytest.raises(ValueError, match="class id 12 is out of range"):
    parse_classes("1,12", 10)
  with pytest.raises(ValueError, match="not an integer"):
    parse_classes("cat", 10)


def test_sample_cli_errors(exported, tmp_path):
  _, out, _, _ = exported
  run = lambda *a: subprocess.run([sys.executable, "-m", "farmer_jax", "sample", *a], capture_output=True,
                                  text=True, timeout=300)
  r = run(f"--model={out}", "--classes=11", f"--out={tmp_path}/x.png")
  assert r.returncode == 2 and "class id 11 is out of range" in r.stderr
  r = run(f"--model={out}", "--cfg=-1", f"--out={tmp_path}/x.png")
  assert r.returncode == 2 and "cfg=-1" in r.stderr
  r = run(f"--model={out}", "--sampler=t_sigma=0", f"--out={tmp_path}/x.png")
  assert r.returncode == 2 and "t_sigma=0" in r.stderr
  r = run(f"--model={tmp_path}/missing", f"--out={tmp_path}/x.png")
  assert r.returncode == 2 and "does not exist" in r.stderr
  assert not (tmp_path / "x.png").exists()
