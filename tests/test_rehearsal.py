"""The paper run rehearsed at reduced width: the ImageNet preset (imagenet256:1.1B/16)
with its structure -- 256x256 RGB, patch 16 (N = 256 tokens of d = 768), the AR GMM prior with
dimension reduction (d_I = 128, K_I = 64, K_R = 200), the 64-token class prefix, FSDP over every
device, resampling CFG -- and only widths, depths, heads, batch, steps and eval/sample sizes made
tiny, run stage by stage through the CLI as the launcher runs it:

  ImageNet-layout folders of real JPEGs of mixed sizes (one CMYK, one grayscale)
  -> `prepare` -> `train` on 8 fake devices in 2 processes (jax.distributed on 127.0.0.1) with a
  gs:// workdir (a local stand-in bucket, tests/fake_gcs.py) -> SIGTERM to both -> the same command
  again resumes to the end (final eval, end-of-run grid) -> `eval` in 2 processes -> `export` ->
  `fid` with a random-weights FID Inception.

Each stage is its own test on shared module fixtures, so a broken stage is named by its test."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import fake_devices_env
from test_multiprocess import _free_port

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLI = os.path.join(HERE, "rehearsal_cli.py")

PRESET = "1.1B/16"
BUCKET = "gs://rehearsal"
WORKDIR = BUCKET + "/run"
DEVICES = 8
SYNSETS = ("n01440764", "n01443537", "n01484850", "n01491361")   # ImageNet's folder names
TRAIN_PER_CLASS, VAL_PER_CLASS = 12, 4
# mixed sizes as in ImageNet: landscape, portrait, square, and short sides below 256 (upscaled)
SIZES = ((500, 375), (375, 500), (256, 256), (200, 150), (640, 427), (333, 290))
STEPS, CKPT_EVERY, PREEMPT_CHECK_EVERY, LOG_EVERY = 6, 2, 2, 2
PER_CLASS = 2          # the end-of-run grid: len(SYNSETS) rows of PER_CLASS 256x256 tiles
# tens of samples, not hundreds: each takes ~4 s here (256 AR steps and 2 x 256 AF inverse steps,
# sequential, plus its Inception features)
FID_NUM, FID_BATCH = 32, 16
FID_PROCESSES = 2      # the fid stage's process count (each process gets DEVICES / processes)
TIMEOUT = 900

# Only sizes differ from the preset: widths, depths, heads, batch, steps, schedule, data, eval and
# sample sizes; FSDP shards every param of the tiny model (the preset shards those >= 2^16).
TINY_MODEL = dict(flow_blocks=2, flow_layers=1, flow_width=32, flow_heads=2, ar_depth=1,
                  ar_width=32, ar_heads=2)
TINY = (f"--config.data.num_classes={len(SYNSETS)}",
        *(f"--config.model.{k}={v}" for k, v in TINY_MODEL.items()),
        f"--config.train.steps={STEPS}", "--config.train.warmup_steps=2",
        f"--config.train.ckpt_every={CKPT_EVERY}", f"--config.train.log_every={LOG_EVERY}",
        f"--config.train.preempt_check_every={PREEMPT_CHECK_EVERY}",
        "--config.eval.batch_size=16", f"--config.sample.per_class={PER_CLASS}",
        "--config.fsdp.min_params=256")


class Chain:
  """The rehearsal's folders: the fake bucket, an empty working directory the commands run in,
  their logs; and the way every stage runs the CLI."""

  def __init__(self, base):
    self.base = base
    self.bucket = os.path.join(base, "bucket")
    self.cwd = os.path.join(base, "cwd")
    self.logs = os.path.join(base, "logs")
    for d in (self.bucket, self.cwd, self.logs):
      os.makedirs(d)

  def local(self, url):
    """The file behind a gs:// URL in the fake bucket."""
    return os.path.join(self.bucket, url[len("gs://"):])

  def launch(self, name, args, processes=1):
    """Starts ``farmer_jax ARGS`` in ``processes`` processes (DEVICES / processes fake devices
    each; with several, --distributed=explicit on a fresh 127.0.0.1 port); returns the Popens,
    whose output goes to logs/NAME-I.{out,err}."""
    env = dict(fake_devices_env(DEVICES // processes), FAKE_GCS_ROOT=self.bucket)
    addr = f"127.0.0.1:{_free_port()}"
    procs = []
    for i in range(processes):
      dist = (["--distributed=explicit", f"--coordinator_address={addr}",
               f"--num_processes={processes}", f"--process_id={i}"] if processes > 1 else [])
      out = open(os.path.join(self.logs, f"{name}-{i}.out"), "w")
      err = open(os.path.join(self.logs, f"{name}-{i}.err"), "w")
      procs.append(subprocess.Popen([sys.executable, CLI, *args, *dist], stdout=out, stderr=err,
                                    cwd=self.cwd, env=env))
      out.close()
      err.close()
    return procs

  def wait(self, name, procs, timeout=TIMEOUT):
    """Waits for every process (killing all of them once one fails or the time is up); asserts
    each exited 0; returns process 0's stdout."""
    deadline = time.time() + timeout
    try:
      while any(p.poll() is None for p in procs):
        if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
          break
        time.sleep(0.2)
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
    for i, p in enumerate(procs):
      assert p.returncode == 0, (f"{name} process {i} exited {p.returncode}:\n"
                                 + self.log(name, i, "err")[-4000:])
    return self.log(name, 0, "out")

  def run(self, name, args, processes=1, timeout=TIMEOUT):
    return self.wait(name, self.launch(name, args, processes), timeout)

  def log(self, name, i, kind):
    with open(os.path.join(self.logs, f"{name}-{i}.{kind}")) as f:
      return f.read()

  def no_stray_local_bucket(self):
    """A gs:// path turned into a local one ($PWD/gs:/...) would land in the working directory."""
    assert os.listdir(self.cwd) == [], os.listdir(self.cwd)


def _photo(rng, size, c, mode):
  """A photo-like image of class ``c``: smooth class-coloured gradients plus noise."""
  w, h = size
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  base = np.stack([np.sin(6 * xx + c), np.cos(5 * yy - c), np.sin(3 * (xx + yy) + 2 * c)], -1)
  img = Image.fromarray(np.clip(127.5 + 90 * base + rng.normal(0, 20, (h, w, 3)), 0,
                                255).astype(np.uint8))
  return img.convert(mode)


def _image_folders(base):
  """ImageNet's layout: train/<synset>/<synset>_<n>.JPEG and the validation images arranged into
  the same synset folders; one CMYK and one grayscale JPEG, as ImageNet has."""
  rng = np.random.default_rng(0)
  n = 0
  for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
    for c, synset in enumerate(SYNSETS):
      os.makedirs(os.path.join(base, split, synset))
      for i in range(count):
        mode = "CMYK" if n == 5 else "L" if n == 9 else "RGB"
        _photo(rng, SIZES[n % len(SIZES)], c, mode).save(
            os.path.join(base, split, synset, f"{synset}_{n}.JPEG"), quality=90)
        n += 1
  return os.path.join(base, "train"), os.path.join(base, "val")


def _train_args(data_dir):
  return [
      "train", f"--config=imagenet256:{PRESET},batch={DEVICES},"
      f"data=tfds:rehearsal,data_dir={data_dir},resize=none", f"--workdir={WORKDIR}",
      f"--compilation_cache_dir={BUCKET}/xla_cache", *TINY]


def _checkpoint_steps(chain):
  d = chain.local(WORKDIR + "/checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  return Chain(str(tmp_path_factory.mktemp("rehearsal")))


@pytest.fixture(scope="module")
def prepared(chain):
  """`farmer_jax prepare` of the image folders: (data_dir, its report)."""
  train, val = _image_folders(os.path.join(chain.base, "images"))
  data_dir = os.path.join(chain.base, "tfds")
  chain.run("prepare", ["prepare", f"--folder={train}", f"--val_folder={val}",
                        f"--data_dir={data_dir}", "--name=rehearsal", "--image_size=256",
                        "--workers=2"])
  with open(os.path.join(data_dir, "rehearsal", "1.0.0", "farmer_jax_prepare.json")) as f:
    return data_dir, json.load(f)


@pytest.fixture(scope="module")
def trained(chain, prepared):
  """2-process training, SIGTERM to both once a checkpoint exists, the same command again to the
  end: (step the preempted run saved, its stdout, the resumed run's stdout)."""
  args = _train_args(prepared[0])
  procs = chain.launch("train", args, processes=2)
  deadline = time.time() + TIMEOUT
  while (not _checkpoint_steps(chain) and time.time() < deadline
         and all(p.poll() is None for p in procs)):
    time.sleep(0.2)
  if not _checkpoint_steps(chain):
    chain.wait("train", procs, timeout=0)   # stops them; reports a failed one
    pytest.fail(f"no checkpoint within {TIMEOUT} s or before training ended: "
                + chain.log("train", 0, "out"))
  for p in procs:
    p.send_signal(signal.SIGTERM)
  first = chain.wait("train", procs)
  m = re.search(r"preempted at step (\d+); checkpoint saved", first)
  assert m, first
  saved = int(m.group(1))
  resumed = chain.run("resume", args, processes=2)
  return saved, first, resumed


def test_prepare_imagenet_layout(chain, prepared):
  data_dir, report = prepared
  val = VAL_PER_CLASS * len(SYNSETS)
  assert report["classes"] == list(SYNSETS), report
  assert report["counts"] == {"train": dict.fromkeys(SYNSETS, TRAIN_PER_CLASS),
                              "validation": dict.fromkeys(SYNSETS, VAL_PER_CLASS)}, report
  assert report["skipped"] == [], report   # the CMYK and the grayscale JPEG were converted
  import tensorflow_datasets as tfds
  src = tfds.data_source("rehearsal", split="validation", data_dir=data_dir, download=False)
  assert len(src) == val and src[0]["image"].shape == (256, 256, 3)
  chain.no_stray_local_bucket()


def test_train_two_processes_sigterm_then_resume(chain, trained):
  saved, first, resumed = trained
  assert CKPT_EVERY <= saved < STEPS and saved % PREEMPT_CHECK_EVERY == 0, first
  assert f"at step {saved};" in resumed, resumed          # "resumed from ... at step S; ..."
  assert "FARMER:" in first and "N=256 tokens of d=768, dimred=farmer" in first, first
  run = chain.local(WORKDIR)
  steps = _checkpoint_steps(chain)
  assert saved in steps and steps[-1] == STEPS, steps
  # both processes' input positions are in the preemption checkpoint
  data = os.path.join(run, "checkpoints", str(saved), "data")
  assert sorted(f for f in os.listdir(data) if f.startswith("process_")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  with open(os.path.join(run, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if "train/loss" in r]
  # one row per logged step, the preempted run's up to S and the resumed run's after it
  assert [r["step"] for r in train_rows] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), rows
  assert all(np.isfinite(r["train/loss"]) for r in train_rows), rows
  with open(os.path.join(run, "summary.json")) as f:
    summary = json.load(f)
  assert summary["steps"] == STEPS
  assert summary["test_count"] == VAL_PER_CLASS * len(SYNSETS)
  assert 0 < summary["test_bpd"] < 16 and 0 < summary["test_bpd_uncond"] < 16, summary
  assert [r["step"] for r in rows if "eval/bpd" in r] == [STEPS], rows
  assert os.listdir(chain.local(BUCKET + "/xla_cache")), "the compilation cache is in the bucket"
  chain.no_stray_local_bucket()


def test_end_of_run_grid(chain, trained):
  with Image.open(chain.local(WORKDIR + "/samples.png")) as grid:
    size, mode = grid.size, grid.mode
  pad = 2   # sampling/images.py grid_image
  assert size == (PER_CLASS * (256 + pad) + pad, len(SYNSETS) * (256 + pad) + pad), size
  assert mode == "RGB"


def test_eval_two_processes(chain, trained):
  chain.run("eval", ["eval", f"--workdir={WORKDIR}"], processes=2)
  with open(chain.local(WORKDIR + "/eval/bpd_validation.json")) as f:
    r = json.load(f)
  assert r["processes"] == 2 and r["devices"] == DEVICES and r["step"] == STEPS, r
  assert r["count"] == VAL_PER_CLASS * len(SYNSETS), r
  with open(chain.local(WORKDIR + "/summary.json")) as f:
    summary = json.load(f)
  # the same params, split, seed, draws and batch as training's final eval
  assert abs(r["bpd"] - summary["test_bpd"]) <= 1e-4 * summary["test_bpd"], (r, summary)
  assert abs(r["bpd_uncond"] - summary["test_bpd_uncond"]) <= 1e-4 * summary["test_bpd_uncond"]
  chain.no_stray_local_bucket()


@pytest.fixture(scope="module")
def exported(chain, trained):
  """`farmer_jax export` of the 2-process run, in one process (a local directory: export refuses
  a bucket)."""
  model = os.path.join(chain.base, "model")
  out = chain.run("export", ["export", f"--workdir={WORKDIR}", f"--out={model}"])
  assert f"exported step {STEPS}" in out, out
  return model


def test_fid_random_inception(chain, exported):
  from test_inception import random_state_dict
  weights = os.path.join(chain.base, "inception_random.npz")
  np.savez(weights, **random_state_dict(0))
  chain.run("fid", ["fid", f"--model={exported}", f"--num={FID_NUM}", f"--batch={FID_BATCH}",
                    f"--inception={weights}", "--ref=split:train",
                    f"--compilation_cache_dir={BUCKET}/xla_cache"], processes=FID_PROCESSES)
  results = glob.glob(os.path.join(exported, "eval", "fid_*.json"))   # next to the model
  assert len(results) == 1, results
  with open(results[0]) as f:
    r = json.load(f)
  assert r["count"] == FID_NUM and r["num"] == FID_NUM, r
  assert np.isfinite(r["fid"]) and r["fid"] > 0, r
  assert r["guidance"] == "resampling" and r["cfg"] == 2.5, r   # the preset's sampler
  chunks = glob.glob(os.path.join(r["dump"], "chunk_*.npz"))
  assert len(chunks) == -(-FID_NUM // FID_BATCH), chunks
  chain.no_stray_local_bucket()


def test_preset_sampler_fits_in_memory():
  """The preset's own sampler (Algorithm 1's shared redundant pool of 256 + 256 candidates per
  image), and its per-token pools (16 + 16 per token), at the rehearsal's model must keep their
  temporaries within 0.5 GB per sample, so that the grid's 8 samples fit a 4 GB host here (and a
  chip's sample batch fits its HBM on a pod: K_R and d_R are the full model's). Compiled, not
  run."""
  import jax
  import jax.numpy as jnp

  from farmer_jax import configlib
  from farmer_jax.config.parse import parse_model
  from farmer_jax.config.schema import SamplerConfig
  from farmer_jax.model import abstract_params
  from farmer_jax.sampling.sampler import sample_latents
  c = configlib.load(f"imagenet256:{PRESET}")
  c.data.num_classes = len(SYNSETS)
  c.model.update(**TINY_MODEL)
  mcfg, preset = parse_model(c), SamplerConfig.from_config(c.sample)
  assert (preset.guidance, preset.redundant_pool, preset.redundant_candidates) == (
      "resampling", "shared", mcfg.num_tokens)
  samples = 2
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), samples))
  for sampler in (preset, preset._replace(redundant_pool="per_token", redundant_candidates=16)):
    compiled = jax.jit(lambda p, k, y, s=sampler: sample_latents(mcfg, p, k, y, s)).lower(
        abstract_params(mcfg), keys, jax.ShapeDtypeStruct((samples,), jnp.int32)).compile()
    per_sample = compiled.memory_analysis().temp_size_in_bytes / samples
    assert per_sample <= 0.5e9, (f"{sampler.redundant_pool}: {per_sample / 1e9:.2f} GB of "
                                 "temporaries per sample")
