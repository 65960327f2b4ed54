"""`farmer_jax eval` and the jitted likelihood loop (eval/likelihood.py, eval/evaluate.py)."""

import json
import math
import os
import subprocess
import sys

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, fake_devices_env, init_farmer
from farmer_jax import conventions
from farmer_jax.errors import UserError
from farmer_jax.eval.likelihood import dequantize_examples, evaluate_bpd, summarize

HERE = os.path.dirname(__file__)


def reference_nats(model, params, images, labels, seed=0, samples=1):
  """The slow reference path: one example at a time, unbatched and unjitted, the model's
  ``log_prob`` for the true label and the null label -> {'log_prob', 'log_prob_uncond'}: (n, K)
  nats. Same per-example dequantization keys as the eval step."""
  cfg = model.cfg
  out = {"log_prob": [], "log_prob_uncond": []}
  for i in range(len(images)):
    row_c, row_u = [], []
    for k in range(samples):
      x = dequantize_examples(seed, jnp.asarray([i]), k, images[i:i + 1], cfg.pixels)
      y = jnp.asarray(labels[i:i + 1], jnp.int32) if cfg.num_classes else None
      null = jnp.full((1,), cfg.null_class, jnp.int32)
      row_u.append(float(model.apply({"params": params}, x, null)["log_prob"][0]))
      row_c.append(float(model.apply({"params": params}, x, y)["log_prob"][0])
                   if y is not None else row_u[-1])
    out["log_prob"].append(row_c)
    out["log_prob_uncond"].append(row_u)
  return {t: np.asarray(v) for t, v in out.items()}


@pytest.fixture(scope="module")
def sharded(exported, tmp_path_factory):
  """The eval worker's outputs (8 fake devices in a subprocess; ~60-90 s on 2 cores: its tests are
  marked slow, CI runs them)."""
  _, export_dir, _, _ = exported
  out = tmp_path_factory.mktemp("eval8")
  env = fake_devices_env(8)
  r = subprocess.run([sys.executable, os.path.join(HERE, "eval_worker.py"), str(out),
                      str(export_dir)], capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  return out, r.stdout


@pytest.mark.slow
def test_sharded_eval_equals_the_per_example_reference(sharded):
  """13 images (divisible neither by the global batch 8 nor by the 8 devices), K = 2 draws: the
  sharded, padded, jitted loop gives every example exactly once, with the same log-density as the
  slow path (one example at a time, no padding, no sharding, no jit), and its bpd is their mean."""
  out, _ = sharded
  got = np.load(out / "per_example.npz")
  model, params = init_farmer(TINY)
  rng = np.random.default_rng(0)           # the worker's images and labels
  images = rng.integers(0, 256, (13, 8, 8, 1), dtype=np.uint8)
  labels = rng.integers(0, 3, 13).astype(np.int32)
  ref = reference_nats(model, params, images, labels, seed=3, samples=2)
  for term in ("log_prob", "log_prob_uncond"):
    chex.assert_shape(got[term], (13, 2))
    np.testing.assert_allclose(got[term], ref[term], rtol=2e-5, atol=1e-3)
  for term, key in (("log_prob", "bpd"), ("log_prob_uncond", "bpd_uncond")):
    per_image = conventions.bits_per_dim(-ref[term] / TINY.num_dims).mean(axis=1)
    np.testing.assert_allclose(float(got[key]), per_image.mean(), rtol=1e-6)
  # the two draws differ (fresh noise per draw) and the labels matter
  assert np.all(np.abs(ref["log_prob"][:, 0] - ref["log_prob"][:, 1]) > 0)
  assert np.abs(ref["log_prob"] - ref["log_prob_uncond"]).max() > 1e-3


@pytest.mark.slow
def test_eval_command_on_8_devices_equals_one_device(sharded, exported):
  """`farmer_jax eval --model=EXPORT --batch=48` on 8 devices (500 test images: a padded last batch)
  reports the same numbers as the loop on this process's one device with another batch size:
  per-example noise keys make the result independent of batching and devices."""
  out, stdout = sharded
  r = json.loads((out / "cli.json").read_text())
  assert r["count"] == 500 and r["devices"] == 8 and r["batch_size"] == 48
  assert "class-conditional -log p(x|y)" in stdout
  workdir, _, _, tr = exported
  from farmer_jax.data.mnist import load_mnist5k
  images, labels = load_mnist5k("test")
  ref = evaluate_bpd(tr.model, tr.eval_params(), images, labels, batch_size=100)
  for key in ("bpd", "bpd_uncond", "bpd_se"):
    np.testing.assert_allclose(r[key], ref[key], rtol=1e-6)
  terms = r["terms"]
  assert math.isclose(sum(terms.values()), r["bpd"], rel_tol=1e-6)


def test_summary_statistics_on_known_values():
  """summarize(): mean over images and draws, s.e. from the per-image means, the IW bound and the
  terms, on hand-made log-densities."""
  d = 4
  lp = np.array([[-4.0, -8.0], [-12.0, -12.0], [-2.0, -6.0]])        # (n=3, K=2) nats
  per = {"log_prob": lp, "logdet": lp * 0.5, "log_prob_i": lp * 0.25, "log_prob_r": lp * 0.25}
  per.update({k + "_uncond": v for k, v in list(per.items())})
  r = summarize(per, d)
  per_image = (-lp / d).mean(axis=1)                                 # 1.5, 3, 1
  assert math.isclose(r["nats_per_dim"], per_image.mean())
  assert math.isclose(r["bpd"], (per_image.mean() + math.log(128)) / math.log(2))
  assert math.isclose(r["bpd_se"], per_image.std(ddof=1) / math.sqrt(3) / math.log(2))
  iw = -(np.logaddexp(lp[:, 0], lp[:, 1]) - math.log(2)) / d
  assert math.isclose(r["bpd_iw"], (iw.mean() + math.log(128)) / math.log(2))
  assert r["bpd_iw"] <= r["bpd"]                                     # Jensen: a tighter bound
  assert math.isclose(sum(r["terms"].values()), r["bpd"], rel_tol=1e-12)
  assert r["terms"]["af_logdet"] == pytest.approx(0.5 * r["nats_per_dim"] / math.log(2))


def test_eval_is_independent_of_the_batch_size(tiny):
  """Per-example dequantization keys: batch 5 and batch 13 give the same per-example values."""
  cfg, model, params = tiny
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (13, 8, 8, 1), dtype=np.uint8)
  labels = rng.integers(0, 3, 13).astype(np.int32)
  a = evaluate_bpd(model, params, images, labels, 5, seed=2, per_example=True)
  b = evaluate_bpd(model, params, images, labels, 13, seed=2, per_example=True)
  np.testing.assert_allclose(a["per_example"]["log_prob"], b["per_example"]["log_prob"],
                             rtol=1e-5)
  assert a["count"] == b["count"] == 13


def run_command(cmd, *args):
  """Runs ``farmer_jax <cmd> <args>``'s main in this process (its exceptions propagate)."""
  from farmer_jax import cli
  fv = cli.flag_values(cmd)
  fv([f"farmer_jax {cmd}", *args])
  return cli.COMMANDS[cmd].main(fv)


def test_eval_command_refuses_bad_input(exported, tmp_path):
  from absl import app

  from farmer_jax.eval.evaluate import load_params
  _, export_dir, _, _ = exported
  model = f"--model={export_dir}"
  with pytest.raises(UserError, match="--dequant_samples=0 must be >= 1"):
    run_command("eval", model, "--dequant_samples=0", "--quiet")
  with pytest.raises(Exception, match="'nope'.*splits"):
    run_command("eval", model, "--split=nope", "--quiet")
  with pytest.raises(app.UsageError, match="exactly one of --workdir"):
    run_command("eval", "--quiet")
  with pytest.raises(UserError, match="exactly one of --workdir"):
    load_params(say=lambda _: None)
  with pytest.raises(UserError, match=r"\*\.json"):
    run_command("eval", model, f"--out={tmp_path / 'x.txt'}", "--quiet")
  assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------- sample quality


class _CountingNet:
  """A cheap deterministic feature network (pixel means per image quadrant and a 3-way 'logit');
  can be told to fail on its k-th call (an interrupted run)."""

  def __init__(self, fail_at=None):
    self.calls, self.fail_at = 0, fail_at

  def __call__(self, images):
    self.calls += 1
    if self.fail_at is not None and self.calls == self.fail_at:
      raise KeyboardInterrupt("interrupted")
    x = np.asarray(images, np.float32) / 255.0
    h = x.shape[1] // 2
    pool = np.stack([x[:, :h, :h].mean((1, 2, 3)), x[:, :h, h:].mean((1, 2, 3)),
                     x[:, h:, :h].mean((1, 2, 3)), x[:, h:, h:].mean((1, 2, 3))], axis=1)
    return {"pool": pool, "logits": pool[:, :3] * 10.0}


@pytest.mark.slow  # moved out of the default suite to keep it <= 10 min on 2 cores
def test_feature_dump_resumes_an_interrupted_run_with_the_same_samples(tiny, tmp_path):
  """sample_features with a dump: interrupted after 2 batches, the same call continues from the
  chunks on disk (with another --batch: sample j is the same in any chunking) and the features
  equal an uninterrupted run's; a dump made with other settings is refused, nothing mixed."""
  from farmer_jax.config.schema import SamplerConfig
  from farmer_jax.eval import fid
  cfg, _, params = tiny
  s = SamplerConfig()
  sig = {"seed": 5, "num": 11}
  say = lambda _: None   # noqa: E731
  full = fid.sample_features(cfg, params, s, 11, fid.FeatureNet("t", _CountingNet(), {}), seed=5,
                             batch=4, progress=False, say=say)
  dump = str(tmp_path / "dump")
  with pytest.raises(KeyboardInterrupt):
    fid.sample_features(cfg, params, s, 11, fid.FeatureNet("t", _CountingNet(fail_at=3), {}),
                        seed=5, batch=4, dump=dump, signature=sig, progress=False, say=say)
  assert sorted(f for f in os.listdir(dump) if f.startswith("chunk_")) == [
      "chunk_000000000.npz", "chunk_000000004.npz"]
  net = _CountingNet()
  again = fid.sample_features(cfg, params, s, 11, fid.FeatureNet("t", net, {}), seed=5, batch=3,
                              dump=dump, signature=sig, progress=False, say=say)
  assert net.calls == 1                      # only samples 8..10 were drawn
  np.testing.assert_allclose(again["pool"], full["pool"], rtol=1e-6)
  np.testing.assert_array_equal(again["labels"], np.arange(11) % 3)
  with pytest.raises(UserError, match=r"other settings \(seed differ\).*nothing was changed"):
    fid.sample_features(cfg, params, s, 11, fid.FeatureNet("t", _CountingNet(), {}), seed=6,
                        batch=4, dump=dump, signature=dict(sig, seed=6), progress=False, say=say)
  os.remove(os.path.join(dump, fid.DUMP_MANIFEST))   # chunks nobody can vouch for: refused
  with pytest.raises(UserError, match="feature chunks but no manifest.json"):
    fid.sample_features(cfg, params, s, 11, fid.FeatureNet("t", _CountingNet(), {}), seed=5,
                        batch=4, dump=dump, signature=sig, progress=False, say=say)
  assert not os.path.exists(os.path.join(dump, fid.DUMP_MANIFEST))


def test_score_uses_the_reference_and_the_metrics():
  """fid.score: FID 0 against its own statistics, precision/recall 1 against its own features."""
  from farmer_jax.eval import fid, metrics
  rng = np.random.default_rng(0)
  pool = rng.normal(size=(200, 8))
  logits = rng.normal(size=(200, 5))
  mu, sigma = metrics.feature_statistics(pool)
  r = fid.score(pool, logits, fid.Reference(mu, sigma, pool, "self"))
  assert abs(r["fid"]) < 1e-6 and r["precision"] == 1.0 and r["recall"] == 1.0
  r2 = fid.score(pool + 3.0, logits, fid.Reference(mu, sigma, None, "stats only"))
  assert r2["fid"] == pytest.approx(8 * 9.0, rel=1e-6) and "precision" not in r2
  with pytest.raises(UserError, match="same network"):
    fid.score(pool[:, :4], logits, fid.Reference(mu, sigma, None, "x"))


@pytest.mark.slow
def test_fid_command_mnist_features_end_to_end(exported, tmp_path):
  """`farmer_jax fid --features=mnist` on the tiny export: JSON with FID, IS, precision/recall and
  class consistency; a second run reuses the dump (no sampling) and gives the same numbers."""
  _, export_dir, _, _ = exported
  out = str(tmp_path / "fid.json")
  run_command("fid", f"--model={export_dir}", "--num=20", "--features=mnist", "--batch=10",
              f"--out={out}", "--quiet")
  r = json.loads(open(out).read())
  assert r["fid"] > 0 and r["num"] == 20
  assert 0 <= r["class_consistency"] <= 1 and len(r["class_consistency_per_class"]) == 10
  assert {"precision", "recall", "inception_score"} <= set(r)
  run_command("fid", f"--model={export_dir}", "--num=20", "--features=mnist", "--batch=7",
              f"--out={out}", "--quiet")
  again = json.loads(open(out).read())
  assert again["fid"] == pytest.approx(r["fid"], rel=1e-9)


@pytest.mark.slow
def test_training_reports_mnist_sample_quality(tmp_path):
  """config.eval.mnist_quality: the end-of-training report scores samples at cfg 0 and at the
  config's own guidance (summary.json, metrics.jsonl eval/* and the console line)."""
  from farmer_jax import configlib
  from farmer_jax.eval.mnist_quality import format_quality
  from farmer_jax.config.parse import parse
  from farmer_jax.train.trainer import train_and_report
  c = configlib.load("quickstart:tiny")
  c.train.steps = 20
  c.eval.update(mnist_quality=True, quality_per_class=3)
  c.sample.update(guidance="resampling", cfg=2.0)
  summary, _ = train_and_report(parse(c, str(tmp_path)), str(tmp_path), quiet=True)
  q = summary["sample_quality"]
  assert q["samples_per_class"] == 3 and q["classifier_test_accuracy"] > 0.95
  for name in ("cfg0", "resampling_cfg2"):
    r = q[name]
    assert r["count"] == 30 and np.isfinite(r["mnist_fid"]) and 0 <= r["class_consistency"] <= 1
    assert len(r["class_consistency_per_class"]) == 10
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  (ev,) = [r for r in rows if "eval/bpd" in r]
  assert ev["eval/cfg0_mnist_fid"] == q["cfg0"]["mnist_fid"]
  assert "resampling_cfg2: MNIST-FID" in format_quality(q)
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["sample_quality"]["cfg0"]["class_consistency"] == q["cfg0"]["class_consistency"]


def test_mnist_quality_needs_class_conditional_mnist():
  from farmer_jax import configlib
  from farmer_jax.errors import ConfigError
  from farmer_jax.config.parse import parse
  c = configlib.load("quickstart:tiny")
  c.eval.mnist_quality = True
  parse(c)
  c.data.num_classes = 0
  with pytest.raises(ConfigError, match="eval.mnist_quality.*10 classes.*0 classes"):
    parse(c)
