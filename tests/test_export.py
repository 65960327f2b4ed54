"""Export (params only, atomic, refuses overwrite, bf16 cast) and the sample command's engine and
CLI."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from test_checkpoint import copy_run_with_new_step, snapshot, truncate_tree

from farmer_jax.artifacts import export as export_lib
from farmer_jax.artifacts.export import ExportError, export_model, load_model
from farmer_jax.artifacts.runs import CHECKPOINTS
from farmer_jax.config.schema import ResamplingCFG, SamplerConfig
from farmer_jax.errors import UserError
from farmer_jax.sampling.generate import generate, parse_classes, write_outputs


def test_export_roundtrip(exported):
  workdir, out, meta, tr = exported
  assert meta["step"] == 200 and meta["params"] == "raw" and meta["dtype"] == "float32"
  assert sorted(os.listdir(out)) == ["config.json", "export.json", "params"]
  mcfg, params, config, meta2 = load_model(str(out))
  assert mcfg == tr.mcfg and meta2 == meta
  chex.assert_trees_all_equal(params, jax.device_get(tr.state["params"]), strict=True)


def test_export_refuses_overwrite_and_casts(exported, tmp_path):
  workdir, out, _, tr = exported
  with pytest.raises(ExportError, match="already exists. Fix: pass --overwrite"):
    export_model(str(workdir), str(out))
  bf = tmp_path / "bf16"
  export_model(str(workdir), str(bf), dtype="bfloat16")
  _, params, _, meta = load_model(str(bf))
  assert meta["dtype"] == "bfloat16"
  chex.assert_type(jax.tree.leaves(params), "bfloat16")
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p
             ], "no temporary directory may be left behind"
  untrained = tmp_path / "untrained"
  untrained.mkdir()
  with pytest.raises(ExportError, match="has no config.json"):
    export_model(str(untrained), str(tmp_path / "x"))
  (untrained / "config.json").write_text((workdir / "config.json").read_text())
  with pytest.raises(ExportError, match="no checkpoints/ directory"):
    export_model(str(untrained), str(tmp_path / "x"))
  assert not (tmp_path / "x").exists()


def _leftovers(parent):
  return [p for p in os.listdir(parent) if ".tmp-" in p or ".old-" in p]


def test_overwrite_never_replaces_the_run_or_foreign_files(trained_run, tmp_path):
  """--overwrite onto the run itself, a folder holding it, a non-export folder, an export holding a
  user file, or a file: all refused with the path and the fix, and every byte is still there."""
  root = tmp_path / "runs"
  wd = root / "run"
  shutil.copytree(trained_run[0], wd)
  notes = tmp_path / "notes"
  notes.mkdir()
  (notes / "todo.txt").write_text("mine")
  afile = tmp_path / "model.bin"
  afile.write_bytes(b"not a directory")
  before = snapshot(tmp_path)
  inside = f"contains {wd}, which it is exported from"
  cases = [(wd, "is the training run itself"), (root, inside),
           (tmp_path, inside), (notes, "is not a farmer_jax export"),
           (wd / CHECKPOINTS, "is not a farmer_jax export"),
           (afile, "exists and is not a directory"),
           (afile / "sub", f"{afile} is a file, not a directory")]
  for out, msg in cases:
    with pytest.raises(ExportError, match="choose another --out") as e:
      export_model(str(wd), str(out), overwrite=True, say=pytest.fail)
    assert msg in str(e.value) and str(out) in str(e.value)
  with pytest.raises(
      ExportError,
      match="exists and is not a directory"):  # not "pass --overwrite": that won't help
    export_model(str(wd), str(afile))
  # an export that also holds a user's file is not replaced either
  model = tmp_path / "model"
  export_model(str(wd), str(model))
  (model / "samples.png").write_bytes(b"png")
  before = snapshot(tmp_path)
  with pytest.raises(ExportError, match=r"also holds files export did not write \(samples.png\)"):
    export_model(str(wd), str(model), overwrite=True)
  assert snapshot(tmp_path) == before


def test_overwrite_replaces_a_previous_export_safely(trained_run, tmp_path, monkeypatch):
  wd = trained_run[0]
  out = tmp_path / "model"
  m1 = export_model(str(wd), str(out))
  assert m1["kind"] == "farmer_jax_export" and export_lib.is_export_dir(str(out))
  m2 = export_model(str(wd), str(out), dtype="bfloat16", overwrite=True)
  assert load_model(str(out))[3] == m2 and m2["dtype"] == "bfloat16"
  assert sorted(os.listdir(tmp_path)) == ["model"]
  # a format-1 export.json without the "kind" marker is recognised too
  meta = json.loads((out / "export.json").read_text())
  del meta["kind"]
  (out / "export.json").write_text(json.dumps(meta))
  assert export_lib.is_export_dir(str(out))
  assert export_model(str(wd), str(out), overwrite=True)["dtype"] == "float32"
  assert sorted(os.listdir(tmp_path)) == ["model"]
  # interrupted between moving the old export aside and renaming the new one in: the old one is put
  # back, no debris
  before = snapshot(out)
  real_rename = os.rename

  def rename(src, dst):
    if ".tmp-" in os.path.basename(src):
      raise KeyboardInterrupt
    real_rename(src, dst)

  monkeypatch.setattr(export_lib.os, "rename", rename)
  with pytest.raises(KeyboardInterrupt):
    export_model(str(wd), str(out), dtype="bfloat16", overwrite=True)
  monkeypatch.undo()
  assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["model"]


def test_export_skips_an_unreadable_newest_checkpoint_without_touching_the_run(
    trained_run, tmp_path):
  wd, _ = copy_run_with_new_step(trained_run, tmp_path / "run", 400)
  truncate_tree(wd / CHECKPOINTS / "400" / "state")
  before = snapshot(wd)
  said = []
  meta = export_model(str(wd), str(tmp_path / "model"), say=said.append)
  assert meta["step"] == 200
  assert any(f"{wd / CHECKPOINTS / '400'} is unreadable" in m for m in said), said
  assert any("exporting checkpoint step 200, the newest readable one" in m for m in said), said
  assert snapshot(wd) == before, "export must not modify the run"
  chex.assert_trees_all_equal(load_model(str(tmp_path / "model"))[1],
                              jax.device_get(trained_run[2].state["params"]), strict=True)
  truncate_tree(wd / CHECKPOINTS / "200" / "state")
  with pytest.raises(ExportError, match=f"no checkpoint in {wd / CHECKPOINTS} could be read"):
    export_model(str(wd), str(tmp_path / "model2"), say=said.append)
  assert not (tmp_path / "model2").exists() and not _leftovers(tmp_path)


def test_export_refuses_non_finite_params_and_writes_nothing(trained_run, tmp_path):
  def poison(state):
    k = state["params"]["prior"]["head_i"]["kernel"]
    state["params"]["prior"]["head_i"]["kernel"] = k.at[0, :3].set(np.nan).at[1, 0].set(np.inf)
    return state

  wd, _ = copy_run_with_new_step(trained_run, tmp_path / "run", 400, mutate=poison)
  before = snapshot(wd)
  with pytest.raises(
      ExportError,
      match=r"checkpoint step 400 of .* is not finite: 3 NaN and 1 inf values in 1 "
      r"param\(s\): prior/head_i/kernel \(3 NaN, 1 inf\); nothing was exported"):
    export_model(str(wd), str(tmp_path / "model"))
  assert not (tmp_path / "model").exists() and not _leftovers(tmp_path)
  assert snapshot(wd) == before


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
  with pytest.raises(ExportError, match=r"export.json: unreadable \(JSONDecodeError"):
    load_model(str(partial))
  (partial / "export.json").write_text((out / "export.json").read_text())
  with pytest.raises(ExportError, match="params could not be restored"):
    load_model(str(partial))


def test_exports_that_lie_are_refused_at_load_time(exported, tmp_path):
  """export.json that is not an object or names an unknown dtype, config.json that is not an
  object or disagrees with the stored param shapes: one ExportError naming the file, at load time
  (Orbax alone restores the stored shapes without complaint and the model fails at first use)."""
  import shutil
  _, out, _, _ = exported
  bad = tmp_path / "bad"
  shutil.copytree(out, bad)
  meta = json.loads((out / "export.json").read_text())
  for text, pattern in [
      ("[1, 2]", r"export.json: holds a JSON list, not an object"),
      (json.dumps({**meta, "dtype": "float8"}), r"export.json: dtype 'float8' is not one of"),
      (json.dumps({**meta, "dtype": ["x"]}), r"export.json: dtype .* is not one of"),
      (json.dumps({**meta, "student": 3}), r"'student' is not an object"),
  ]:
    (bad / "export.json").write_text(text)
    with pytest.raises(ExportError, match=pattern):
      load_model(str(bad))
  (bad / "export.json").write_text(json.dumps(meta))
  config = json.loads((out / "config.json").read_text())
  (bad / "config.json").write_text("[]")
  with pytest.raises(ExportError, match=r"config.json: unreadable"):
    load_model(str(bad))
  config["model"]["ar_width"] = 2 * config["model"]["ar_width"]
  (bad / "config.json").write_text(json.dumps(config))
  with pytest.raises(ExportError, match=r"the params do not match its config.json \(\d+ "
                     r"param\(s\): prior/.*: stored \(.*\), the config gives"):
    load_model(str(bad))


@pytest.mark.slow  # ~25-35 s on 2 cores; CI runs it
def test_generate_is_seeded_and_batch_size_independent(exported, tmp_path):
  from farmer_jax.sampling.generate import describe_stats
  _, out, _, _ = exported
  mcfg, params, _, _ = load_model(str(out))
  s = SamplerConfig(guidance="resampling", cfg=ResamplingCFG(w=1.0), redundant_candidates=16)
  a, la, st = generate(
      mcfg, params, [3, 7], 3, s, seed=5, batch_size=6, progress=False, return_stats=True)
  chex.assert_shape([st["ess_informative"], st["ess_redundant"]], (6,))
  assert np.all((st["ess_informative"] >= 1) & (st["ess_informative"] <= 10))  # s_c + s_u = 10
  assert np.all((st["ess_redundant"] >= 1) & (st["ess_redundant"] <= 32))           # 2 * 16
  b, lb = generate(mcfg, params, [3, 7], 3, s, seed=5, batch_size=4, progress=False)
  chex.assert_shape(a, (2, 3, 32, 32, 1))
  chex.assert_type(a, np.uint8)
  np.testing.assert_array_equal(la, [[3, 3, 3], [7, 7, 7]])
  # uint8 images from different batch sizes: equal up to rare one-level rounding flips at bin edges
  assert np.mean(a == b) > 0.999
  c, _ = generate(mcfg, params, [3, 7], 3, s, seed=6, batch_size=6, progress=False)
  assert np.mean(a != c) > 0.01
  write_outputs(a, la, str(tmp_path / "g.png"), str(tmp_path / "g.npz"), st)
  z = np.load(tmp_path / "g.npz")
  assert z["arr_0"].shape == (6, 32, 32, 1) and list(z["labels"]) == [3, 3, 3, 7, 7, 7]
  np.testing.assert_array_equal(z["ess_redundant"], st["ess_redundant"])
  # the Jacobi AF inverse (sampler.inverse): the same images as the exact one, with its iterations
  sj = s._replace(inverse="jacobi", jacobi_tol=1e-4)
  j, _, stj = generate(mcfg, params, [3, 7], 3, sj, seed=5, batch_size=6, progress=False,
                       return_stats=True)
  assert np.mean(j == a) > 0.999
  chex.assert_shape(stj["jacobi_iters"], (6, mcfg.flow_blocks))
  assert stj["jacobi_iters"].max() <= mcfg.num_tokens - 1
  assert "Jacobi AF inverse (tol 0.0001): iterations per block" in describe_stats(stj, sj)


def test_parse_classes():
  assert parse_classes("all", 10) == list(range(10))
  assert parse_classes("2,null", 10) == [2, 10]
  with pytest.raises(UserError, match="class id 12 is out of range"):
    parse_classes("1,12", 10)
  with pytest.raises(UserError, match="not an integer"):
    parse_classes("cat", 10)


@pytest.mark.slow  # moved out of the default suite to keep it <= 10 min on 2 cores
def test_sample_cli_errors(exported, tmp_path):
  _, out, _, _ = exported
  run = lambda *a: subprocess.run([sys.executable, "-m", "farmer_jax", "sample", *a],
                                  capture_output=True,
                                  text=True,
                                  timeout=300)
  r = run(f"--model={out}", "--classes=11", f"--out={tmp_path}/x.png")
  assert r.returncode == 2 and "class id 11 is out of range" in r.stderr
  r = run(f"--model={out}", "--cfg=-1", f"--out={tmp_path}/x.png")
  assert r.returncode == 2 and "cfg=-1" in r.stderr
  r = run(f"--model={out}", "--sampler=t_sigma=0", f"--out={tmp_path}/x.png")
  assert r.returncode == 2 and "t_sigma=0" in r.stderr
  r = run(f"--model={tmp_path}/missing", f"--out={tmp_path}/x.png")
  assert r.returncode == 2 and "does not exist" in r.stderr
  # an output that cannot fit is refused before sampling, not a traceback from a 37 GiB allocation
  r = run(f"--model={out}", "--num=1000000000", f"--npz={tmp_path}/x.npz")
  last = r.stderr.strip().splitlines()[-1]
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert re.search(r"--num=1000000000 x 10 class\(es\) = 10000000000 samples of .* need about "
                   r"[\d.]+ GiB of memory.*Fix: lower --num", last), last
  assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.npz").exists()


def test_output_size_check():
  from farmer_jax.sampling.generate import check_output_size
  from conftest import TINY
  check_output_size(TINY, [0, 1, 2], 1000, png=True, available=2**30)
  with pytest.raises(UserError, match=r"--num=10000000 x 3 class\(es\) = 30000000 samples"):
    check_output_size(TINY, [0, 1, 2], 10**7, png=False, available=2**30)
  with pytest.raises(UserError, match=r"exceeds the PNG size limit"):
    check_output_size(TINY, [0], 2**28, png=True, available=2**60)


def test_failed_write_leaves_no_new_parent_folders(tmp_path, monkeypatch):
  """An export that fails midway (here: writing its config) removes its temporary directory and
  the parent folders it created for ``out``; a parent that existed before stays."""
  import ml_collections

  def fail(*_):
    raise OSError("disk full")

  monkeypatch.setattr(export_lib.runs, "write_saved_config", fail)
  params = {"w": np.ones((2, 3), np.float32)}
  meta = {"kind": export_lib.EXPORT_KIND, "format_version": export_lib.FORMAT_VERSION}
  with pytest.raises(OSError, match="disk full"):
    export_lib.write_export(str(tmp_path / "a" / "b" / "model"), params,
                            ml_collections.ConfigDict(), meta)
  assert os.listdir(tmp_path) == []
  os.mkdir(tmp_path / "keep")
  with pytest.raises(OSError, match="disk full"):
    export_lib.write_export(str(tmp_path / "keep" / "c" / "model"), params,
                            ml_collections.ConfigDict(), meta)
  assert os.listdir(tmp_path) == ["keep"] and os.listdir(tmp_path / "keep") == []


def _file_size_limit(limit):
  """preexec_fn: files of the child may not grow past ``limit`` bytes; SIGXFSZ ignored, so such a
  write fails with EFBIG (as one onto a full disk fails with ENOSPC)."""
  def apply():
    import resource
    import signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE,
                       (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
  return apply


def test_export_whose_params_cannot_be_written_is_one_line(trained_run, tmp_path):
  """Orbax failing to write the params (in its threads; here: past a file size limit) is ONE line
  naming --out and the errno, exit 2, without Orbax's logged tracebacks; nothing is left."""
  workdir, _, _ = trained_run
  out = tmp_path / "exports" / "model"
  r = subprocess.run([sys.executable, "-m", "farmer_jax", "export", f"--workdir={workdir}",
                      f"--out={out}"], capture_output=True, text=True, timeout=300,
                     preexec_fn=_file_size_limit(16 << 10))
  assert r.returncode == 2, r.stderr[-3000:]
  assert r.stderr.strip().splitlines() == [
      f"farmer_jax export: --out={out}: writing the params failed: [Errno {errno.EFBIG}] File too "
      "large; nothing was exported. Fix: raise the file size limit (ulimit -f), or choose another "
      "--out"], r.stderr[-3000:]
  assert not (tmp_path / "exports").exists()


def test_export_step_picks_any_kept_checkpoint(trained_run, tmp_path):
  """--step=N exports checkpoint N exactly (here the older of two whose params differ), the newest
  without it; a step the run does not keep is refused with the kept ones named, and nothing is
  written."""
  def shift(state):
    state["params"] = jax.tree.map(lambda a: a + 1.0, state["params"])
    return state

  wd, state = copy_run_with_new_step(trained_run, tmp_path / "run", 400, shift)
  old = export_model(str(wd), str(tmp_path / "m200"), step=200)
  new = export_model(str(wd), str(tmp_path / "m400"))
  assert (old["step"], new["step"]) == (200, 400)
  chex.assert_trees_all_equal(load_model(str(tmp_path / "m200"))[1],
                              jax.device_get(trained_run[2].state["params"]), strict=True)
  chex.assert_trees_all_equal(load_model(str(tmp_path / "m400"))[1],
                              jax.device_get(state["params"]), strict=True)
  with pytest.raises(ExportError, match=re.escape("keeps no checkpoint of step 300 (kept: 200, "
                                                  "400). Fix: pass one of the kept steps")):
    export_model(str(wd), str(tmp_path / "m300"), step=300)
  assert sorted(os.listdir(tmp_path)) == ["m200", "m400", "run"]
  from farmer_jax.api import load
  assert "step 200" in repr(load(str(wd), step=200)) and "step 400" in repr(load(str(wd)))
  with pytest.raises(UserError, match="is an export, which holds one step"):
    load(str(tmp_path / "m200"), step=200)
  with pytest.raises(UserError, match=r"step=-1\): a checkpoint step is an int >= 0"):
    load(str(wd), step=-1)


def test_export_to_a_bucket_and_load_from_it(exported, tmp_path, monkeypatch):
  """An export written to gs:// (a local stand-in bucket) lands under the URL, never in a local
  path built from it; it loads back exactly, is refused as a target without --overwrite and
  replaced with it (export.json last), and a bucket folder holding anything else is never
  replaced."""
  from fake_gcs import fake_gcs

  from farmer_jax.api import load
  workdir, _, meta, tr = exported
  bucket, url = tmp_path / "bucket", "gs://b/models/m"
  monkeypatch.chdir(tmp_path)   # a URL mistaken for a local path would land here, as ./gs:/b/...
  with fake_gcs(str(bucket)) as seen:
    got = export_model(str(workdir), url)
    assert got == meta and url + "/params" in seen
    assert sorted(os.listdir(bucket / "b/models/m")) == ["config.json", "export.json", "params"]
    mcfg, params, _, meta2 = load_model(url)
    assert mcfg == tr.mcfg and meta2 == meta
    chex.assert_trees_all_equal(params, jax.device_get(tr.state["params"]), strict=True)
    assert load(url).latent_shape == (tr.mcfg.num_tokens, tr.mcfg.token_dim)
    with pytest.raises(ExportError, match="already exists. Fix: pass --overwrite"):
      export_model(str(workdir), url)
    export_model(str(workdir), url + "/", dtype="bfloat16", overwrite=True)
    _, params, _, meta3 = load_model(url)
    assert meta3["dtype"] == "bfloat16"
    chex.assert_type(jax.tree.leaves(params), "bfloat16")
    (bucket / "b/models/m/notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"also holds files export did not write \(notes.txt\)"):
      export_model(str(workdir), url, overwrite=True)
    assert (bucket / "b/models/m/notes.txt").exists() and load_model(url)[3] == meta3
    # a failed export deletes what it wrote; a killed one (no export.json) is replaced
    monkeypatch.setattr(export_lib.runs, "write_saved_config", _fail)
    with pytest.raises(OSError, match="disk full"):
      export_model(str(workdir), url + "2")
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert not (bucket / "b/models/m2").exists()
    (bucket / "b/models/m2/params").mkdir(parents=True)
    (bucket / "b/models/m2/config.json").write_text("{")
    with pytest.raises(ExportError, match="already exists. Fix: pass --overwrite"):
      export_model(str(workdir), url + "2")
    assert export_model(str(workdir), url + "2", overwrite=True) == meta
    assert load_model(url + "2")[3] == meta
  assert sorted(os.listdir(tmp_path)) == ["bucket"]


def _fail(*_):
  raise OSError("disk full")
