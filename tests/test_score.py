"""Likelihood maps: ``Farmer.token_log_probs`` splits the exact NLL over tokens (the sum is the
whole image's; each AF block's log-scales land at their token's spatial position),
``Model.bits_per_token`` averages to ``Model.bits_per_dim``, and `farmer_jax score` writes what it
computes for a folder and an .npz and refuses bad input with one line."""

import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import TINY, init_farmer, variant
from PIL import Image
from test_api import _tiny_config, _write_export
from test_eval import run_command

import farmer_jax
from farmer_jax.errors import UserError
from farmer_jax.flow.autoregressive_flow import AFBlock
from farmer_jax.flow.patchify import patchify
from farmer_jax.model import Farmer, make_flow

TERMS = ("log_prob", "logdet", "log_prob_i", "log_prob_r")


def _x(n=3, seed=1):
  return jax.random.uniform(jax.random.key(seed), (n, 8, 8, 1), minval=-1.0, maxval=1.0)


@pytest.mark.parametrize("cfg", [TINY, variant(ar_order="same"), variant(dimred="jetformer"),
                                 variant(prior="standard_normal", dimred="none",
                                         d_informative=4)],
                         ids=["farmer", "ar_flipped", "jetformer", "standard_normal"])
def test_token_terms_sum_to_the_image_terms(cfg):
  assert TINY.ar_flip != variant(ar_order="same").ar_flip     # both AR orders are covered
  model, params = init_farmer(cfg)
  y = np.array([0, 2, cfg.null_class])
  whole = jax.jit(lambda p, x, y: model.apply({"params": p}, x, y))(params, _x(), y)
  tok = jax.jit(lambda p, x, y: model.apply({"params": p}, x, y, method=Farmer.token_log_probs))(
      params, _x(), y)
  for t in TERMS:
    assert tok[t].shape == (3, cfg.num_tokens)
    np.testing.assert_allclose(np.sum(tok[t], axis=1), whole[t], rtol=1e-5, atol=1e-4, err_msg=t)
  # the per-token terms are not all alike (a sum identity alone would pass a spread-out total)
  assert np.ptp(np.asarray(tok["log_prob"]), axis=1).min() > 1e-3


def test_token_logdet_is_each_blocks_log_scales_at_the_tokens_position(tiny):
  """Block t's log-scales, recomputed one block at a time from the flow's intermediates, in its
  token order (flipped for odd t) and put back at their input positions."""
  cfg, _, params = tiny
  flow = make_flow(cfg)
  fp = {"params": params["flow"]}
  tokens = patchify(_x(), cfg.patch_size)
  path = flow.apply(fp, tokens, None, method=type(flow).path)       # (n + 1, B, N, d)
  block = AFBlock(**flow.block_kwargs())
  want = np.zeros(tokens.shape[:2])
  for t in range(cfg.flow_blocks):
    bp = {"params": jax.tree.map(lambda p: p[t], params["flow"]["blocks"])}
    flip = t % 2 == 1
    xp = path[t][:, ::-1] if flip else path[t]
    a, _ = block.apply(bp, xp, flip, None, method=AFBlock.shift_scale)
    a = np.asarray(a).sum(-1)
    want -= a[:, ::-1] if flip else a
  z, got = flow.apply(fp, tokens, None, method=type(flow).token_logdet)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(z, path[-1], atol=1e-6)


def test_last_tokens_pixels_leave_its_own_logdet(tiny):
  """With blocks [raster, flipped]: the last raster token's log-scales come from earlier tokens in
  block 0 and are zero in block 1 (it comes first there), so changing only its pixels leaves its
  AF log-det term unchanged and changes the others'."""
  cfg, model, params = tiny
  x = np.asarray(_x())
  x2 = x.copy()
  p = cfg.patch_size
  x2[:, -p:, -p:] = -x2[:, -p:, -p:]                  # the bottom-right patch = the last token
  fn = jax.jit(lambda x: model.apply({"params": params}, x, np.full(3, cfg.null_class),
                                     method=Farmer.token_log_probs)["logdet"])
  a, b = np.asarray(fn(x)), np.asarray(fn(x2))
  np.testing.assert_allclose(a[:, -1], b[:, -1], atol=1e-6)
  assert np.abs(a[:, :-1] - b[:, :-1]).max() > 1e-3


@pytest.fixture(scope="module")
def tiny_export(tiny, tmp_path_factory):
  return _write_export(tmp_path_factory.mktemp("score") / "model", _tiny_config(), tiny[2])


def _images(n, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, 8, 8, 1), np.uint8), rng.integers(0, 3, n)


def test_bits_per_token_averages_to_bits_per_dim(tiny_export):
  model = farmer_jax.load(tiny_export)
  images, y = _images(5)
  for labels in (y, None):
    res = model.bits_per_token(images, labels, seed=1, samples=2, batch=2, return_terms=True)
    assert res["token_bpd"].shape == (5, 4, 4)
    bpd = model.bits_per_dim(images, labels, seed=1, samples=2)
    np.testing.assert_allclose(res["token_bpd"].mean(axis=(1, 2)), bpd, atol=2e-6)
    np.testing.assert_allclose(res["bpd"], bpd, atol=2e-6)
    t = res["token_terms"]
    np.testing.assert_allclose(t["af_logdet"] + t["informative"] + t["redundant"] + t["bin_width"],
                               res["token_bpd"], atol=1e-9)
  # the dequantization draws are the seed's: another seed gives other maps
  assert np.all(model.bits_per_token(images, y, seed=2, batch=2)
                != model.bits_per_token(images, y, seed=1, batch=2))
  with pytest.raises(UserError, match="images have shape"):
    model.bits_per_token(images[0])


def _read_outputs(out):
  res = json.loads((out / "scores.json").read_text())
  maps = np.load(out / "maps.npz")
  rows = list(csv.DictReader(open(out / "scores.csv")))
  return res, maps, rows


def test_score_command_on_a_folder(tiny_export, tmp_path):
  model = farmer_jax.load(tiny_export)
  images, y = _images(4)
  folder = tmp_path / "imgs"
  folder.mkdir()
  for i, im in enumerate(images):
    Image.fromarray(im[..., 0]).save(folder / f"d{i}.png")
  rgb = np.random.default_rng(3).integers(0, 256, (12, 16, 3), np.uint8)   # converted, cropped
  Image.fromarray(rgb).save(folder / "e_rgb.png")
  (folder / "notes.txt").write_text("not an image")
  out = tmp_path / "out"
  run_command("score", f"--model={tiny_export}", f"--images={folder}", f"--out={out}",
              "--per_page=2", "--draw=3", "--quiet")
  res, maps, rows = _read_outputs(out)
  assert [r["name"] for r in res["per_image"]] == ["d0.png", "d1.png", "d2.png", "d3.png",
                                                   "e_rgb.png"]
  assert sorted(os.listdir(out)) == ["maps.npz", "maps_000.png", "maps_001.png", "scores.csv",
                                     "scores.json"]
  bpd = np.array([r["bpd"] for r in res["per_image"]])
  np.testing.assert_array_equal(bpd, maps["bpd"])                      # JSON == npz, exactly
  np.testing.assert_array_equal([float(r["bpd"]) for r in rows], maps["bpd"])
  assert maps["token_bpd"].shape == (5, 4, 4) and maps["images"].shape == (5, 8, 8, 1)
  np.testing.assert_array_equal(maps["images"][:4], images)
  np.testing.assert_allclose(bpd, model.bits_per_dim(maps["images"]), atol=2e-6)
  assert not any(r["conditional"] for r in res["per_image"]) and "null class" in res["labels"]
  assert Image.open(out / "maps_000.png").size[0] > 4 * 8


def test_score_command_on_an_npz_with_labels(tiny_export, tmp_path):
  model = farmer_jax.load(tiny_export)
  images, y = _images(4)
  npz = tmp_path / "x.npz"
  np.savez(npz, images=images, labels=y)
  out2 = tmp_path / "out2"
  run_command("score", f"--model={tiny_export}", f"--images={npz}", f"--out={out2}",
              "--labels=data", "--seed=3", "--quiet")
  res, maps, _ = _read_outputs(out2)
  np.testing.assert_array_equal(maps["labels"], y)
  assert all(r["conditional"] for r in res["per_image"]) and res["count"] == 4
  np.testing.assert_allclose(maps["bpd"], model.bits_per_dim(images, y, seed=3), atol=2e-6)
  np.testing.assert_array_equal([r["bpd"] for r in res["per_image"]], maps["bpd"])
  # --overwrite replaces a previous score output
  run_command("score", f"--model={tiny_export}", f"--images={npz}", f"--out={out2}",
              "--labels=1", "--num=2", "--overwrite", "--quiet")
  res, maps, _ = _read_outputs(out2)
  assert res["count"] == 2 and list(maps["labels"]) == [1, 1]


def test_score_command_refuses_bad_input(tiny_export, tmp_path):
  images, _ = _images(2)
  empty, bad = tmp_path / "empty", tmp_path / "bad"
  empty.mkdir()
  bad.mkdir()
  (bad / "x.png").write_bytes(b"not a png")
  wrong = tmp_path / "wrong.npz"
  np.savez(wrong, images=np.zeros((2, 16, 16, 1), np.uint8))
  good = tmp_path / "good.npz"
  np.savez(good, images=images)
  taken = tmp_path / "taken"
  taken.mkdir()
  model = f"--model={tiny_export}"
  cases = [
      ((model, f"--images={tmp_path / 'nope'}"), "does not exist"),
      ((model, f"--images={empty}"), "holds no image files"),
      ((model, f"--images={bad}"), "x.png cannot be read"),
      ((model, f"--images={wrong}"), r"\(2, 16, 16, 1\); this model takes uint8 \(n, 8, 8, 1"),
      ((model, f"--images={good}", "--labels=data"), "carries no labels"),
      ((model, f"--images={good}", "--labels=7"), "label 7 .* is not a class"),
      ((model, f"--images={good}", "--labels=three"), "not 'null', 'data' or a class id"),
      (("--model=/nonexistent/m", f"--images={good}"), "does not exist"),
  ]
  out = tmp_path / "o"
  for args, msg in cases:
    with pytest.raises(UserError, match=msg):
      run_command("score", *args, f"--out={out}", "--quiet")
    assert not out.exists()
  with pytest.raises(UserError, match="is not a previous `farmer_jax score` output"):
    run_command("score", model, f"--images={good}", f"--out={taken}", "--overwrite", "--quiet")
  # the CLI contract: one line, exit 2 (refused before the model is loaded)
  p = subprocess.run([sys.executable, "-m", "farmer_jax", "score", model, f"--images={good}",
                      f"--out={taken}"], capture_output=True, text=True, timeout=120)
  assert p.returncode == 2
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("farmer_jax score: ") and "already exists" in last and "Fix:" in last
  assert "Traceback" not in p.stderr
  assert os.listdir(taken) == [] and sorted(os.listdir(tmp_path)) == [
      "bad", "empty", "good.npz", "taken", "wrong.npz"]


@pytest.mark.slow  # the session's trained quickstart:tiny run
def test_a_corrupted_patch_is_where_the_map_is_highest(exported):
  """A trained model: noise pasted over one p x p patch of test digits raises that token's
  bits/dim the most (on average over the digits), at two positions no flip maps onto each other."""
  from farmer_jax.data.mnist import load_mnist5k
  model = farmer_jax.load(str(exported[1]))
  p = model.model_config.patch_size
  images = load_mnist5k("test", pad_to=model.image_shape[0])[0][::50][:10]
  clean = model.bits_per_token(images)
  rng = np.random.default_rng(0)
  for r, s in ((1, 6), (6, 1)):
    x = images.copy()
    x[:, r * p:(r + 1) * p, s * p:(s + 1) * p] = rng.integers(0, 256, (len(x), p, p, 1))
    rise = (model.bits_per_token(x) - clean).mean(axis=0)
    assert np.unravel_index(np.argmax(rise), rise.shape) == (r, s)


def test_scoring_more_images_than_fit_in_memory_is_refused_before_reading():
  """A split or folder too large for this host's memory is refused with the --num that fits."""
  import types

  from farmer_jax.commands.score import check_memory
  model = types.SimpleNamespace(image_shape=(256, 256, 3), latent_shape=(256, 768))
  per = 2 * 256 * 256 * 3 + 16 * 256 + 256
  check_memory(model, 1000, "--images=split:validation", available=2 * 1000 * per)
  with pytest.raises(UserError, match=r"--images=split:validation: its 50000 images of 256x256x3 "
                     r"need about 18\.5 GiB .* Fix: score at most --num=1600 at a time"):
    check_memory(model, 50000, "--images=split:validation", available=2000 * per)


def test_score_reads_an_npz_as_fid_reads_one(tmp_path):
  """score's .npz reader takes the image keys fid takes, and refuses non-uint8 images with fid's
  check (one reader's rules, not two)."""
  import types

  from farmer_jax.commands.score import _read_npz
  from farmer_jax.eval.metrics import IMAGE_KEYS
  model = types.SimpleNamespace(image_shape=(8, 8, 1))
  for key in IMAGE_KEYS:
    np.savez(tmp_path / f"{key}.npz", **{key: np.full((3, 8, 8), 7, np.uint8)})
    images, labels, names = _read_npz(model, str(tmp_path / f"{key}.npz"), 2)
    assert images.shape == (2, 8, 8, 1) and labels is None and names == [f"{key}[0]", f"{key}[1]"]
  np.savez(tmp_path / "f.npz", images=np.zeros((3, 8, 8, 1), np.float32))
  with pytest.raises(UserError, match=r"images under 'images' must be uint8 .* Fix: store"):
    _read_npz(model, str(tmp_path / "f.npz"), 0)
