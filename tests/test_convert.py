"""`farmer_jax convert` (commands/convert.py, interop/convert.py): a TARFlow checkpoint becomes an
export that `sample` and `eval` use exactly as TARFlow would (AF + N(0, I) prior, TARFlow's pixel
mapping, its guided reverse, a VP model's latent variance), `--to=tarflow` writes it back, and
`train.init_flow` starts FARMER's AF from it. The torch tests compare with
``tarflow_reference.TARFlowReference`` (random non-zero weights); the rest needs no torch.
"""

import math
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from farmer_jax import conventions
from farmer_jax.artifacts import export
from farmer_jax.commands.convert import from_tarflow, to_tarflow
from farmer_jax.config.schema import SamplerConfig
from farmer_jax.errors import UserError
from farmer_jax.eval.likelihood import dequantize_examples, evaluate_bpd
from farmer_jax.interop import convert
from farmer_jax.interop.tarflow import config_for_tarflow, params_to_tarflow, patch_permutation
from farmer_jax.model import Farmer, init_params
from farmer_jax.sampling.sampler import sample_images, sample_keys, standard_normal_latents

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# a conditional 1-channel TARFlow: 8x8 images, patch 2 (16 tokens of 4), width 64, 2 blocks x 1
HP = dict(in_channels=1, img_size=8, patch_size=2, channels=64, num_blocks=2, layers_per_block=1,
          nvp=True, num_classes=3)


def _reference(torch, hp=HP, seed=0, var=None):
  from tarflow_reference import TARFlowReference, randomize_
  torch.manual_seed(seed)
  ref = randomize_(TARFlowReference(**hp).eval(), seed=seed)
  if var is not None:
    ref.var.copy_(torch.from_numpy(var))
  return ref


def _save_pth(torch, ref, path):
  torch.save(ref.state_dict(), str(path))
  return str(path)


def _nchw(x_nhwc):
  return np.array(np.asarray(x_nhwc).transpose(0, 3, 1, 2))


def _tarflow_log_prob(torch, ref, x_nhwc, y):
  """log p(x) in nats, summed, under TARFlow's model: N(0, I) prior + its per-dim log-det * D."""
  with torch.no_grad():
    z, ld = ref(torch.from_numpy(_nchw(x_nhwc)), torch.from_numpy(np.array(y)).long())
  z = z.double().numpy().reshape(z.shape[0], -1)
  d = z.shape[1]
  return (-0.5 * (z ** 2 + math.log(2 * math.pi))).sum(1) + ld.double().numpy() * d


def test_converted_export_is_tarflow(tmp_path):
  torch = pytest.importorskip("torch")
  ref = _reference(torch)
  ckpt = _save_pth(torch, ref, tmp_path / "cond_model_2_64_2_1_0.05.pth")
  out = tmp_path / "model"
  meta = from_tarflow(ckpt, str(out), say=lambda _: None)
  assert meta["tarflow"]["nvp"] and not meta["latent_var"]
  mcfg, params, config, _ = export.load_model(str(out))
  assert (mcfg.prior, mcfg.pixels, mcfg.flow_final_norm) == ("standard_normal", "tarflow", False)
  assert set(params) == {"flow"}                      # no AR prior params
  assert config.sample.denoise_sigma == 0.05          # TARFlow's self-denoising, from the name

  # the likelihood: our model's log_prob == TARFlow's on the same (tarflow-mapped) images
  rng = np.random.default_rng(0)
  v = rng.integers(0, 256, (6, 8, 8, 1), np.uint8)
  y = np.array([0, 1, 2, 0, 1, 2], np.int32)
  x = dequantize_examples(0, jnp.arange(6), 0, v, "tarflow")
  lp = Farmer(mcfg).apply({"params": params}, x, jnp.asarray(y))["log_prob"]
  np.testing.assert_allclose(np.asarray(lp), _tarflow_log_prob(torch, ref, x, y), rtol=1e-5,
                             atol=1e-3)
  # eval: bits/dim with TARFlow's bin width 2/255 (not 1/128) over the same per-example noise
  res = evaluate_bpd(Farmer(mcfg), params, v, y, batch_size=4)
  want = np.mean(-_tarflow_log_prob(torch, ref, x, y) / 64 - math.log(2 / 255)) / math.log(2)
  assert abs(res["bpd"] - want) < 1e-4
  assert abs(res["terms"]["bin_width"] - -math.log2(2 / 255)) < 1e-9
  assert res["terms"]["redundant"] == 0.0

  # sampling: z ~ N(0, I) through TARFlow's guided reverse (CFG 1.5 on a and b, annealed)
  s = SamplerConfig(af_guidance=1.5, af_annealed=True)
  keys = sample_keys(3, 0, 3)
  labels = jnp.asarray([0, 1, 2], jnp.int32)
  imgs = sample_images(mcfg, params, keys, labels, s)
  z = np.asarray(standard_normal_latents(mcfg, keys, s))      # AR order: flip back to the AF's
  z = z[:, ::-1] if mcfg.ar_flip else z
  z_t = torch.from_numpy(np.ascontiguousarray(z[..., np.argsort(patch_permutation(2, 1))]))
  x_t = ref.reverse(z_t, torch.from_numpy(np.array(labels)).long(), guidance=1.5,
                    annealed_guidance=True)
  np.testing.assert_allclose(np.asarray(imgs), x_t.numpy().transpose(0, 2, 3, 1), atol=1e-4)
  plain = sample_images(mcfg, params, keys, labels, SamplerConfig())
  assert np.abs(np.asarray(plain) - np.asarray(imgs)).max() > 1e-2     # guidance did something

  # --to=tarflow gives back the very state_dict (torch.load of a file written without torch)
  back = tmp_path / "back.pth"
  to_tarflow(str(out), str(back), say=lambda _: None)
  sd, sd_back = ref.state_dict(), torch.load(str(back), weights_only=True)
  assert list(sd_back) == list(sd)
  for k in sd:
    np.testing.assert_array_equal(sd_back[k].numpy(), sd[k].numpy(), err_msg=k)


def test_vp_model_keeps_its_latent_variance(tmp_path):
  torch = pytest.importorskip("torch")
  hp = dict(HP, nvp=False, num_classes=0)
  var = np.random.default_rng(1).uniform(0.2, 2.0, (16, 4)).astype(np.float32)
  ref = _reference(torch, hp, var=var)
  ckpt = _save_pth(torch, ref, tmp_path / "vp.pth")
  out = str(tmp_path / "vp")
  meta = from_tarflow(ckpt, out, say=lambda _: None)
  assert meta["latent_var"] and not meta["tarflow"]["nvp"]
  mcfg, params, _, meta = export.load_model(out)
  lv = export.load_latent_var(out, mcfg, meta)
  keys = sample_keys(0, 0, 2)
  null = jnp.full((2,), mcfg.null_class, jnp.int32)
  imgs = sample_images(mcfg, params, keys, null, SamplerConfig(), latent_var=lv)
  z = np.asarray(standard_normal_latents(mcfg, keys, SamplerConfig()))
  z = z[:, ::-1] if mcfg.ar_flip else z
  z_t = torch.from_numpy(np.ascontiguousarray(z[..., np.argsort(patch_permutation(2, 1))]))
  x_t = ref.reverse(z_t, None)                                  # multiplies by sqrt(var) itself
  np.testing.assert_allclose(np.asarray(imgs), x_t.numpy().transpose(0, 2, 3, 1), atol=1e-4)
  back = tmp_path / "vp_back.npz"
  to_tarflow(out, str(back), say=lambda _: None)
  with np.load(back) as f:
    np.testing.assert_array_equal(f["var"], var)
    assert f["blocks.0.proj_out.weight"].shape == (4, 64)         # still the VP layout


def _random_state_dict(hp=HP, seed=0):
  """A TARFlow state_dict from random farmer_jax params (no torch)."""
  import dataclasses

  from farmer_jax.config.schema import ModelConfig
  from farmer_jax.model import make_flow
  mcfg = dataclasses.replace(ModelConfig(), **config_for_tarflow(**hp))
  x = jnp.zeros((1, mcfg.num_tokens, mcfg.token_dim))
  p = make_flow(mcfg).init(jax.random.key(seed), x, jnp.zeros((1,), jnp.int32))["params"]
  p = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(seed + 1), a.shape), p)
  return mcfg, params_to_tarflow(p, mcfg)


def test_convert_refuses_bad_input_and_writes_nothing(tmp_path):
  from farmer_jax import configlib
  _, sd = _random_state_dict()
  ckpt = str(tmp_path / "m.npz")
  np.savez(ckpt, **sd)
  out = tmp_path / "out"
  say = lambda _: None

  def refused(match, **kw):
    with pytest.raises(UserError, match=match):
      from_tarflow(kw.pop("ckpt", ckpt), str(out), say=say, **kw)
    assert sorted(os.listdir(tmp_path)) == sorted(before)

  before = os.listdir(tmp_path)
  refused("does not exist", ckpt=str(tmp_path / "missing.pth"))
  bad = str(tmp_path / "bad.npz")
  np.savez(bad, x=np.zeros(3))
  before = os.listdir(tmp_path)
  refused("not a TARFlow state_dict", ckpt=bad)
  # a config that does not describe the checkpoint: every offending field and its fix
  cfg = configlib.load("tarflow:tiny")
  with pytest.raises(UserError) as e:
    from_tarflow(ckpt, str(out), config=cfg, say=say)
  msg = str(e.value)
  for fix in ("data.image_size=8", "model.patch_size=2", "data.num_classes=3"):
    assert fix in msg, msg
  assert sorted(os.listdir(tmp_path)) == sorted(before)
  nan_sd = dict(sd)
  nan_sd["blocks.1.proj_in.bias"] = np.full_like(sd["blocks.1.proj_in.bias"], np.nan)
  np.savez(str(tmp_path / "nan.npz"), **nan_sd)
  before = os.listdir(tmp_path)
  refused("non-finite", ckpt=str(tmp_path / "nan.npz"))
  refused("pixel mapping|--pixels", pixels="srgb")
  for bad_noise in (-0.1, 0.0, float("nan"), float("inf")):
    refused("--noise_std=.* must be a finite number > 0", noise_std=bad_noise)
  refused("--channels=0 must be an integer >= 1", in_channels=0)
  bad_cfg = configlib.load("tarflow:tiny")
  bad_cfg.data.update(image_size=8, num_classes=3, channels=1)
  bad_cfg.model.update(patch_size=2, flow_blocks=2, flow_layers=1, flow_width=64, flow_heads=1)
  bad_cfg.sample.t_sigma = 0.0            # a sampler setting `sample` would refuse: not written
  refused("t_sigma", config=bad_cfg)
  bad_cfg.sample.t_sigma = 1.0
  bad_cfg.data.channels = 0
  refused("data.channels=0", config=bad_cfg)
  # a FARMER config that describes the AF: its AR guidance is reset (said), pixels by file name
  cfg = configlib.load("quickstart")
  cfg.data.update(image_size=8, num_classes=3)
  cfg.model.update(patch_size=2, flow_blocks=2, flow_layers=1, flow_width=64, flow_heads=1,
                   flow_class_conditional=True, flow_final_norm=False)
  said = []
  uniform = str(tmp_path / "x_model_2_64_2_1_uniform.npz")
  np.savez(uniform, **sd)
  from_tarflow(uniform, str(tmp_path / "farmer_cfg"), config=cfg, say=said.append)
  _, _, saved, _ = export.load_model(str(tmp_path / "farmer_cfg"))
  assert (saved.sample.guidance, saved.model.pixels) == ("none", "farmer")
  assert any("sample.guidance=none" in s for s in said)
  # a good conversion, then the same --out again without --overwrite
  from_tarflow(ckpt, str(out), say=say)
  before = os.listdir(tmp_path)
  refused("already exists")
  with pytest.raises(UserError, match="exists"):
    to_tarflow(str(out), str(tmp_path / "m.npz"), say=say)
  with pytest.raises(UserError, match=r"\.pth .* or \.npz"):
    to_tarflow(str(out), str(tmp_path / "m.bin"), say=say)
  os.mkdir(tmp_path / "adir.pth")
  with pytest.raises(UserError, match="is a directory"):
    to_tarflow(str(out), str(tmp_path / "adir.pth"), say=say)
  os.rmdir(tmp_path / "adir.pth")
  with pytest.raises(UserError, match="inside the export"):
    to_tarflow(str(out), str(out / "back.pth"), say=say)
  assert sorted(os.listdir(tmp_path)) == sorted(before)
  assert not os.path.exists(out / "back.pth")


@pytest.mark.slow  # moved out of the default suite to keep it <= 10 min on 2 cores
def test_to_tarflow_refuses_an_af_tarflow_cannot_hold(tmp_path):
  """A FARMER AF with its output LayerNorm (the default) has no TARFlow counterpart."""
  import ml_collections

  from farmer_jax import configlib
  from farmer_jax.config.parse import parse_model
  cfg = configlib.load("quickstart:tiny")
  m = parse_model(cfg)
  params = jax.jit(lambda r: init_params(m, r))(jax.random.key(0))
  model_dir = str(tmp_path / "farmer")
  meta = {"kind": export.EXPORT_KIND, "format_version": export.FORMAT_VERSION, "step": 0,
          "params": "raw", "dtype": "float32"}
  export.write_export(model_dir, params, ml_collections.ConfigDict(cfg.to_dict()), meta)
  with pytest.raises(UserError, match="flow_final_norm"):
    to_tarflow(model_dir, str(tmp_path / "x.pth"), say=lambda _: None)
  assert not os.path.exists(tmp_path / "x.pth")


@pytest.mark.slow  # moved out of the default suite to keep it <= 10 min on 2 cores
def test_denoise_is_a_tweedie_step_and_names_are_read():
  """On a fresh standard-normal model (the AF starts as the identity) log p(x) = log N(x; 0, I),
  so the self-denoising step x + s^2 grad log p(x) is exactly (1 - s^2) x."""
  import dataclasses

  from farmer_jax.config.schema import ModelConfig, SamplerConfig
  from farmer_jax.sampling.sampler import denoise
  m = dataclasses.replace(ModelConfig(), prior="standard_normal", flow_final_norm=False)
  params = jax.jit(lambda r: init_params(m, r))(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 1))
  y = jnp.full((3,), m.null_class, jnp.int32)
  np.testing.assert_allclose(np.asarray(denoise(m, params, x, y, 0.3)), 0.91 * np.asarray(x),
                             rtol=1e-5, atol=1e-6)
  assert denoise(m, params, x, y, 0.0) is x
  assert convert.training_noise("/a/afhq_model_8_768_8_8_0.07.pth") == ("gaussian", 0.07)
  assert convert.training_noise("imagenet64_model_2_768_8_8_uniform.pth") == ("uniform", None)
  assert convert.training_noise("model.pth") == (None, None)
  with pytest.raises(UserError, match="does nothing here"):    # unconditional AF, attn_temp 1
    SamplerConfig(af_guidance=2.0).check_model(m)
  SamplerConfig(af_guidance=2.0, af_attn_temp=0.8).check_model(m)


def test_pixel_mappings():
  v = np.arange(256)
  for name in conventions.PIXEL_MAPPINGS:
    centre = np.asarray(conventions.uint8_to_centre(v, name))
    assert (conventions.to_uint8(centre, name) == v).all()
    u = np.asarray(conventions.dequantize(jax.random.key(0), v, "uniform", pixels=name))
    assert (conventions.to_uint8(u, name) == v).all()       # uniform noise stays in the bin
  np.testing.assert_allclose(np.asarray(conventions.uint8_to_centre(v, "tarflow")),
                             2 * v / 255 - 1, atol=1e-6)
  np.testing.assert_allclose(np.asarray(conventions.uint8_to_centre(v, "farmer")),
                             (v + 0.5) / 128 - 1, atol=1e-6)
  assert conventions.bits_per_dim(0.0, "farmer") == pytest.approx(7.0)
  assert conventions.bits_per_dim(0.0, "tarflow") == pytest.approx(-math.log2(2 / 255))


def test_init_flow_starts_farmer_from_a_tarflow_checkpoint(tmp_path):
  """train.init_flow: a fresh FARMER run's AF params are the checkpoint's (the AR prior keeps its
  init); a checkpoint that does not fit the model is refused naming the field, before the workdir
  exists."""
  from farmer_jax import configlib
  from farmer_jax.errors import ConfigError
  from farmer_jax.interop.tarflow import tarflow_to_params
  from farmer_jax.config.parse import parse
  from farmer_jax.train.trainer import start
  cfg = configlib.load("quickstart:tiny")
  cfg.model.update(flow_final_norm=False, flow_width=64, flow_heads=1)
  hp = dict(in_channels=1, img_size=32, patch_size=4, channels=64, num_blocks=2,
            layers_per_block=1, nvp=True, num_classes=0)
  mcfg, sd = _random_state_dict(hp, seed=3)
  ckpt = str(tmp_path / "tf.npz")
  np.savez(ckpt, **sd)
  cfg.train.init_flow = ckpt
  tr = start(parse(cfg, str(tmp_path / "run")), str(tmp_path / "run"), quiet=True)
  try:
    want = tarflow_to_params(sd, tr.mcfg)
    got = jax.tree.map(np.asarray, tr.state["params"])
    chex.assert_trees_all_equal(got["flow"], want)
    assert "prior" in got
  finally:
    tr.close()
  cfg.model.flow_blocks = 3
  with pytest.raises(ConfigError, match="train.init_flow.*flow_blocks"):
    start(parse(cfg, str(tmp_path / "run2")), str(tmp_path / "run2"), quiet=True)
  assert not os.path.exists(tmp_path / "run2")


def test_tarflow_presets_validate():
  from farmer_jax import configlib
  from farmer_jax.config.parse import parse_model
  for preset in configlib.module("tarflow").PRESETS:
    m = parse_model(configlib.load(f"tarflow:{preset}"))
    assert (m.prior, m.pixels, m.flow_final_norm) == ("standard_normal", "tarflow", False)
    assert m.flow_heads * 64 == m.flow_width
  m = parse_model(configlib.load("tarflow:afhq256"))
  assert (m.image_size, m.patch_size, m.flow_blocks, m.flow_layers, m.num_classes) == (
      256, 8, 8, 8, 3)


@pytest.mark.slow
def test_train_tarflow_here_then_convert_back(tmp_path):
  """tarflow:tiny trains TARFlow in farmer_jax (N(0, I) prior, TARFlow pixels) end to
  end: bits/dim, the sample grid, export, and --to=tarflow."""
  from farmer_jax import configlib
  from farmer_jax.config.parse import parse
  from farmer_jax.train.trainer import train_and_report
  cfg = configlib.load("tarflow:tiny")
  cfg.train.steps = 20
  wd = str(tmp_path / "run")
  summary, _ = train_and_report(parse(cfg, wd), wd, quiet=True)
  assert math.isfinite(summary["test_bpd"]) and summary["test_bpd"] < 9
  export.export_model(str(tmp_path / "run"), str(tmp_path / "model"), say=lambda _: None)
  mcfg, _, _, _ = export.load_model(str(tmp_path / "model"))
  assert mcfg.prior == "standard_normal"
  to_tarflow(str(tmp_path / "model"), str(tmp_path / "t.npz"), say=lambda _: None)
  with np.load(tmp_path / "t.npz") as f:
    assert f["blocks.0.pos_embed"].shape == (64, 64)
