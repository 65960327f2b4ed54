"""farmer_jax.interop.tarflow: TARFlow state_dicts <-> our AF params.

The torch tests build ``tarflow_reference.TARFlowReference`` (a PyTorch re-implementation of
TARFlow's Model with its exact state_dict keys) with every parameter random and non-zero,
``proj_out`` included, and check that our ``AutoregressiveFlow`` with the converted params gives
the same latents, log-det (TARFlow's per-dimension mean x N*d = our sum) and inverse (plain and
guided: CFG, attention temperature, annealing), and that the state_dict survives torch -> jax ->
torch bit for bit. The rest (round trip from our side, error messages) needs no torch.
"""

import dataclasses
import functools
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from farmer_jax.config.schema import ModelConfig
from farmer_jax.errors import UserError
from farmer_jax.flow.autoregressive_flow import AutoregressiveFlow
from farmer_jax.flow.patchify import patchify, unpatchify
from farmer_jax.interop.tarflow import (config_for_tarflow, params_to_tarflow, patch_permutation,
                                        tarflow_hparams, tarflow_to_params, tarflow_var)
from farmer_jax.model import make_flow

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TOL = 1e-4

# TARFlow Model kwargs, and the labels each case runs forward with ("none": y=None; "labels":
# [0, K-1, -1, 1], where -1 takes the mean class embedding; unconditional models only "none")
CASES = {
    "uncond-c1-p2": dict(in_channels=1, img_size=8, patch_size=2, channels=64, num_blocks=2,
                         layers_per_block=1, nvp=True, num_classes=0, ys=("none",)),
    "cond-c3-p4": dict(in_channels=3, img_size=16, patch_size=4, channels=128, num_blocks=2,
                       layers_per_block=2, nvp=True, num_classes=5, ys=("labels",)),
    "cond-c3-p2": dict(in_channels=3, img_size=8, patch_size=2, channels=64, num_blocks=2,
                       layers_per_block=2, nvp=True, num_classes=4, ys=("none", "labels")),
    "vp-cond-c1-p4": dict(in_channels=1, img_size=16, patch_size=4, channels=64, num_blocks=2,
                          layers_per_block=1, nvp=False, num_classes=3, ys=("labels",)),
}
# guided reverse only (not in CASES: test_matches_reference's plain path is covered above)
GUIDED_COND = dict(in_channels=1, img_size=8, patch_size=2, channels=64, num_blocks=2,
                   layers_per_block=1, nvp=True, num_classes=3)


def case(name):
  """The TARFlow Model kwargs of CASES[name]."""
  return {k: v for k, v in CASES[name].items() if k != "ys"}


def mcfg_for(hp, **kw):
  return dataclasses.replace(ModelConfig(), **{**config_for_tarflow(**hp), **kw})


@functools.lru_cache(maxsize=None)
def flow_fns(mcfg):
  """(forward, inverse), jitted once per config."""
  flow = make_flow(mcfg)
  fwd = jax.jit(lambda p, x, y: flow.apply({"params": p}, x, y))
  inv = jax.jit(lambda p, z, y: flow.apply({"params": p}, z, y,
                                           method=AutoregressiveFlow.inverse))
  return fwd, inv


@functools.lru_cache(maxsize=None)
def _param_shapes(mcfg):
  flow = make_flow(mcfg)
  x = jax.ShapeDtypeStruct((1, mcfg.num_tokens, mcfg.token_dim), jnp.float32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32) if mcfg.flow_class_conditional else None
  import flax.linen as nn
  return nn.unbox(jax.eval_shape(flow.init, jax.random.key(0), x, y)["params"])


def random_flow_params(mcfg, seed=0):
  """Params of our flow's layout with every leaf random (proj_out included): numpy fp32."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32),
                      _param_shapes(mcfg))


# ---------------------------------------------------------------- against the PyTorch reference

def _reference(torch, hp, seed=0):
  from tarflow_reference import TARFlowReference, randomize_
  torch.manual_seed(seed)
  ref = TARFlowReference(**hp).eval()
  return randomize_(ref, seed=seed)


def _nhwc(torch_nchw):
  return np.asarray(torch_nchw.detach().numpy()).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
  torch = pytest.importorskip("torch")
  hp = dict(CASES[name])
  ys = hp.pop("ys")
  mcfg = mcfg_for(hp)
  ref = _reference(torch, hp)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  assert np.abs(sd["blocks.0.proj_out.weight"]).min() > 0      # the test can fail
  params = tarflow_to_params(sd, mcfg)

  # torch -> jax -> torch: same keys, order, shapes and values
  back = params_to_tarflow(params, mcfg, nvp=hp["nvp"])
  assert list(back) == list(sd)
  for k in sd:
    assert back[k].dtype == np.float32, k
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)

  fwd, inv = flow_fns(mcfg)
  p, k_cls = hp["patch_size"], hp["num_classes"]
  g = torch.Generator().manual_seed(1)
  x = torch.rand(4, hp["in_channels"], hp["img_size"], hp["img_size"], generator=g) * 2 - 1
  x_ours = patchify(jnp.asarray(_nhwc(x)), p)
  d = mcfg.num_tokens * mcfg.token_dim
  labels = dict(none=None, labels=np.array([0, k_cls - 1, -1, 1], np.int32))
  for y in (labels[k] for k in ys):
    y_t = None if y is None else torch.from_numpy(y).long()
    with torch.no_grad():
      z_t, ld_t = ref(x, y_t)
    z, ld = fwd(params, x_ours, None if y is None else jnp.asarray(y))
    z_img = np.asarray(unpatchify(z, p, hp["img_size"], hp["in_channels"]))
    np.testing.assert_allclose(z_img, _nhwc(ref.unpatchify(z_t)), atol=TOL, rtol=0)
    # TARFlow: per-dimension mean summed over blocks; ours: summed over everything
    np.testing.assert_allclose(np.asarray(ld) / d, ld_t.numpy(), atol=TOL, rtol=0)
    if hp["nvp"]:
      assert np.abs(ld_t.numpy()).min() > 1e-3                   # a non-trivial log-det
    else:
      np.testing.assert_array_equal(np.asarray(ld), 0.0)
    assert np.abs(z_img - _nhwc(x)).max() > 0.1                # a non-trivial map

    # reverse: TARFlow's reverse uses the mean embedding for y=None only; test labels >= 0
    y_rev = None if y is None else np.clip(y, 0, None)
    x_t = ref.reverse(z_t, None if y is None else torch.from_numpy(y_rev).long())
    x_back = inv(params, jnp.asarray(patch_tokens(z_t, hp)),
                 None if y is None else jnp.asarray(y_rev))
    x_back = np.asarray(unpatchify(x_back, p, hp["img_size"], hp["in_channels"]))
    np.testing.assert_allclose(x_back, _nhwc(x_t), atol=TOL, rtol=0)
    if y is None or (y >= 0).all():
      np.testing.assert_allclose(x_back, _nhwc(x), atol=TOL, rtol=0)


def patch_tokens(z_t, hp):
  """TARFlow tokens (B, T, Dp) in (c, ph, pw) order -> ours (ph, pw, c)."""
  return z_t.numpy()[..., patch_permutation(hp["patch_size"], hp["in_channels"])]


def test_reverse_negative_label_is_last_class():
  """TARFlow's reverse indexes class_embed[y]: y = -1 is the last class there (its forward uses the
  mean). Ours: NO_LABEL is the mean both ways, so TARFlow's reverse(y=-1) is ours with y = K-1."""
  torch = pytest.importorskip("torch")
  hp = case("cond-c3-p2")
  mcfg = mcfg_for(hp)
  ref = _reference(torch, hp, seed=3)
  params = tarflow_to_params({k: v.numpy() for k, v in ref.state_dict().items()}, mcfg)
  _, inv = flow_fns(mcfg)
  z_t = torch.randn(4, mcfg.num_tokens, mcfg.token_dim, generator=torch.Generator().manual_seed(0))
  x_t = ref.reverse(z_t, torch.full((4,), -1))
  last = jnp.full((4,), hp["num_classes"] - 1, jnp.int32)
  x_ours = unpatchify(inv(params, jnp.asarray(patch_tokens(z_t, hp)), last), hp["patch_size"],
                      hp["img_size"], hp["in_channels"])
  np.testing.assert_allclose(np.asarray(x_ours), _nhwc(x_t), atol=TOL, rtol=0)
  mean = unpatchify(inv(params, jnp.asarray(patch_tokens(z_t, hp)), jnp.full((4,), -1, jnp.int32)),
                    hp["patch_size"], hp["img_size"], hp["in_channels"])
  assert np.abs(np.asarray(mean) - _nhwc(x_t)).max() > 1e-3


@functools.lru_cache(maxsize=None)
def guided_inverse(mcfg, guidance, guide_what, attn_temp, annealed):
  """Our inverse with static guidance arguments, jitted once per (config, arguments)."""
  flow = make_flow(mcfg)
  kw = dict(guidance=guidance, guide_what=guide_what, attn_temp=attn_temp, annealed=annealed)
  return jax.jit(lambda p, z, y: flow.apply({"params": p}, z, y, **kw,
                                            method=AutoregressiveFlow.inverse))


# (TARFlow model, guidance, guide_what, attn_temp, annealed_guidance)
GUIDED = [
    ("cond", 1.5, "ab", 1.0, True),       # CFG, annealed (TARFlow's evaluate_fid)
    ("cond", 2.0, "a", 0.7, False),       # CFG on a only, tempered weak branch, constant g
    ("uncond", 1.0, "ab", 1.3, True),     # unconditional guidance: the weak branch differs by temp
]


@pytest.mark.parametrize("model,guidance,guide_what,attn_temp,annealed", GUIDED)
def test_guided_inverse_matches_reference(model, guidance, guide_what, attn_temp, annealed):
  """Our guided exact inverse == TARFlow's guided reverse (two branches, own KV caches, per-token
  affine extrapolation) on a converted random-weight model, and guidance really moves it."""
  torch = pytest.importorskip("torch")
  hp = GUIDED_COND if model == "cond" else case("uncond-c1-p2")
  mcfg = mcfg_for(hp)
  ref = _reference(torch, hp, seed=7)
  with torch.no_grad():      # q, k x3: attention far from uniform, so attn_temp matters
    for k, w in ref.named_parameters():
      if k.endswith("qkv.weight"):
        w[:2 * w.shape[1]] *= 3.0                          # rows [q | k] of [q | k | v]
  params = tarflow_to_params({k: v.numpy() for k, v in ref.state_dict().items()}, mcfg)
  z_t = torch.randn(4, mcfg.num_tokens, mcfg.token_dim, generator=torch.Generator().manual_seed(2))
  y = np.array([0, 2, 1, 2], np.int32) if hp["num_classes"] else None
  y_t = None if y is None else torch.from_numpy(y).long()
  x_t = _nhwc(ref.reverse(z_t, y_t, guidance, guide_what, attn_temp, annealed))
  x_plain = _nhwc(ref.reverse(z_t, y_t))
  inv = guided_inverse(mcfg, guidance, guide_what, attn_temp, annealed)
  x = inv(params, jnp.asarray(patch_tokens(z_t, hp)), None if y is None else jnp.asarray(y))
  x = np.asarray(unpatchify(x, hp["patch_size"], hp["img_size"], hp["in_channels"]))
  assert np.isfinite(x_t).all()
  assert np.abs(x_t - x_plain).max() > 0.02                     # guidance is not a no-op here
  np.testing.assert_allclose(x, x_t, atol=TOL, rtol=0)


def test_zero_guidance_is_the_plain_inverse():
  """guidance=0 traces the unguided program (same jaxpr whatever attn_temp / annealed /
  guide_what say) and gives the plain inverse bit for bit."""
  hp = GUIDED_COND
  mcfg = mcfg_for(hp)
  flow = make_flow(mcfg)
  params = random_flow_params(mcfg, seed=4)
  z = jax.random.normal(jax.random.key(0), (2, mcfg.num_tokens, mcfg.token_dim))
  y = jnp.array([0, 2], jnp.int32)
  kw = dict(guidance=0.0, guide_what="a", attn_temp=0.5, annealed=True)

  def plain(p, z, y):
    return flow.apply({"params": p}, z, y, method=AutoregressiveFlow.inverse)

  def zero(p, z, y):
    return flow.apply({"params": p}, z, y, **kw, method=AutoregressiveFlow.inverse)

  assert str(jax.make_jaxpr(zero)(params, z, y)) == str(jax.make_jaxpr(plain)(params, z, y))
  _, inv = flow_fns(mcfg)
  np.testing.assert_array_equal(np.asarray(jax.jit(zero)(params, z, y)),
                                np.asarray(inv(params, z, y)))


def test_guidance_arguments_are_checked():
  mcfg = mcfg_for(GUIDED_COND)
  flow = make_flow(mcfg)
  params = random_flow_params(mcfg)
  z = jnp.zeros((1, mcfg.num_tokens, mcfg.token_dim))

  def inverse(**kw):
    return flow.apply({"params": params}, z, method=AutoregressiveFlow.inverse, **kw)

  with pytest.raises(ValueError, match=r"guide_what='ba' is unknown; use one of \('a', 'b', 'ab'"):
    inverse(guidance=1.0, guide_what="ba")
  with pytest.raises(ValueError, match=r"guidance=-0.5 must be >= 0"):
    inverse(guidance=-0.5)
  with pytest.raises(ValueError, match=r"attn_temp=0.0 must be > 0"):
    inverse(guidance=1.0, attn_temp=0.0)
  with pytest.raises(TypeError, match="must be static Python numbers"):
    jax.jit(lambda g: inverse(guidance=g))(1.0)


def test_torch_save_file(tmp_path):
  """A real torch.save file read without torch gives the same params."""
  torch = pytest.importorskip("torch")
  from farmer_jax.interop.torch_checkpoint import load_state_dict
  hp = case("cond-c3-p4")
  ref = _reference(torch, hp, seed=5)
  path = tmp_path / "imagenet_model_4_128_2_2_0.05.pth"
  torch.save(ref.state_dict(), path)
  sd = load_state_dict(path)
  assert list(sd) == list(ref.state_dict())
  assert tarflow_hparams(sd, in_channels=3) == hp | dict(expansion=4)
  mcfg = mcfg_for(hp)
  direct = tarflow_to_params({k: v.numpy() for k, v in ref.state_dict().items()}, mcfg)
  chex.assert_trees_all_equal(tarflow_to_params(sd, mcfg), direct)
  np.testing.assert_array_equal(tarflow_var(sd, mcfg), 1.0)


# --------------------------------------------------------------------------- no torch needed

def test_jax_round_trip_and_hparams():
  hp = case("cond-c3-p4")
  mcfg = mcfg_for(hp)
  params = random_flow_params(mcfg)
  sd = params_to_tarflow(params, mcfg)
  assert len(sd) == 1 + hp["num_blocks"] * (7 + 12 * hp["layers_per_block"])
  chex.assert_trees_all_equal(tarflow_to_params(sd, mcfg), params)
  chex.assert_trees_all_equal(
      tarflow_to_params(params_to_tarflow({"flow": params}, mcfg), mcfg), params)
  assert tarflow_hparams(sd, in_channels=3) == hp | dict(expansion=4)
  assert config_for_tarflow(**tarflow_hparams(sd, 3)) == config_for_tarflow(**hp)
  # buffers are optional on import
  slim = {k: v for k, v in sd.items() if not k.endswith(("attn_mask", "var"))}
  chex.assert_trees_all_equal(tarflow_to_params(slim, mcfg), params)


def test_config_mapping():
  got = config_for_tarflow(in_channels=3, img_size=64, patch_size=2, channels=768, num_blocks=8,
                           layers_per_block=8, num_classes=1000)
  assert got == dict(image_size=64, channels=3, patch_size=2, flow_width=768, flow_heads=12,
                     flow_blocks=8, flow_layers=8, mlp_ratio=4, flow_class_conditional=True,
                     flow_final_norm=False, num_classes=1000)
  assert "num_classes" not in config_for_tarflow(3, 64, 2, 768, 8, 8)
  with pytest.raises(UserError, match="multiple of its head dim"):
    config_for_tarflow(3, 64, 2, 100, 8, 8)


def test_patch_permutation_matches_unfold_order():
  p, c = 2, 3
  img = np.arange(4 * 4 * c).reshape(1, 4, 4, c)                  # NHWC, value = (h*4 + w)*c + ch
  ours = np.asarray(patchify(jnp.asarray(img), p))[0, 0]          # (ph, pw, c)
  tf = np.array([img[0, i, j, ch] for ch in range(c) for i in range(p) for j in range(p)])
  np.testing.assert_array_equal(ours, tf[patch_permutation(p, c)])


def test_vp_export():
  hp = case("vp-cond-c1-p4")
  mcfg = mcfg_for(hp)
  params = random_flow_params(mcfg)
  with pytest.raises(ValueError, match="log-scale half of proj_out is non-zero"):
    params_to_tarflow(params, mcfg, nvp=False)
  d = mcfg.token_dim
  blocks = dict(params["blocks"])
  blocks["proj_out"] = {"kernel": params["blocks"]["proj_out"]["kernel"].copy(),
                        "bias": params["blocks"]["proj_out"]["bias"].copy()}
  blocks["proj_out"]["kernel"][..., :d] = 0
  blocks["proj_out"]["bias"][..., :d] = 0
  vp = {"blocks": blocks}
  sd = params_to_tarflow(vp, mcfg, nvp=False)
  assert sd["blocks.0.proj_out.weight"].shape == (d, mcfg.flow_width)
  chex.assert_trees_all_equal(tarflow_to_params(sd, mcfg), vp)


def _sd(hp, **kw):
  mcfg = mcfg_for(hp, **kw)
  return params_to_tarflow(random_flow_params(mcfg), mcfg)


def test_refuses_configs_tarflow_cannot_fill():
  hp = case("uncond-c1-p2")
  sd = _sd(hp)
  with pytest.raises(ValueError, match=r"model\.flow_final_norm=True.*flow_final_norm=False"):
    tarflow_to_params(sd, mcfg_for(hp, flow_final_norm=True))
  with pytest.raises(ValueError, match=r"model\.flow_heads=2 .*set model\.flow_heads=1"):
    tarflow_to_params(sd, mcfg_for(hp, flow_heads=2))


def test_missing_extra_and_wrong_shape_keys_are_listed():
  hp = case("cond-c3-p2")
  mcfg = mcfg_for(hp)
  sd = _sd(hp)

  bad = dict(sd)
  del bad["blocks.1.attn_blocks.0.mlp.main.0.bias"]
  bad["blocks.0.extra.weight"] = np.zeros(3, np.float32)
  bad["blocks.0.proj_in.bias"] = np.zeros(7, np.float32)
  with pytest.raises(ValueError) as e:
    tarflow_to_params(bad, mcfg)
  msg = str(e.value)
  assert "missing keys [blocks.1.attn_blocks.0.mlp.main.0.bias]" in msg
  assert "unexpected keys [blocks.0.extra.weight]" in msg
  assert "blocks.0.proj_in.bias (7,) != expected (64,)" in msg

  # a checkpoint of another shape: every field to change is named, with its value
  cases = [
      (dict(flow_blocks=3), ["model.flow_blocks=2"]),
      (dict(flow_layers=1), ["model.flow_layers=2"]),
      (dict(flow_width=128, flow_heads=2), ["model.flow_width=64", "model.flow_heads=1"]),
      (dict(patch_size=4), ["model.patch_size=2"]),
      (dict(num_classes=7), ["data.num_classes=4"]),
      (dict(flow_class_conditional=False), ["model.flow_class_conditional=True"]),
  ]
  for kw, fixes in cases:
    with pytest.raises(ValueError) as e:
      tarflow_to_params(sd, mcfg_for(hp, **kw))
    for fix in fixes:
      assert fix in str(e.value), (kw, str(e.value))
  with pytest.raises(ValueError, match=r"wrong shapes \[.*class_embed.*data\.num_classes"):
    tarflow_to_params(sd, mcfg_for(hp, num_classes=7))
  with pytest.raises(ValueError, match=r"unexpected keys \[blocks\.0\.class_embed.*"
                     r"model\.flow_class_conditional"):
    tarflow_to_params(sd, mcfg_for(hp, flow_class_conditional=False))
  with pytest.raises(ValueError, match=r"missing keys \[blocks\.2\..*model\.flow_blocks"):
    tarflow_to_params(sd, mcfg_for(hp, flow_blocks=3))


@pytest.mark.parametrize("size", [32, 64])
def test_kernel_floor_times_the_reference_modules_linear_layers(size):
  """benchmarks/kernel_floor.py times the products of exactly the linear layers (in, out) of the
  module vs_torch.py's PyTorch side trains, at its workloads' sizes."""
  torch = pytest.importorskip("torch")
  from tarflow_reference import TARFlowReference
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
  import kernel_floor
  import vs_torch
  hp = vs_torch.hparams(size)
  layers = [(m.in_features, m.out_features) for m in TARFlowReference(**hp).modules()
            if isinstance(m, torch.nn.Linear)]
  assert sorted(kernel_floor.linear_shapes(hp)) == sorted(layers)
