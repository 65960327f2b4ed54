"""The input pipeline: `farmer_jax prepare` (folder -> TFDS ArrayRecord, read back by
tfds.data_source), the grain train stream (per-process shards, exact resume through an Orbax
checkpoint, a changed process count), eval coverage, and clear errors on bad data."""

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from farmer_jax.config.schema import DataConfig
from farmer_jax.data import pipeline, preprocess, sources
from farmer_jax.data.prepare import Options, PrepareError, prepare
from farmer_jax.errors import ConfigError

CLASSES = ("ant", "bee", "cow")


def _write_folder(root, per_class=10, seed=0):
  """A folder of real files: RGB JPEG/PNG of varying sizes per class, plus one grayscale, one
  RGBA, one CMYK, one palette (converted), and files that must be skipped: a truncated JPEG, a
  text file, a 16-bit PNG, a file outside any class folder."""
  rng = np.random.default_rng(seed)
  for k, c in enumerate(CLASSES):
    os.makedirs(root / c / "nested", exist_ok=True)
    for i in range(per_class):
      h, w = int(rng.integers(12, 40)), int(rng.integers(12, 40))
      a = (rng.random((h, w, 3)) * 255).astype(np.uint8)
      a[..., k] = 255  # class-coloured
      Image.fromarray(a).save(root / c / f"{i}.png")
    Image.fromarray(a).save(root / c / "nested" / "deep.jpg", quality=90)
  Image.fromarray((rng.random((20, 30)) * 255).astype(np.uint8)).save(root / "ant" / "gray.png")
  Image.fromarray((rng.random((20, 20, 4)) * 255).astype(np.uint8)).save(root / "bee" / "a.png")
  Image.fromarray(a).convert("CMYK").save(root / "cow" / "cmyk.jpg")
  Image.fromarray(a).convert("P").save(root / "cow" / "pal.png")
  good = (root / "ant" / "0.png").read_bytes()
  (root / "ant" / "trunc.png").write_bytes(good[:len(good) // 2])
  (root / "bee" / "notes.txt").write_text("not an image")
  Image.fromarray((rng.random((16, 16)) * 65535).astype(np.uint16)).save(root / "cow" / "d.png")
  (root / "stray.png").write_bytes(good)
  return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """The folder above prepared once at 16x16 PNG with a validation split: (options, report)."""
  root = _write_folder(tmp_path_factory.mktemp("folder"))
  o = Options(folder=str(root), data_dir=str(tmp_path_factory.mktemp("tfds")), name="toy_set",
              image_size=16, val_fraction=0.25, encoding="png")
  return o, prepare(o)


def _data(o, **kw):
  base = dict(name=f"tfds:{o.name}", data_dir=o.data_dir, image_size=o.image_size, channels=3,
              num_classes=len(CLASSES))
  return DataConfig(**{**base, **kw})


def test_prepare_converts_skips_reports_and_tfds_reads_it_back(prepared):
  import tensorflow_datasets as tfds
  o, report = prepared
  reasons = {p: r for p, r in report["skipped"]}
  assert reasons == {
      "stray.png": "not inside a class subfolder",
      "ant/trunc.png": reasons["ant/trunc.png"],
      "bee/notes.txt": "not an image file PIL can read",
      "cow/d.png": "image mode 'I;16' has no well-defined 8-bit RGB conversion"}
  assert "truncated" in reasons["ant/trunc.png"]
  counts = report["counts"]
  # 10 + nested per class, + gray (ant), rgba (bee), cmyk + palette (cow): all converted
  assert {c: counts["train"].get(c, 0) + counts["validation"].get(c, 0) for c in CLASSES} == {
      "ant": 12, "bee": 12, "cow": 13}
  assert sum(counts["validation"].values()) > 0
  with open(os.path.join(report["path"], "farmer_jax_prepare.json")) as f:
    assert json.load(f)["counts"] == counts
  n = 0
  for split in ("train", "validation"):
    src = tfds.data_source(o.name, split=split, data_dir=o.data_dir, download=False)
    assert len(src) == sum(counts[split].values())
    for i in range(len(src)):
      r = src[i]
      assert r["image"].shape == (16, 16, 3) and r["image"].dtype == np.uint8
      name = r["file_name"].decode() if isinstance(r["file_name"], bytes) else r["file_name"]
      assert CLASSES[int(r["label"])] == name.split("/")[0]
      with open(os.path.join(o.folder, name), "rb") as f:   # lossless PNG: exactly the crop
        want = preprocess.center_crop(preprocess.decode(f.read()), 16)
      np.testing.assert_array_equal(r["image"], want)
      n += 1
  assert n == 37
  info = sources.describe(_data(o))
  assert info.splits == {"train": sum(counts["train"].values()),
                         "validation": sum(counts["validation"].values())}
  assert (info.num_classes, info.channels, info.image_shape) == (3, 3, (16, 16))


def test_center_crop_is_the_adm_recipe():
  """Short side -> size by box halving (while >= 2x) then bicubic, then the center crop: a
  400x100 image whose left/right quarters are red/blue and middle half green, cropped to 32,
  keeps only the green middle; a constant image stays constant; grayscale keeps one channel."""
  a = np.zeros((100, 400, 3), np.uint8)
  a[:, :100, 0] = a[:, 300:, 2] = a[:, 100:300, 1] = 255
  out = preprocess.center_crop(Image.fromarray(a), 32)
  assert out.shape == (32, 32, 3)
  assert out[..., 1].min() == 255 and out[..., 0].max() == 0 and out[..., 2].max() == 0
  const = preprocess.center_crop(Image.new("RGB", (90, 70), (10, 20, 30)), 16)
  assert (const == np.array([10, 20, 30], np.uint8)).all()
  assert preprocess.center_crop(Image.new("L", (50, 40), 7), 8).shape == (8, 8, 1)
  rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))   # fully transparent: composited over white
  buf = preprocess.encode(np.asarray(rgba), "png")
  assert np.asarray(preprocess.decode(buf)).min() == 255


def test_prepare_refuses_bad_input_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
  root = _write_folder(tmp_path / "f", per_class=2)
  out = tmp_path / "out"
  ok = Options(folder=str(root), data_dir=str(out), name="ds", image_size=8)
  (tmp_path / "empty").mkdir()
  one = tmp_path / "one" / "only"
  one.mkdir(parents=True)
  (one / "x.png").write_bytes((root / "ant" / "0.png").read_bytes())
  for opts, pattern in [
      (dataclasses.replace(ok, folder=str(tmp_path / "empty")), r"no class subfolders.*empty"),
      (dataclasses.replace(ok, folder=str(tmp_path / "one")), r"one class subfolder \('only'\)"),
      (dataclasses.replace(ok, folder=str(tmp_path / "nope")), r"is not a directory"),
      (dataclasses.replace(ok, name="My-Set"), r"--name='My-Set' is not a valid dataset name"),
      (dataclasses.replace(ok, val_fraction=1.0), r"--val_fraction=1.0 must be in \[0, 1\)"),
      (dataclasses.replace(ok, data_dir="gs://b/tfds"), r"prepare writes to a local directory"),
  ]:
    with pytest.raises(PrepareError, match=pattern):
      prepare(opts)
  assert not out.exists()
  # a failure half-way (here: the 5th image cannot be encoded) leaves no dataset, no temp dir
  calls = {"n": 0}
  real_encode = preprocess.encode

  def failing(*a, **k):
    calls["n"] += 1
    if calls["n"] == 5:
      raise RuntimeError("disk on fire")
    return real_encode(*a, **k)

  monkeypatch.setattr(preprocess, "encode", failing)
  with pytest.raises(RuntimeError, match="disk on fire"):
    prepare(ok)
  assert not out.exists()   # nor the data_dir it created
  monkeypatch.setattr(preprocess, "encode", real_encode)
  first = prepare(ok)
  with pytest.raises(PrepareError, match=r"already exists.*--overwrite"):
    prepare(ok)
  # --val_folder: a second folder with the same class names is the validation split
  val = tmp_path / "val"
  for c in ("ant", "cow"):
    (val / c).mkdir(parents=True)
    (val / c / "v.png").write_bytes((root / c / "0.png").read_bytes())
  rep = prepare(dataclasses.replace(ok, image_size=12, overwrite=True, val_folder=str(val)))
  assert rep["counts"]["validation"] == {"ant": 1, "cow": 1}
  assert sorted(os.listdir(out)) == ["ds"]
  info = sources.describe(_data(ok, image_size=12))
  assert info.image_shape == (12, 12) and info.splits["validation"] == 2
  (val / "yak").mkdir()
  (val / "yak" / "y.png").write_bytes((root / "ant" / "0.png").read_bytes())
  with pytest.raises(PrepareError, match=r"class folder\(s\) \['yak'\] that --folder=.* lacks"):
    prepare(dataclasses.replace(ok, overwrite=True, val_folder=str(val)))
  assert first["path"] == os.path.join(str(out), "ds", "1.0.0")


def _pngs(folder):
  return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))


def test_prepare_overwrite_replaces_only_a_prepared_dataset(tmp_path, monkeypatch):
  """--overwrite never deletes a source folder (inside the target, or the target inside it), a
  foreign folder, a symbolic link or a dataset with foreign files beside it; a previous dataset is
  replaced, and one swapped for a foreign folder while prepare runs is refused then, untouched."""
  ds = tmp_path / "DS"
  raw = _write_folder(ds / "cats" / "raw", per_class=2)
  before = _pngs(raw)
  opts = Options(folder=str(raw), data_dir=str(ds), name="cats", image_size=8, overwrite=True)
  with pytest.raises(PrepareError, match=r"--folder=.*raw lies inside the dataset folder"):
    prepare(opts)
  assert _pngs(raw) == before
  src = _write_folder(tmp_path / "src", per_class=2)
  val = ds / "cats" / "val"
  (val / "ant").mkdir(parents=True)
  (val / "ant" / "v.png").write_bytes((src / "ant" / "0.png").read_bytes())
  with pytest.raises(PrepareError, match=r"--val_folder=.*val lies inside the dataset folder"):
    prepare(dataclasses.replace(opts, folder=str(src), val_folder=str(val)))
  assert (val / "ant" / "v.png").exists()
  with pytest.raises(PrepareError, match=r"would lie inside --folder=.*choose a --data_dir"):
    prepare(dataclasses.replace(opts, folder=str(src), data_dir=str(src), name="ds"))
  assert not (src / "ds").exists() and not any(p.name.startswith(".") for p in src.iterdir())
  foreign = tmp_path / "out" / "ds"
  foreign.mkdir(parents=True)
  (foreign / "keep.txt").write_text("mine")
  ok = Options(folder=str(src), data_dir=str(tmp_path / "out"), name="ds", image_size=8,
               overwrite=True)
  with pytest.raises(PrepareError, match=r"not a dataset written by farmer_jax prepare"):
    prepare(ok)
  assert (foreign / "keep.txt").read_text() == "mine"
  os.rename(foreign, tmp_path / "kept")
  os.symlink(tmp_path / "kept", foreign)
  with pytest.raises(PrepareError, match=r"is a symbolic link"):
    prepare(ok)
  assert (tmp_path / "kept" / "keep.txt").exists()
  os.remove(foreign)
  first = prepare(ok)
  second = prepare(ok)   # a previous dataset is replaced
  assert first["path"] == second["path"] and os.listdir(foreign) == ["1.0.0"]
  (foreign / "notes.txt").write_text("mine")
  with pytest.raises(PrepareError, match=r"other files beside it"):
    prepare(ok)
  assert (foreign / "notes.txt").exists()
  os.remove(foreign / "notes.txt")
  # swapped for a foreign folder while the new dataset is built: refused at the rename
  real_encode = preprocess.encode

  def swapping(*a, **k):
    if (foreign / "1.0.0").exists():
      import shutil
      shutil.rmtree(foreign)
      foreign.mkdir()
      (foreign / "keep.txt").write_text("late")
    return real_encode(*a, **k)

  monkeypatch.setattr(preprocess, "encode", swapping)
  with pytest.raises(PrepareError, match=r"not a dataset written by farmer_jax prepare"):
    prepare(ok)
  assert os.listdir(foreign) == ["keep.txt"]
  assert sorted(os.listdir(tmp_path / "out")) == ["ds"]   # no temporary left
  # without --overwrite, a dataset that appears at the target during the build is not replaced
  import shutil
  shutil.rmtree(foreign)
  other = prepare(dataclasses.replace(ok, data_dir=str(tmp_path / "other")))
  before = _pngs(src)

  def appearing(*a, **k):
    if not foreign.exists():
      shutil.copytree(os.path.dirname(other["path"]), foreign)
    return real_encode(*a, **k)

  monkeypatch.setattr(preprocess, "encode", appearing)
  with pytest.raises(PrepareError, match=r"appeared while the dataset was built"):
    prepare(dataclasses.replace(ok, overwrite=False))
  assert os.listdir(foreign) == ["1.0.0"] and _pngs(src) == before


def _h(batch):
  """One hash per image of a local batch."""
  return [hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest()[:12]
          for im in batch["image"]]


def test_train_stream_resumes_exactly_through_an_orbax_checkpoint(prepared, tmp_path):
  """The batch sequence across save (grain iterator state in the checkpoint) and restore equals
  the uninterrupted sequence, with random flips; every epoch is a reshuffled pass over all
  training examples."""
  from farmer_jax.artifacts.checkpoint import Checkpointer
  o, _ = prepared
  data = _data(o, random_flip=True)
  straight = pipeline.TrainInput(data, global_batch=4, seed=3)
  n = straight.num_examples
  ref = [_h(next(straight)) for _ in range(12)]
  straight.close()
  first = pipeline.TrainInput(data, global_batch=4, seed=3)
  first.start(0)
  got = [_h(next(first)) for _ in range(5)]
  meta, item = first.checkpoint()
  ck = Checkpointer(str(tmp_path / "ckpt"))
  ck.save(5, {"x": np.zeros(2, np.float32)}, {"step": 5, "data": meta}, data=item)
  ck.wait()
  next(first)   # the live iterator moving on must not change what was saved
  first.close()
  second = pipeline.TrainInput(data, global_batch=4, seed=3)
  holder = pipeline.state_holder()
  assert ck.restore_data(5, holder) and holder.state == {"next_index": 5}
  _, saved_meta, _ = ck.restore_latest()
  how = second.start(5, (saved_meta["data"], holder.state))
  assert how.startswith("input: restored the iterator state")
  got += [_h(next(second)) for _ in range(7)]
  second.close()
  ck.close()
  assert got == ref
  # the first floor(12 * 4 / n) epochs each hold every training example once (up to flips)
  plain = pipeline.TrainInput(dataclasses.replace(data, random_flip=False), 4, seed=3)
  stream = [h for _ in range(2 * n // 4 + 1) for h in _h(next(plain))]
  plain.close()
  src = sources.open_split(data, "train")
  everything = sorted(_h({"image": [src[i]["image"] for i in range(n)]}))
  assert sorted(stream[:n]) == everything and sorted(stream[n:2 * n]) == everything
  assert stream[:n] != stream[n:2 * n]   # reshuffled


def test_process_shards_and_a_changed_process_count(prepared):
  """Process p of P reads its own block of global batch k: the P local batches, concatenated in
  process order, are global batch k element for element. Resuming a 1-process run on 2 processes
  (the saved per-process state no longer applies) continues with exactly the same batches."""
  o, _ = prepared
  data = _data(o)
  one = pipeline.TrainInput(data, global_batch=6, seed=1)
  ref = [_h(next(one)) for _ in range(8)]
  meta, _ = one.checkpoint()
  one.close()
  halves = [pipeline.TrainInput(data, 6, seed=1, process_index=p, process_count=2)
            for p in range(2)]
  fresh = [[_h(next(h)) for _ in range(3)] for h in halves]
  for k in range(3):
    assert not set(fresh[0][k]) & set(fresh[1][k])
    assert fresh[0][k] + fresh[1][k] == ref[k]
  for h in halves:
    how = h.start(3, (meta, None))
    assert "layout changed: {'process_count': '1 -> 2'}" in how and "the same as in" in how
  for k in range(3, 8):
    local = [_h(next(h)) for h in halves]
    assert local[0] + local[1] == ref[k]
  for h in halves:
    h.close()


def test_worker_slices_are_whole_batches_and_interleave_to_the_same_stream():
  """grain's worker split (``set_slice(slice(w, None, W))``, called in each worker process) gives
  worker w the process's batches w, w + W, ...: interleaved round robin they are the batches of
  no workers, whole (never records of two workers in one batch), for every worker count."""
  n = 23
  images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
  stream = pipeline.train_stream(
      DataConfig(name="x", image_size=1, channels=1, num_classes=3, random_flip=True),
      sources.ArraySource(images, np.arange(n) % 3), seed=2)

  def ids(batch):
    return [int(v) for v in batch["image"].ravel()]

  ref = pipeline.LocalBatches(stream, 6, 1, 2, first=2)
  it = iter(ref)
  want = [ids(next(it)) for _ in range(12)]
  assert it.get_state() == {"next_index": 12}   # counted in batches, not records
  for workers in (2, 3, 4):
    its = []
    for w in range(workers):
      ds = pipeline.LocalBatches(stream, 6, 1, 2, first=2)
      ds.set_slice(slice(w, None, workers))
      its.append(iter(ds))
    got = [ids(next(its[k % workers])) for k in range(12)]
    assert got == want
  # a restored state continues with exactly the batches that follow
  again = iter(pipeline.LocalBatches(stream, 6, 1, 2, first=2))
  again.set_state({"next_index": 7})
  assert [ids(next(again)) for _ in range(5)] == want[7:]


def test_the_records_of_one_batch_are_read_in_parallel():
  """With ``read_threads`` T, T records are read at once even when only one batch is in flight
  (``prefetch=1``): a batch's records are not read one after another."""
  import threading
  import time

  class Slow(sources.ArraySource):
    active = peak = 0
    lock = threading.Lock()

    def __getitem__(self, i):
      with self.lock:
        Slow.active += 1
        Slow.peak = max(Slow.peak, Slow.active)
      time.sleep(0.02)   # a read's latency (a bucket round trip, a decode)
      with self.lock:
        Slow.active -= 1
      return super().__getitem__(i)

  n = 32
  src = Slow(np.zeros((n, 2, 2, 1), np.uint8), np.zeros(n, np.int64))
  batches, _ = pipeline.padded_batches(src, 8, read_threads=4, prefetch=1)
  assert len(list(batches)) == 4 and Slow.peak == 4


@pytest.mark.parametrize("n,global_batch,processes", [(10, 4, 1), (10, 4, 2), (7, 6, 3),
                                                      (5, 8, 2), (12, 4, 4)])
def test_eval_covers_every_example_exactly_once(n, global_batch, processes):
  images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1) * np.ones((1, 2, 2, 1), np.uint8)
  src = sources.ArraySource(images, np.arange(n) % 3)
  per_process = []
  for p in range(processes):
    batches, steps = pipeline.padded_batches(src, global_batch, p, processes)
    got = list(batches)
    assert steps == -(-n // global_batch) == len(got)   # the same number on every process
    per_process.append(got)
  seen = []
  for k in range(steps):   # global batch k = the processes' blocks in order
    for p in range(processes):
      b = per_process[p][k]
      assert b["image"].shape[0] == global_batch // processes
      seen += [int(im[0, 0, 0]) for im, m in zip(b["image"], b["mask"]) if m]
  assert seen == list(range(n))   # every example once, in order


def test_bad_data_is_refused_before_training(prepared, tmp_path):
  o, _ = prepared
  ok = _data(o)

  def bad(pattern, **kw):
    d = dataclasses.replace(ok, **kw)
    with pytest.raises(ConfigError, match=pattern):
      sources.check_config(d, sources.describe(d), (("data.train_split", d.train_split),))

  bad(r"config.data.data_dir='/nonexistent/tfds'.*does not exist", data_dir="/nonexistent/tfds")
  bad(r"config.data.name='tfds:nope'.*no prepared TFDS dataset 'nope'", name="tfds:nope")
  bad(r"config.data.image_size=32.*images are 16x16.*resize=center_crop", image_size=32)
  bad(r"config.data.channels=1.*has 3 channel", channels=1)
  bad(r"config.data.num_classes=10.*has 3 classes", num_classes=10)
  bad(r"config.data.train_split='test'.*has the splits \['train', 'validation'\]",
      train_split="test")
  # center_crop makes another size valid, and the pipeline delivers it
  d = dataclasses.replace(ok, image_size=8, resize="center_crop")
  sources.check_config(d, sources.describe(d))
  batch = next(pipeline.TrainInput(d, 2, seed=0))
  assert batch["image"].shape == (2, 8, 8, 3)
  # a record the config does not describe fails with the dataset named, not deep in jax
  with pytest.raises(ConfigError, match=r"an image of tfds:toy_set has shape \(16, 16, 3\)"):
    pipeline.Preprocess(dataclasses.replace(ok, image_size=12)).map(
        sources.open_split(ok, "train")[0])
  with pytest.raises(ConfigError, match=r"a label of x is 5, outside \[0, 3\)"):
    pipeline.Preprocess(dataclasses.replace(ok, name="x")).map(
        {"image": np.zeros((16, 16, 3), np.uint8), "label": 5})
  uncond = pipeline.Preprocess(dataclasses.replace(ok, num_classes=0)).map(
      {"image": np.zeros((16, 16, 3), np.uint8), "label": 2})
  assert uncond["label"] == 0


@pytest.mark.slow  # ~25-35 s on 2 cores; CI runs it
def test_train_and_report_on_a_prepared_dataset(prepared, tmp_path):
  """`farmer_jax train` end to end on a `tfds:` dataset: trains, checkpoints with the iterator
  state, resumes with it, and measures bits/dim on every validation example."""
  from farmer_jax import configlib
  from farmer_jax.config.parse import parse
  from farmer_jax.train.trainer import start, train_and_report
  o, report = prepared
  c = configlib.load("quickstart:tiny")
  c.data.update(name=f"tfds:{o.name}", data_dir=o.data_dir, image_size=16, channels=3,
                num_classes=3, random_flip=True)
  c.model.update(patch_size=4, d_informative=8)
  c.train.update(steps=4, batch_size=4, warmup_steps=1, log_every=2, profile_start=1,
                 profile_steps=1)
  c.eval.update(split="validation", batch_size=4)
  c.sample.update(per_class=1)
  wd = str(tmp_path / "run")
  tr = start(parse(c, wd), wd, quiet=True)
  tr.fit(stop_at=2)
  tr.close()
  tr = start(parse(c, wd), wd, quiet=True)
  assert tr.restored_step == 2 and tr.input._it.get_state() == {"next_index": 2}
  tr.close()
  summary, _ = train_and_report(parse(c, wd), wd, quiet=True)
  assert summary["steps"] == 4 and np.isfinite(summary["test_bpd"])
  traces = [f for _, _, fs in os.walk(os.path.join(wd, "profile")) for f in fs]
  assert any(f.endswith(".xplane.pb") for f in traces), traces   # train.profile_steps
  assert summary["test_count"] == sum(report["counts"]["validation"].values())
