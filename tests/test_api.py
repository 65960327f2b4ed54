"""The Python API (farmer_jax/api.py): README's snippet runs; ``Model.sample`` draws what
`farmer_jax sample` draws and ``Model.bits_per_dim`` is what `farmer_jax eval` computes (one code
path each); encode/decode invert each other; a converted TARFlow VP model samples with its latent
variance; bad arguments are refused with the value and the fix; ``import farmer_jax`` stays
light."""

import json
import os
import re
import subprocess
import sys

import chex
import jax
import ml_collections
import numpy as np
import pytest
from conftest import TINY
from test_eval import run_command

import farmer_jax
from farmer_jax import configlib
from farmer_jax.artifacts import export
from farmer_jax.config.parse import parse_model
from farmer_jax.errors import UserError

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _write_export(out, config, params, student=None):
  meta = {"kind": export.EXPORT_KIND, "format_version": export.FORMAT_VERSION, "step": 0,
          "params": "raw", "dtype": "float32"}
  if student is not None:
    meta["student"] = {"source_workdir": "test", "step": 0, "params": "raw"}
  export.write_export(str(out), params, ml_collections.ConfigDict(config.to_dict()), meta,
                      student_params=student)
  return str(out)


def _noisy(tree, seed, scale):
  """``tree`` + N(0, scale^2) noise, in numpy (conftest.perturb's, without a compile per shape)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: np.asarray(a) + rng.normal(0, scale, a.shape).astype(a.dtype),
                      tree)


def _tiny_config():
  """quickstart:tiny's run config made that of conftest's TINY model (8x8, 3 classes), whose params
  the session has already made."""
  config = configlib.load("quickstart:tiny")
  config.data.update(image_size=8, num_classes=3)
  config.model.update(patch_size=2, ar_depth=2, d_informative=2, mixtures_informative=3,
                      mixtures_redundant=2, flow_class_conditional=TINY.flow_class_conditional,
                      unroll=False, attention="xla")
  assert parse_model(config) == TINY
  return config


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory):
  """conftest's TINY model (8x8, 3 classes; untrained, perturbed) exported twice: 'plain', and
  'student' carrying a distilled-student stand-in (the teacher's AF, perturbed)."""
  root = tmp_path_factory.mktemp("api")
  config, params = _tiny_config(), tiny[2]
  student = _noisy(params["flow"], 7, 0.02)
  return {"plain": _write_export(root / "plain", config, params),
          "student": _write_export(root / "student", config, params, student), "root": root}


def _readme_snippet():
  text = open(README).read()
  section = text[text.index("\n## Python API"):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_snippet_runs(exports, tmp_path, monkeypatch):
  code = _readme_snippet()
  path = re.search(r'farmer_jax\.load\("([^"]+)"\)', code).group(1)
  os.makedirs(tmp_path / os.path.dirname(path))
  os.symlink(exports["plain"], tmp_path / path)
  monkeypatch.chdir(tmp_path)
  ns = {}
  exec(compile(code, README + " (Python API)", "exec"), ns)   # noqa: S102 - our own README
  images, labels = ns["images"], ns["labels"]
  chex.assert_shape(images, (8, 8, 8, 1))
  chex.assert_type(images, np.uint8)
  assert labels.tolist() == [1] * 4 + [2] * 4
  assert np.all(np.isfinite(ns["bpd"])) and ns["bpd"].shape == (8,)
  assert np.array_equal(ns["frames"][0], images[0]) and np.array_equal(ns["frames"][-1], images[4])


def test_decode_inverts_encode(exports):
  from farmer_jax.model import Farmer
  model = farmer_jax.load(exports["student"])
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 3, 8)
  z = model.encode(x, y)
  chex.assert_shape(z, (8, 16, 4))
  chex.assert_type(z, np.float32)
  mcfg, params, _, _ = export.load_model(exports["student"])      # the latents it scores
  forward = jax.jit(lambda p, x, y: Farmer(mcfg).apply({"params": p}, x, y))
  np.testing.assert_allclose(z, forward(params, x, y)["z"], atol=1e-5)
  np.testing.assert_allclose(model.decode(z, y, inverse="exact", as_uint8=False), x, atol=2e-5)
  np.testing.assert_allclose(model.decode(z, y, inverse="jacobi", as_uint8=False), x, atol=1e-3)
  pixels = rng.integers(0, 256, (8, 8, 8, 1), np.uint8)
  assert np.array_equal(model.decode(model.encode(pixels, y), y, inverse="exact"), pixels)
  # the student is another inverse: near the exact one, not it
  fast = model.decode(z, y, inverse="student", as_uint8=False)
  assert 1e-3 < np.abs(fast - x).max() and np.abs(fast - x).mean() < 0.5


def test_interpolation_endpoints_are_the_images(exports):
  model = farmer_jax.load(exports["plain"])
  a, b = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 1), np.uint8)
  frames = model.interpolate(a, b, steps=8, label=2)
  chex.assert_shape(frames, (8, 8, 8, 1))
  chex.assert_type(frames, np.uint8)
  assert np.array_equal(frames[0], a) and np.array_equal(frames[-1], b)
  assert np.mean(frames[4] != a) > 0.5 and np.mean(frames[4] != b) > 0.5


SAMPLE_CASES = [
    pytest.param("plain", ["--cfg=2.0"], dict(cfg=2.0), id="cfg"),
    pytest.param("plain", ["--cfg=1.5", "--sampler=t_sigma=0.8,redundant_pool=per_token"],
                 dict(cfg=1.5, t_sigma=0.8, redundant_pool="per_token"), id="settings",
                 marks=pytest.mark.slow),
    pytest.param("student", ["--inverse=student"], dict(inverse="student"), id="student",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kind,flags,kw", SAMPLE_CASES)
def test_sample_is_what_the_sample_command_draws(exports, tmp_path, kind, flags, kw):
  out = tmp_path / "s.npz"
  run_command("sample", f"--model={exports[kind]}", "--classes=0,2", "--num=3", "--seed=4",
              f"--npz={out}", "--quiet", *flags)
  with np.load(out) as f:
    cli, cli_labels = f["arr_0"], f["labels"]
  model = farmer_jax.load(exports[kind])
  images, labels = model.sample(classes=[0, 2], num=3, seed=4, **kw)
  np.testing.assert_array_equal(labels, cli_labels)
  np.testing.assert_array_equal(images, cli)
  other, _ = model.sample(classes=[0, 2], num=3, seed=5, **kw)
  assert np.mean(other != images) > 0.05


def test_bits_per_dim_follows_the_conventions(exports):
  """docs/math.md by hand: image i dequantized with fold_in(key(seed), i) (draw 0), bits/dim =
  (-log p(x | y) / D - log(1/128)) / ln 2; log_prob is the same number in nats."""
  from farmer_jax.eval.likelihood import dequantize_examples
  from farmer_jax.model import Farmer
  model = farmer_jax.load(exports["plain"])
  rng = np.random.default_rng(2)
  images, y = rng.integers(0, 256, (8, 8, 8, 1), np.uint8), rng.integers(0, 3, 8)
  bpd = model.bits_per_dim(images, y)
  mcfg, params, _, _ = export.load_model(exports["plain"])
  x = dequantize_examples(0, np.arange(8), 0, images)
  forward = jax.jit(lambda p, x, y: Farmer(mcfg).apply({"params": p}, x, y))
  lp = np.asarray(forward(params, x, y)["log_prob"], np.float64)
  np.testing.assert_allclose(bpd, (-lp / 64 + np.log(128)) / np.log(2), rtol=1e-6)
  np.testing.assert_allclose(model.log_prob(images, y), -bpd * 64 * np.log(2), rtol=1e-12)
  assert np.all(model.bits_per_dim(images) != bpd)                   # None: the null class


@pytest.mark.slow  # the eval command over the 500 MNIST-5k test digits, then the API on them
def test_bits_per_dim_is_what_eval_computes(exported, tmp_path):
  from farmer_jax.data.mnist import load_mnist5k
  model_dir = str(exported[1])       # the trained quickstart:tiny run's export (MNIST-5k, 32x32)
  out = tmp_path / "e.json"
  run_command("eval", f"--model={model_dir}", "--split=test", "--seed=3", f"--out={out}",
              "--quiet")
  res = json.loads(out.read_text())
  images, labels = load_mnist5k("test")
  model = farmer_jax.load(model_dir)
  bpd = model.bits_per_dim(images, labels, seed=3)
  assert bpd.shape == (500,) and res["count"] == 500
  assert abs(bpd.mean() - res["bpd"]) < 1e-6
  assert abs(model.bits_per_dim(images, seed=3).mean() - res["bpd_uncond"]) < 1e-6
  np.testing.assert_allclose(model.bits_per_dim(images[:8], labels[:8], seed=3), bpd[:8],
                             atol=1e-6)
  assert np.all(model.bits_per_dim(images[:8], labels[:8], seed=4) != bpd[:8])   # the seed's noise


def test_vp_tarflow_samples_with_its_latent_variance(tmp_path):
  """A converted TARFlow VP model (its var buffer, made torch-free): the API's samples are the AF
  inverse of sqrt(var) * eps, as the CLI's are, not of eps."""
  import dataclasses

  import flax.linen as nn

  from farmer_jax.commands.convert import from_tarflow
  from farmer_jax.config.schema import ModelConfig, SamplerConfig
  from farmer_jax.interop.tarflow import config_for_tarflow, params_to_tarflow
  from farmer_jax.model import make_flow
  from farmer_jax.sampling.sampler import sample_keys, standard_normal_latents
  mcfg = dataclasses.replace(ModelConfig(), **config_for_tarflow(
      in_channels=1, img_size=8, patch_size=2, channels=64, num_blocks=2, layers_per_block=1,
      nvp=False, num_classes=0))
  p = jax.jit(make_flow(mcfg).init)(jax.random.key(0), np.zeros((1, 16, 4), np.float32),
                                    np.zeros((1,), np.int32))["params"]
  p = _noisy(nn.unbox(p), 1, 0.05)
  out_layer = p["blocks"]["proj_out"]                  # VP: no log-scale half
  out_layer["kernel"][..., :4] = 0
  out_layer["bias"][..., :4] = 0
  var = np.random.default_rng(2).uniform(0.2, 3.0, (16, 4)).astype(np.float32)
  np.savez(tmp_path / "vp.npz", **params_to_tarflow(p, mcfg, nvp=False, var=var))
  out = str(tmp_path / "vp")
  assert from_tarflow(str(tmp_path / "vp.npz"), out, say=lambda _: None)["latent_var"]
  model = farmer_jax.load(out)
  images, labels = model.sample(num=4, seed=1, batch=4)
  assert labels.tolist() == [model.null_class] * 4
  keys = sample_keys(1, 0, 4)
  scaled = np.asarray(standard_normal_latents(model.model_config, keys, SamplerConfig(), var))
  eps = np.asarray(standard_normal_latents(model.model_config, keys, SamplerConfig()))
  assert np.mean(model.decode(scaled) == images) > 0.999
  assert np.mean(model.decode(eps) != images) > 0.2


def test_bad_arguments_name_the_value_and_the_fix(exports):
  model = farmer_jax.load(exports["plain"])
  ok = np.zeros((2, 8, 8, 1), np.uint8)

  def refused(match, fn, *a, **kw):
    with pytest.raises(UserError, match=match) as e:
      fn(*a, **kw)
    assert "Fix:" in str(e.value), str(e.value)

  refused(r"shape \(8, 8, 1\).*images\[None\]", model.bits_per_dim, ok[0])
  refused(r"shape \(2, 1, 8, 8\).*transpose\(0, 2, 3, 1\)", model.encode,
          ok.transpose(0, 3, 1, 2))
  refused(r"dtype int64.*astype\(np.uint8\)", model.bits_per_dim, ok.astype(np.int64))
  refused(r"dtype float32; this takes uint8", model.log_prob, ok.astype(np.float32))
  refused(r"labels\[1\] = 11 is out of range: this model has 3 classes \(0..2\)",
          model.bits_per_dim, ok, [1, 11])
  refused(r"labels have shape \(3,\); there are 2 images", model.encode, ok, [1, 2, 3])
  refused(r"classes: 12 is not a class id.*3 classes \(0..2\) and the null class 3",
          model.sample, classes=[1, 12])
  refused(r"num=0 must be an integer >= 1", model.sample, num=0)
  refused(r"inverse='fast' is unknown.*exact, jacobi, student", model.decode,
          np.zeros((1, 16, 4), np.float32), inverse="fast")
  refused(r"inverse=student: .*plain carries no distilled student.*--student=", model.decode,
          np.zeros((1, 16, 4), np.float32), inverse="student")
  refused(r"z has shape \(16, 4\).*z\[None\]", model.decode, np.zeros((16, 4), np.float32))
  refused(r"t_sigma=0(\.0)? must be a finite number > 0.*Fix: pass a valid t_sigma",
          model.sample, t_sigma=0)
  refused(r"tsigma=0.5: unknown sampler setting", model.sample, tsigma=0.5)
  refused(r"cfg='2' is not a finite number", model.sample, cfg="2")
  refused(r"steps=1 must be an integer >= 2", model.interpolate, ok[0], ok[1], steps=1)
  refused(r"neither export.json .* nor config.json", farmer_jax.load, exports["root"])
  refused(r"does not exist", farmer_jax.load, exports["root"] / "missing")


@pytest.mark.slow  # exports the session's trained run (about 35 s), as the eval test above
def test_load_reads_a_training_run_like_its_export(exported):
  workdir, out, _, _ = exported
  run, exp = farmer_jax.load(workdir), farmer_jax.load(out)
  x = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 1), np.uint8)
  np.testing.assert_array_equal(run.bits_per_dim(x, 1), exp.bits_per_dim(x, 1))
  assert "step 200" in repr(run) and run.model_config == exp.model_config


def test_import_farmer_jax_does_not_import_jax():
  code = ("import sys, farmer_jax; assert 'jax' not in sys.modules, 'jax imported'; "
          "assert farmer_jax.load.__module__ == 'farmer_jax.api'; from farmer_jax import cli; "
          "print(sorted(farmer_jax.__all__))")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == "['Model', 'load']"
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    farmer_jax.nope   # noqa: B018
