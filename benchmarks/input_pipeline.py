"""Input pipeline throughput: per-host images/s for the ImageNet preset against the rate a slice
consumes, and before -> after a code change, measured side by side in one run.

  python benchmarks/input_pipeline.py [--images 1000] [--batch 32] [--before=DIR] [--train_step]

1. Data, made at run time (nothing is downloaded): --images JPEG photos of mixed sizes like
   ImageNet's (mostly 500x375, 375x500, 500x333; a fifth of them 200-800 px at random; ~110 KB on
   average at quality 90; 10 classes), written twice: as they are, into a TFDS ArrayRecord dataset
   like ``tfds:imagenet2012`` (the preset's default, read with resize=center_crop), and by
   ``farmer_jax prepare`` at 256x256 (read with resize=none).
2. Images/s of the pipeline alone (``TrainInput``: read, decode, crop, flip, batch; no model) with
   the preset's read_threads=16 and prefetch=4, at a per-host batch of --batch, with 0 and 2
   worker processes; and the same behind a simulated bucket (every record read first waits
   --latency_ms). With --before=DIR (a checkout of another commit, e.g. from ``git archive``) every
   measurement also runs with that tree's farmer_jax, in a subprocess, on the same files.
3. Per slice and preset: the train step's time at 40% MFU (the analytic count behind
   ``farmer_jax check --topology`` and docs/scaling.md's table), the per-host batch (global batch
   / hosts, hosts = chips / 4 on v4 and v5p), the images/s each host must deliver, and what the
   best rate measured here gives per core, scaled to the host's vCPUs (v4: 240, v5p: 208): the
   headroom, and the cores of a host the input needs.
4. --train_step: images/s the jitted train step consumes on this CPU (quickstart; 256x256 patch 16
   at toy widths) against the pipeline.
"""

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import flags
from PIL import Image

HOST_VCPUS = {"v4": 240, "v5p": 208}   # per TPU VM host of 4 chips (v5p: Cloud TPU docs)
SLICES = ("v4-32", "v5p-64", "v5p-128")
PRESETS = ("1.1B/16", "1.1B/8", "1.9B/16", "1.9B/8")
PRESET_READ = dict(read_threads=16, prefetch=4)   # farmer_jax/configs/imagenet256.py
SHAPES = [(500, 375)] * 5 + [(500, 333)] * 2 + [(375, 500), (333, 500), (500, 500)]


def photo(rng):
  """JPEG bytes of a photo-like image of an ImageNet-like size: smooth colour fields, mid-scale
  texture and sensor-like noise (about 110 KB on average at quality 90)."""
  w, h = SHAPES[rng.integers(len(SHAPES))]
  if rng.random() < 0.2:
    w, h = int(rng.integers(200, 800)), int(rng.integers(200, 640))
  low = rng.uniform(0, 255, (int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3))
  base = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((w, h), Image.BICUBIC))
  mid = rng.uniform(0, 255, (h // 3, w // 3, 3)).astype(np.uint8)
  mid = np.asarray(Image.fromarray(mid).resize((w, h), Image.BILINEAR))
  img = 0.6 * base + 0.4 * mid + 16 * rng.standard_normal((h, w, 3), dtype=np.float32)
  buf = io.BytesIO()
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def make_photos(root, n, seed=0):
  """n photos in 10 class folders."""
  rng = np.random.default_rng(seed)
  for i in range(n):
    data = photo(rng)
    os.makedirs(os.path.join(root, str(i % 10)), exist_ok=True)
    with open(os.path.join(root, str(i % 10), f"{i:05d}.jpg"), "wb") as f:
      f.write(data)


def write_originals(root, data_dir, name):
  """The photos under ``root`` as they are (variable size, the original JPEG bytes) into a TFDS
  ArrayRecord dataset, as TFDS's imagenet2012 stores them."""
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  classes = sorted(os.listdir(root))
  files = [(os.path.join(root, c, f), k) for k, c in enumerate(classes)
           for f in sorted(os.listdir(os.path.join(root, c)))]

  class Originals(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    __module__ = "input_pipeline_bench"

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(names=classes)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for path, k in files:
        with open(path, "rb") as f:
          yield path, {"image": f.read(), "label": k}

  Originals.name = name
  Originals(data_dir=data_dir, file_format="array_record").download_and_prepare()


class Delayed:
  """A source whose every read first waits ``latency`` seconds (a bucket's round trip)."""

  def __init__(self, source, latency):
    self.source, self.latency = source, latency

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    time.sleep(self.latency)
    return self.source[i]


def cpu_seconds():
  """CPU time (user + system) of this process and its worker processes so far."""
  import psutil
  me = psutil.Process()
  return sum(sum(p.cpu_times()[:2]) for p in [me] + me.children(recursive=True))


def pipeline_rate(fields, batch, batches, latency_ms=0.0):
  """(images/s over ``batches`` batches after ``batches // 2`` warm-up ones (start-up, buffers
  filled ahead), images per CPU second of this process and its workers meanwhile, hash of the
  first measured batch) for DataConfig(**fields), with whichever farmer_jax is importable."""
  from farmer_jax.config.schema import DataConfig
  from farmer_jax.data import pipeline
  data = DataConfig(**fields)
  if latency_ms:
    open_split = pipeline.sources.open_split
    pipeline.sources.open_split = lambda d, s: Delayed(open_split(d, s), latency_ms / 1e3)
  try:
    inp = pipeline.TrainInput(data, batch, seed=0)
    for _ in range(batches // 2):
      next(inp)
    t0, c0 = time.perf_counter(), cpu_seconds()
    for k in range(batches):
      b = next(inp)
      if k == 0:
        digest = hashlib.sha1(np.ascontiguousarray(b["image"]).tobytes()).hexdigest()[:12]
    rate = batches * batch / (time.perf_counter() - t0)
    per_cpu = batches * batch / (cpu_seconds() - c0)
    inp.close()
  finally:
    if latency_ms:
      pipeline.sources.open_split = open_split
  assert b["image"].shape == (batch, data.image_size, data.image_size, data.channels)
  return rate, per_cpu, digest


def measure(cases):
  """Runs every case (dict: fields, batch, batches, latency_ms) in this process."""
  flags.FLAGS.mark_as_parsed()   # grain worker processes read an absl flag
  out = []
  for c in cases:
    rate, per_cpu, digest = pipeline_rate(c["fields"], c["batch"], c["batches"],
                                          c["latency_ms"])
    out.append({"rate": rate, "per_cpu": per_cpu, "digest": digest})
  return out


def measure_tree(tree, cases):
  """``measure(cases)`` with the farmer_jax of checkout ``tree``, in a subprocess."""
  env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
  r = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", json.dumps(cases)],
                     env=env, stdout=subprocess.PIPE, check=True, text=True)
  return json.loads(r.stdout.strip().splitlines()[-1])


def requirements():
  """[(preset, slice, hosts, per-host batch, step s, host vCPUs, required images/s per host)]:
  the train step at 40% MFU as ``farmer_jax check`` projects it (docs/scaling.md)."""
  from farmer_jax import configlib, flops
  from farmer_jax.aot import slices
  from farmer_jax.aot.compile import project
  from farmer_jax.config.parse import parse
  rows = []
  for preset in PRESETS:
    for name in SLICES:
      s = slices.parse_slice(name)
      hosts = s.chips // 4
      run = parse(configlib.load(f"imagenet256:{preset}"), num_devices=s.chips,
                  num_processes=hosts, read_data=False)
      gb = run.train.batch_size
      step = project(flops.train_step_flops(run.model, gb), run.train.steps, s.chips,
                     s.chip.peak_flops, 0.4).step_seconds
      rows.append((preset, name, hosts, gb // hosts, step, HOST_VCPUS[s.chip.name],
                   gb // hosts / step))
  return rows


def step_rate(config, steps):
  import jax
  from farmer_jax.config.parse import parse
  from farmer_jax.model import Farmer
  from farmer_jax.train.optim import make_optimizer
  from farmer_jax.train.state import init_state
  from farmer_jax.train.step import make_train_step
  run = parse(config)
  m, t = run.model, run.train
  tx, lr = make_optimizer(t)
  state = jax.jit(lambda r: init_state(m, tx, r, False))(jax.random.key(0))
  step = jax.jit(make_train_step(Farmer(m), m, t, tx, lr), donate_argnums=(0,))
  b = t.batch_size
  batch = {"image": np.random.default_rng(0).integers(0, 256, (b, m.image_size, m.image_size,
                                                                m.channels), dtype=np.uint8),
           "label": np.zeros((b,), np.int32)}
  state, met = step(state, batch, jax.random.key(1))     # compile
  jax.block_until_ready(met)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, met = step(state, batch, jax.random.key(1))
  jax.block_until_ready(met)
  return steps * b / (time.perf_counter() - t0)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--images", type=int, default=1000)
  ap.add_argument("--batch", type=int, default=32, help="per-host batch the rates are read at")
  ap.add_argument("--batches", type=int, default=20)
  ap.add_argument("--workers", default="0,2")
  ap.add_argument("--latency_ms", type=float, default=20.0)
  ap.add_argument("--before", default="", help="a checkout to measure too, e.g. the last release")
  ap.add_argument("--rounds", type=int, default=2,
                  help="measure every tree this many times, alternating; the best rate counts")
  ap.add_argument("--data", default="",
                  help="folder for the data made (kept, and reused when there); default: temporary")
  ap.add_argument("--train_step", action="store_true")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--measure", default="", help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.measure:
    print(json.dumps(measure(json.loads(a.measure))))
    return
  flags.FLAGS.mark_as_parsed()
  from farmer_jax.data.prepare import Options, prepare
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cores = os.cpu_count()
  tmp = a.data or tempfile.mkdtemp(prefix="farmer_input_bench_")
  try:
    photos, tfds_dir = os.path.join(tmp, "photos"), os.path.join(tmp, "tfds")
    if not os.path.isdir(os.path.join(tfds_dir, "bench_256")):
      t0 = time.perf_counter()
      make_photos(photos, a.images)
      write_originals(photos, tfds_dir, "bench_originals")
      t1 = time.perf_counter()
      prepare(Options(folder=photos, data_dir=tfds_dir, name="bench_256", image_size=256,
                      workers=cores))
      t2 = time.perf_counter()
      print(f"made {a.images} JPEG photos and their ArrayRecord dataset in {t1 - t0:.0f} s; "
            f"prepare -> 256x256: {a.images / (t2 - t1):.0f} images/s ({cores} workers)")
    sizes = [os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(photos) for f in fs]
    print(f"data: {len(sizes)} JPEG photos of mixed sizes, {np.mean(sizes) / 1e3:.0f} KB on "
          "average")
    base = dict(image_size=256, channels=3, num_classes=10, random_flip=True,
                data_dir=tfds_dir, **PRESET_READ)
    kinds = {"originals, center_crop": dict(base, name="tfds:bench_originals",
                                            resize="center_crop"),
             "prepared 256x256": dict(base, name="tfds:bench_256", resize="none")}
    cases = []
    for kind, fields in kinds.items():
      for w in (int(x) for x in a.workers.split(",")):
        cases.append({"name": f"{kind}, {w} workers", "fields": dict(fields, worker_count=w),
                      "batch": a.batch, "batches": a.batches, "latency_ms": 0.0})
    cases.append({"name": f"prepared 256x256, 0 workers, {a.latency_ms:g} ms per read",
                  "fields": dict(kinds["prepared 256x256"], worker_count=0), "batch": a.batch,
                  "batches": max(4, a.batches // 4), "latency_ms": a.latency_ms})
    print(f"pipeline alone (read_threads={PRESET_READ['read_threads']}, prefetch="
          f"{PRESET_READ['prefetch']}, per-host batch {a.batch}, {cores} cores, load average "
          f"{os.getloadavg()[0]:.1f}):", flush=True)
    trees = ([("before", a.before)] if a.before else []) + [("this tree", here)]
    got = {}
    for _ in range(a.rounds):
      for label, tree in trees:
        r = measure_tree(tree, cases)
        got[label] = [dict(x, rate=max(x["rate"], y["rate"]),
                           per_cpu=max(x["per_cpu"], y["per_cpu"]))
                      for x, y in zip(got.get(label, r), r)]
    after = got["this tree"]
    print(f"  {'':<52} {'images/s':>8} {'per CPU s':>9}" +
          (f"   before: {'images/s':>8} {'per CPU s':>9}" if a.before else ""))
    for i, c in enumerate(cases):
      line = f"  {c['name']:<52} {after[i]['rate']:8.0f} {after[i]['per_cpu']:9.0f}"
      if a.before:
        old = got["before"][i]
        same = "same batches" if old["digest"] == after[i]["digest"] else "DIFFERENT BATCHES"
        line += (f"   before: {old['rate']:8.0f} {old['per_cpu']:9.0f}   wall "
                 f"{after[i]['rate'] / old['rate']:.1f}x, CPU "
                 f"{after[i]['per_cpu'] / old['per_cpu']:.2f}x ({same})")
      print(line)
    digests = {after[i]["digest"] for i, c in enumerate(cases) if not c["latency_ms"] and
               c["fields"]["name"] == "tfds:bench_originals"}
    print(f"  worker counts give the same batches: {'yes' if len(digests) == 1 else 'NO'}")

    needs = requirements()
    for kind in kinds:
      mine = [after[i] for i, c in enumerate(cases)
              if c["name"].startswith(kind) and not c["latency_ms"]]
      rate, per_core = max(m["rate"] for m in mine), max(m["per_cpu"] for m in mine)
      print(f"\n{kind}: best {rate:.0f} images/s on {cores} shared cores = {rate / cores:.0f} per "
            f"core of wall time; {per_core:.0f} per CPU second (the per-core rate scaled below). "
            "Each host must deliver (train step at 40% MFU, global batch 256, hosts = chips / 4):")
      print(f"  {'preset':<8} {'slice':<8} {'hosts':>5} {'batch/host':>10} {'step s':>7} "
            f"{'needed/s':>8} {'vCPUs':>5} {'scaled/s':>9} {'headroom':>8} {'cores needed':>12}")
      worst = []
      for preset, name, hosts, b, step, vcpus, need in needs:
        scaled = per_core * vcpus
        worst.append((scaled / need, rate / cores * vcpus / need))
        print(f"  {preset:<8} {name:<8} {hosts:>5} {b:>10} {step:>7.3f} {need:>8.0f} {vcpus:>5} "
              f"{scaled:>9.0f} {scaled / need:>7.0f}x {need / per_core:>12.1f}")
      low, low_wall = min(worst)
      print(f"  lowest headroom {low:.0f}x ({low_wall:.0f}x from the wall-time rate per core): "
            f"{'meets' if min(low, low_wall) >= 2 else 'MISSES'} the 2x target, assuming the "
            "rate grows linearly with the host's cores (worker processes; docs/data.md)")

    if a.train_step:
      from farmer_jax import configlib
      qs = configlib.load("quickstart")
      big = configlib.load("quickstart")
      big.data.update(name="tfds:bench_256", data_dir=tfds_dir, image_size=256, channels=3,
                      num_classes=10)
      big.model.update(patch_size=16, d_informative=128, flow_width=128, ar_width=128)
      big.eval.update(split="train", mnist_quality=False)
      feed = max(after[i]["rate"] for i, c in enumerate(cases)
                 if c["fields"]["name"] == "tfds:bench_256" and not c["latency_ms"])
      for name, cfg in (("quickstart 32x32", qs), ("256x256 patch 16, toy widths", big)):
        r = step_rate(cfg, a.steps)
        print(f"train step consumes, {name} (batch {cfg.train.batch_size}): {r:8.0f} images/s")
      print(f"(the 256x256 pipeline delivers {feed:.0f} images/s)")
  finally:
    if not a.data:
      shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
