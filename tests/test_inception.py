"""FID Inception-v3 (farmer_jax.eval.inception): agreement with a PyTorch reference of pytorch-fid's
FIDInceptionV3 (written here from the documented architecture; needs torch), the bilinear resize
against F.interpolate, and torch-free checks (shapes, determinism, grayscale, errors). One jit
compile of the network (batch 2, 299x299) is shared by all tests."""

import zipfile

import chex
import jax
import numpy as np
import pytest

from farmer_jax.eval import inception
from farmer_jax.interop.torch_checkpoint import CheckpointError, load_state_dict, save_state_dict

SEED = 3


def random_state_dict(seed=0, num_batches_tracked=True):
  """A pytorch-fid-layout FIDInceptionV3 state_dict (numpy) with random weights and BatchNorm
  statistics that keep activations O(1) (He-scaled convs): for tests, without the real weights."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in inception.torch_shapes().items():
    kind = key.rsplit(".", 1)[-1]
    if key == "fc.weight":
      value = rng.normal(0, 1 / np.sqrt(shape[1]), shape)
    elif key == "fc.bias":
      value = rng.normal(0, 0.1, shape)
    elif kind == "weight" and len(shape) == 4:
      value = rng.normal(0, np.sqrt(2 / np.prod(shape[1:])), shape)
    elif kind == "weight":
      value = rng.uniform(0.5, 1.5, shape)
    elif kind == "bias":
      value = rng.normal(0, 0.2, shape)
    elif kind == "running_mean":
      value = rng.normal(0, 0.2, shape)
    else:  # running_var
      value = rng.uniform(0.5, 2.0, shape)
    out[key] = value.astype(np.float32)
    if num_batches_tracked and kind == "running_var":
      out[key[:-len("running_var")] + "num_batches_tracked"] = np.array(1000, np.int64)
  return out


@pytest.fixture(scope="module")
def state_dict():
  return random_state_dict(SEED)


@pytest.fixture(scope="module")
def features(state_dict):
  return inception.FIDFeatures(inception.convert_pytorch_fid(state_dict), batch_size=2)


def _images(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _torch_fid_inception():
  """PyTorch reference of pytorch-fid's FIDInceptionV3 (torchvision Inception3 with
  num_classes=1008, aux_logits=False and the FID blocks), eval mode. Returns (model, forward):
  forward(x in [0, 1], NCHW) -> (pool (B, 2048), logits (B, 1008)) as pytorch-fid computes them
  (resize to 299 bilinear align_corners=False, 2x - 1, blocks, adaptive average pool, fc)."""
  torch = pytest.importorskip("torch")
  tnn, F = torch.nn, torch.nn.functional

  class Conv(tnn.Module):  # torchvision's BasicConv2d
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
      super().__init__()
      self.conv = tnn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
      self.bn = tnn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
      return F.relu(self.bn(self.conv(x)))

  def avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

  class A(tnn.Module):
    def __init__(self, cin, pool_features):
      super().__init__()
      self.branch1x1 = Conv(cin, 64, 1)
      self.branch5x5_1 = Conv(cin, 48, 1)
      self.branch5x5_2 = Conv(48, 64, 5, padding=2)
      self.branch3x3dbl_1 = Conv(cin, 64, 1)
      self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
      self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
      self.branch_pool = Conv(cin, pool_features, 1)

    def forward(self, x):
      b5 = self.branch5x5_2(self.branch5x5_1(x))
      b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
      return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg3(x))], 1)

  class B(tnn.Module):
    def __init__(self, cin):
      super().__init__()
      self.branch3x3 = Conv(cin, 384, 3, stride=2)
      self.branch3x3dbl_1 = Conv(cin, 64, 1)
      self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
      self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
      bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
      return torch.cat([self.branch3x3(x), bd, F.max_pool2d(x, 3, stride=2)], 1)

  class C(tnn.Module):
    def __init__(self, cin, c7):
      super().__init__()
      self.branch1x1 = Conv(cin, 192, 1)
      self.branch7x7_1 = Conv(cin, c7, 1)
      self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
      self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
      self.branch7x7dbl_1 = Conv(cin, c7, 1)
      self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
      self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
      self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
      self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
      self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
      b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
      bd = x
      for i in range(1, 6):
        bd = getattr(self, f"branch7x7dbl_{i}")(bd)
      return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg3(x))], 1)

  class D(tnn.Module):
    def __init__(self, cin):
      super().__init__()
      self.branch3x3_1 = Conv(cin, 192, 1)
      self.branch3x3_2 = Conv(192, 320, 3, stride=2)
      self.branch7x7x3_1 = Conv(cin, 192, 1)
      self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
      self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
      self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
      b7 = x
      for i in range(1, 5):
        b7 = getattr(self, f"branch7x7x3_{i}")(b7)
      b3 = self.branch3x3_2(self.branch3x3_1(x))
      return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)

  class E(tnn.Module):
    def __init__(self, cin, max_pool):
      super().__init__()
      self.max_pool = max_pool
      self.branch1x1 = Conv(cin, 320, 1)
      self.branch3x3_1 = Conv(cin, 384, 1)
      self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
      self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
      self.branch3x3dbl_1 = Conv(cin, 448, 1)
      self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
      self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
      self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
      self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
      b3 = self.branch3x3_1(x)
      b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
      bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
      bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
      pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg3(x)
      return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)

  class FIDInceptionV3(tnn.Module):
    def __init__(self):
      super().__init__()
      self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
      self.Conv2d_2a_3x3 = Conv(32, 32, 3)
      self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
      self.Conv2d_3b_1x1 = Conv(64, 80, 1)
      self.Conv2d_4a_3x3 = Conv(80, 192, 3)
      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
      self.Mixed_6a = B(288)
      self.Mixed_6b, self.Mixed_6c = C(768, 128), C(768, 160)
      self.Mixed_6d, self.Mixed_6e = C(768, 160), C(768, 192)
      self.Mixed_7a = D(768)
      self.Mixed_7b, self.Mixed_7c = E(1280, False), E(2048, True)
      self.fc = tnn.Linear(2048, 1008)

    def forward(self, x):
      x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
      x = 2 * x - 1
      x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
      x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
      x = F.max_pool2d(x, 3, stride=2)
      for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
        x = getattr(self, "Mixed_" + name)(x)
      pool = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
      return pool, self.fc(pool)

  return torch, FIDInceptionV3().eval()


@pytest.fixture(scope="module")
def torch_model(state_dict):
  torch, model = _torch_fid_inception()
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  return torch, model


def test_torch_shapes_match_reference(torch_model):
  torch, model = torch_model
  ref = {k: tuple(v.shape) for k, v in model.state_dict().items()
         if not k.endswith("num_batches_tracked")}
  assert ref == inception.torch_shapes()


def test_matches_pytorch_reference(torch_model, state_dict, tmp_path):
  """torch.save -> load_fid_inception (our reader + conversion) -> same pool / logits as the
  PyTorch reference, on 2 uint8 images of 150x200 (so the resize is part of the comparison)."""
  torch, model = torch_model
  path = tmp_path / "pt_inception.pth"
  torch.save(model.state_dict(), path)
  features = inception.load_fid_inception(path, batch_size=2)
  images = _images((2, 150, 200, 3), seed=1)
  out = features(images)
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    pool, logits = (t.numpy() for t in model(x))
  for name, ref in (("pool", pool), ("logits", logits)):
    got = out[name]
    assert got.shape == ref.shape and got.dtype == np.float32
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, (name, rel)
  assert np.abs(pool).mean() > 0.05  # activations stay O(1): the comparison is not vacuous


def test_npz_weights_equal_pth(torch_model, tmp_path):
  torch, model = torch_model
  sd = model.state_dict()
  torch.save(sd, tmp_path / "w.pth", _use_new_zipfile_serialization=False)
  np.savez(tmp_path / "w.npz", **{k: v.numpy() for k, v in sd.items()})
  a = inception.convert_pytorch_fid(load_state_dict(tmp_path / "w.pth"))
  b = inception.convert_pytorch_fid(load_state_dict(tmp_path / "w.npz"))
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b))


@pytest.mark.parametrize("hw", [(32, 32), (256, 256), (512, 384), (299, 299)])
def test_resize_matches_torch_interpolate(hw):
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(hw[0]).random((2, *hw, 3), dtype=np.float32)
  ref = torch.nn.functional.interpolate(
      torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
      align_corners=False).permute(0, 2, 3, 1).numpy()
  got = np.asarray(inception.resize_299(x))
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_shapes_and_determinism(features):
  images = _images((2, 64, 48, 3))
  a, b = features(images), features(images)
  chex.assert_shape([a["pool"], a["logits"]], [(2, 2048), (2, 1008)])
  chex.assert_type(list(a.values()), np.float32)
  chex.assert_tree_all_finite(a)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.allclose(a["pool"][0], a["pool"][1])  # the two images differ


def test_grayscale_and_float_inputs(features):
  gray = _images((2, 40, 40, 1), seed=2)
  a = features(gray)
  b = features(np.repeat(gray, 3, axis=-1))
  c = features(np.repeat(gray, 3, axis=-1).astype(np.float32))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(b[k], c[k])


def test_chunking_pads_the_last_batch(features):
  images = _images((3, 30, 30, 3), seed=4)
  whole = features(images)  # chunks of 2: [0, 1], [2, pad]
  first, last = features(images[:2]), features(np.concatenate([images[2:], images[:1]]))
  for k in whole:
    np.testing.assert_allclose(whole[k][:2], first[k], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(whole[k][2], last[k][0], rtol=1e-6, atol=1e-6)
  assert features(images[:0])["pool"].shape == (0, 2048)


def test_bad_images_rejected(features):
  with pytest.raises(ValueError, match=r"\(B, H, W, 1 or 3\)"):
    features(np.zeros((2, 32, 32, 4), np.uint8))
  with pytest.raises(ValueError, match=r"\[0, 255\]"):
    features(np.full((2, 32, 32, 3), -1.0, np.float32))
  def shapes(hw):
    return jax.eval_shape(inception.FIDInceptionV3().init_with_output, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, *hw, 3), np.float32))[0]

  assert shapes((75, 75))["pool"].shape == (1, 2048)  # the smallest input the network takes
  with pytest.raises(ValueError, match="H, W >= 75"):
    shapes((74, 90))


def test_conversion_lists_bad_keys(state_dict):
  sd = dict(state_dict)
  del sd["Mixed_6b.branch7x7_2.conv.weight"]
  sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  sd["fc.bias"] = np.zeros(1000, np.float32)
  with pytest.raises(CheckpointError) as e:
    inception.convert_pytorch_fid(sd)
  msg = str(e.value)
  assert "missing keys: Mixed_6b.branch7x7_2.conv.weight" in msg
  assert "unexpected keys: AuxLogits.fc.weight" in msg
  assert "fc.bias (1000,) (expected (1008,))" in msg
  no_counters = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  params = inception.convert_pytorch_fid(no_counters)  # the counters are optional
  assert params["Mixed_7c"]["branch_pool"]["kernel"].shape == (1, 1, 2048, 192)
  assert params["fc"]["kernel"].shape == (2048, 1008)


def test_load_errors_name_the_weights(tmp_path):
  with pytest.raises(CheckpointError, match="nothing is downloaded") as e:
    inception.load_fid_inception(tmp_path / "missing.pth")
  assert inception.WEIGHTS_URL in str(e.value) and "missing.pth" in str(e.value)
  np.savez(tmp_path / "other.npz", w=np.zeros(3, np.float32))
  with pytest.raises(CheckpointError, match="missing keys: Conv2d_1a_3x3.conv.weight") as e:
    inception.load_fid_inception(tmp_path / "other.npz")
  assert "other.npz" in str(e.value) and inception.WEIGHTS_URL in str(e.value)
  # the weights re-zipped with deflate (torch.save stores every record): refused unread, as
  # the same reader refuses any crafted checkpoint (tests/test_torch_checkpoint.py)
  save_state_dict(tmp_path / "w.pth", {"w": np.zeros(1 << 20, np.float32)})
  with zipfile.ZipFile(tmp_path / "w.pth") as src, \
       zipfile.ZipFile(tmp_path / "deflated.pth", "w", zipfile.ZIP_DEFLATED) as dst:
    for name in src.namelist():
      dst.writestr(name, src.read(name))
  with pytest.raises(CheckpointError, match=r"deflated.pth: member 'w/\w+' is "
                     r"compressed with deflate") as e:
    inception.load_fid_inception(tmp_path / "deflated.pth")
  assert inception.WEIGHTS_URL in str(e.value) and "\n" not in str(e.value)
