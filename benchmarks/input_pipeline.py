"""Input pipeline throughput vs the train step's consumption, measured side by side in one run.

  python benchmarks/input_pipeline.py [--images 2000] [--batch 32] [--workers 0,2]

1. Makes ~2k real-looking JPEG photos at run time from the bundled MNIST-5k digits (upscaled to
   ~300x340 with random aspect, coloured foreground/background, sensor-like noise; 10 class
   folders), then ``farmer_jax prepare`` writes them as a 256x256 TFDS ArrayRecord dataset.
2. Images/s of the grain pipeline alone (read, decode JPEG, flip, batch; no model) with 0 and 2
   worker processes, and of the quickstart's own pipeline (mnist5k, 32x32).
3. Images/s the jitted train step consumes at the quickstart (32x32) and at a 256x256 config (the
   ImageNet patch-16 geometry, N = 256 tokens of d = 768, with toy widths so it runs on a CPU).
Prints every rate and, per image size, the ratio pipeline / consumption: the input must never be
the bottleneck (ratio > 1).
"""

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
from absl import flags
from PIL import Image


def make_photos(root, n, seed=0):
  from farmer_jax.data.mnist import load_mnist5k
  digits, labels = load_mnist5k("train", pad_to=28)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(digits))   # the csv is sorted by class
  for i in range(n):
    j = order[i % len(order)]
    d = digits[j, ..., 0].astype(np.float32) / 255.0
    h, w = int(rng.integers(280, 360)), int(rng.integers(280, 420))
    big = np.asarray(Image.fromarray((d * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC))
    a = big.astype(np.float32)[..., None] / 255.0
    fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = a * fg + (1 - a) * bg + rng.normal(0, 8, (h, w, 3))
    c = str(int(labels[j]))
    os.makedirs(os.path.join(root, c), exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
        os.path.join(root, c, f"{i:05d}.jpg"), quality=90)


def pipeline_rate(data, batch, batches):
  from farmer_jax.data.pipeline import TrainInput
  inp = TrainInput(data, batch, seed=0)
  for _ in range(3):          # start-up (worker processes, first reads) is not the steady rate
    next(inp)
  t0 = time.perf_counter()
  for _ in range(batches):
    b = next(inp)
  dt = time.perf_counter() - t0
  inp.close()
  assert b["image"].shape == (batch, data.image_size, data.image_size, data.channels)
  return batches * batch / dt


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
  ap.add_argument("--images", type=int, default=2000)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--batches", type=int, default=30)
  ap.add_argument("--workers", default="0,2")
  ap.add_argument("--steps", type=int, default=10)
  a = ap.parse_args()
  flags.FLAGS.mark_as_parsed()   # grain worker processes read an absl flag
  from farmer_jax import configlib
  from farmer_jax.config.schema import DataConfig
  from farmer_jax.data.prepare import Options, prepare
  tmp = tempfile.mkdtemp(prefix="farmer_input_bench_")
  try:
    t0 = time.perf_counter()
    make_photos(os.path.join(tmp, "photos"), a.images)
    t1 = time.perf_counter()
    prepare(Options(folder=os.path.join(tmp, "photos"), data_dir=os.path.join(tmp, "tfds"),
                    name="bench_photos", image_size=256, workers=2))
    t2 = time.perf_counter()
    print(f"made {a.images} JPEG photos (~300x340) in {t1 - t0:.1f} s; prepare -> 256x256 "
          f"ArrayRecord: {a.images / (t2 - t1):.0f} images/s (2 workers)")
    data = DataConfig(name="tfds:bench_photos", data_dir=os.path.join(tmp, "tfds"),
                      image_size=256, channels=3, num_classes=10, random_flip=True)
    rates = {}
    for w in (int(x) for x in a.workers.split(",")):
      d = DataConfig(**{**data.__dict__, "worker_count": w})
      rates[w] = pipeline_rate(d, a.batch, a.batches)
      print(f"pipeline alone, {w} worker process(es), 2 read threads: {rates[w]:8.0f} images/s")
    qs = configlib.load("quickstart")
    mnist = pipeline_rate(DataConfig.from_section(qs.data), a.batch, a.batches * 4)
    print(f"pipeline alone, quickstart mnist5k 32x32, 0 workers: {mnist:8.0f} images/s")
    big = configlib.load("quickstart")
    big.data.update(name="tfds:bench_photos", data_dir=os.path.join(tmp, "tfds"),
                    image_size=256, channels=3, num_classes=10)
    big.model.update(patch_size=16, d_informative=128, flow_width=128, ar_width=128)
    big.eval.split = "train"
    for name, feed, cfg in (("quickstart 32x32", mnist, qs),
                            ("256x256 patch 16, toy widths", max(rates.values()), big)):
      r = step_rate(cfg, a.steps)
      print(f"train step consumes, {name} (batch {cfg.train.batch_size}): {r:8.0f} images/s -> "
            f"pipeline/consumption = {feed / r:.1f}x "
            f"({'OK: input is not the bottleneck' if feed > r else 'BOTTLENECK'})")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
