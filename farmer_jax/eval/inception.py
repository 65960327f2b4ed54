"""The FID Inception-v3 network (pytorch-fid's ``FIDInceptionV3``) in Flax, with its weights read
from a local file: nothing is ever downloaded.

The weights are pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (the state_dict of
``FIDInceptionV3``: torchvision's Inception3 layout with the FID blocks FIDInceptionA/C/E_1/E_2,
1008 classes, no aux head), from ``WEIGHTS_URL``, or the same state_dict saved as ``.npz``::

  python -c "import torch, numpy as np; np.savez('fid_inception.npz', **{k: v.numpy() for k, v
  in torch.load('pt_inception-2015-12-05-6726825d.pth').items()})"

``load_fid_inception(path)`` returns ``features(images)``: images uint8 or float in [0, 255],
(B, H, W, 1 or 3), any size, are resized to 299x299 as pytorch-fid does
(``F.interpolate(x / 255, (299, 299), mode='bilinear', align_corners=False)``: half-pixel
centres, no antialiasing), mapped to [-1, 1] and run through the network; the result is
``{'pool': (B, 2048), 'logits': (B, 1008)}`` numpy float32: 'pool' the pool3 features of FID,
'logits' the fc layer on them (Inception Score style; index 0 is the background class).

Layout: NHWC (torch: NCHW); conv kernels HWIO (torch: OIHW); each BasicConv2d (conv without bias,
BatchNorm eps 1e-3, ReLU) is a conv with bias, the eval-mode BatchNorm folded into it
(``convert_pytorch_fid``). Convolutions and the fc run at Precision.HIGHEST (full fp32 on
accelerators too). Parameter names follow torchvision ('Conv2d_1a_3x3' ... 'Mixed_7c', 'fc').

Shape letters: B batch, H W image height/width (input) or feature map, C channels (1 or 3 for
images), O I conv output/input channels, kh kw kernel height/width.
"""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from farmer_jax.errors import UserError
from farmer_jax.interop.torch_checkpoint import CheckpointError, load_state_dict

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
SIZE = 299  # input height and width of the network
MIN_SIZE = 75  # the smallest input the stride-2 stages leave a non-empty map for
FEATURE_BATCH = 50  # images per network call (FIDFeatures' default chunk)
NUM_CLASSES = 1008
POOL_FEATURES = 2048
BN_EPS = 1e-3
_HI = jax.lax.Precision.HIGHEST


class BasicConv2d(nn.Module):
  """conv (kernel kh x kw, stride, zero padding (ph, pw)) + bias (the folded BatchNorm) + ReLU:
  (B, H, W, I) -> (B, H', W', O)."""
  features: int
  kernel: tuple = (1, 1)
  stride: int = 1
  padding: tuple = (0, 0)

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    (ph, pw) = self.padding
    y = jax.lax.conv_general_dilated(
        x, kernel, (self.stride, self.stride), ((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HI)
    return nn.relu(y + bias)


def _avg_pool3(x):
  """3x3 stride-1 average over the valid pixels of the zero-padded window (the FID blocks'
  ``avg_pool2d(x, 3, 1, 1, count_include_pad=False)``)."""
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool3s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class FIDInceptionA(nn.Module):
  """Mixed_5b/c/d: (B, H, W, I) -> (B, H, W, 224 + pool_features)."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, name="branch1x1")(x)
    b5 = BasicConv2d(48, name="branch5x5_1")(x)
    b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, name="branch_pool")(_avg_pool3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: (B, H, W, I) -> (B, (H-3)//2+1, (W-3)//2+1, 480 + I)."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv2d(64, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool3s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6b/c/d/e: (B, H, W, I) -> (B, H, W, 768)."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, name="branch1x1")(x)
    b7 = BasicConv2d(c7, name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, name="branch_pool")(_avg_pool3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: (B, H, W, I) -> (B, (H-3)//2+1, (W-3)//2+1, 512 + I)."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, name="branch3x3_1")(x)
    b3 = BasicConv2d(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool3s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7b (FIDInceptionE_1: average pool, count_include_pad=False) and Mixed_7c
  (FIDInceptionE_2, ``max_pool=True``: 3x3 stride-1 max pool) in the pool branch:
  (B, H, W, I) -> (B, H, W, 2048)."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(320, name="branch1x1")(x)
    b3 = BasicConv2d(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv2d(448, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))  # pads with -inf, like torch
    else:
      pooled = _avg_pool3(x)
    bp = BasicConv2d(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """pytorch-fid's FIDInceptionV3 in eval mode: images float32 (B, H, W, 3) in [-1, 1] (299x299
  for FID; H, W >= 75) -> dict(pool=(B, 2048) the global average pool (pool3), logits=(B, 1008)
  the fc layer on it)."""

  @nn.compact
  def __call__(self, x):
    if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < MIN_SIZE:
      raise ValueError(f"FIDInceptionV3 takes images (B, H, W, 3) with H, W >= {MIN_SIZE}, "
                       f"got shape {x.shape}")
    x = x.astype(jnp.float32)
    x = BasicConv2d(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool3s2(x)
    x = BasicConv2d(80, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool3s2(x)
    x = FIDInceptionA(32, name="Mixed_5b")(x)
    x = FIDInceptionA(64, name="Mixed_5c")(x)
    x = FIDInceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = FIDInceptionC(128, name="Mixed_6b")(x)
    x = FIDInceptionC(160, name="Mixed_6c")(x)
    x = FIDInceptionC(160, name="Mixed_6d")(x)
    x = FIDInceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = FIDInceptionE(name="Mixed_7b")(x)
    x = FIDInceptionE(max_pool=True, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_CLASSES, precision=_HI, name="fc")(pool)
    return {"pool": pool, "logits": logits}


@functools.cache
def abstract_params():
  """FIDInceptionV3's params as ShapeDtypeStructs (abstract init: no compute)."""
  return jax.eval_shape(FIDInceptionV3().init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32))["params"]


def _param_shapes():
  """{flax param path (tuple of names): shape} of FIDInceptionV3 (abstract init: no compute)."""
  flat = jax.tree_util.tree_flatten_with_path(abstract_params())[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def torch_shapes():
  """{pytorch-fid state_dict key: shape} of every tensor ``convert_pytorch_fid`` needs (the
  optional BatchNorm ``num_batches_tracked`` counters left out)."""
  shapes = {}
  for path, shape in _param_shapes().items():
    prefix = ".".join(path[:-1])
    if path == ("fc", "kernel"):
      shapes["fc.weight"] = shape[::-1]
    elif path == ("fc", "bias"):
      shapes["fc.bias"] = shape
    elif path[-1] == "kernel":
      kh, kw, i, o = shape
      shapes[prefix + ".conv.weight"] = (o, i, kh, kw)
      for name in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{prefix}.bn.{name}"] = (o,)
  return shapes


def _listing(keys, limit=12):
  keys = list(keys)
  more = f" ... ({len(keys)} in all)" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def convert_pytorch_fid(state_dict):
  """pytorch-fid FIDInceptionV3 state_dict (name -> array, torch layout) -> FIDInceptionV3 params
  (nested dicts of float32 numpy arrays): conv weights (O, I, kh, kw) -> kernels (kh, kw, I, O)
  with the eval-mode BatchNorm (eps 1e-3) folded in (in float64) as scale and bias; fc weight
  (1008, 2048) transposed. Every key is used except BatchNorm ``num_batches_tracked`` counters;
  missing, unexpected or wrongly shaped keys -> CheckpointError listing them."""
  expected = torch_shapes()
  bn_prefixes = {k[:-len(".running_mean")] for k in expected if k.endswith(".running_mean")}
  missing = [k for k in expected if k not in state_dict]
  extra = [k for k in state_dict if k not in expected and not (
      k.endswith(".num_batches_tracked") and k[:-len(".num_batches_tracked")] in bn_prefixes)]
  wrong = [f"{k} {tuple(np.shape(state_dict[k]))} (expected {expected[k]})"
           for k in expected if k in state_dict and tuple(np.shape(state_dict[k])) != expected[k]]
  if missing or extra or wrong:
    problems = [f"{name}: {_listing(keys)}" for name, keys in
                (("missing keys", missing), ("unexpected keys", extra), ("wrong shapes", wrong))
                if keys]
    raise CheckpointError("not a pytorch-fid FIDInceptionV3 state_dict (" + "; ".join(problems)
                          + f"); the weights file is {os.path.basename(WEIGHTS_URL)}")

  def get(key):
    return np.asarray(state_dict[key], np.float64)

  params = {}
  for path in _param_shapes():
    if path[-1] != "kernel":
      continue
    prefix = ".".join(path[:-1])
    if prefix == "fc":
      kernel, bias = get("fc.weight").T, get("fc.bias")
    else:
      scale = get(prefix + ".bn.weight") / np.sqrt(get(prefix + ".bn.running_var") + BN_EPS)
      kernel = (get(prefix + ".conv.weight") * scale[:, None, None, None]).transpose(2, 3, 1, 0)
      bias = get(prefix + ".bn.bias") - get(prefix + ".bn.running_mean") * scale
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node["kernel"] = kernel.astype(np.float32)
    node["bias"] = bias.astype(np.float32)
  return params


def resize_299(images):
  """float (B, H, W, C) -> (B, 299, 299, C) like ``F.interpolate(.., size=(299, 299),
  mode='bilinear', align_corners=False)``: half-pixel centres, edge clamping, no antialiasing
  (also when shrinking)."""
  b, h, w, c = images.shape
  if (h, w) == (SIZE, SIZE):
    return images
  return jax.image.resize(images, (b, SIZE, SIZE, c), "bilinear", antialias=False,
                          precision=_HI)


@jax.jit
def preprocess(images):
  """images (B, H, W, C) uint8 or float in [0, 255], C 1 or 3 -> the network's input float32
  (B, 299, 299, 3) in [-1, 1], in pytorch-fid's order: x / 255, resize, 2x - 1. Jitted apart
  from the network so that a new image shape only compiles this."""
  x = images.astype(jnp.float32) / 255.0
  x = resize_299(x)
  if x.shape[-1] == 1:  # what PIL's convert('RGB') does to grayscale images in pytorch-fid
    x = jnp.repeat(x, 3, axis=-1)
  return 2.0 * x - 1.0


@jax.jit
def network(params, x):
  return FIDInceptionV3().apply({"params": params}, x)


class FIDFeatures:
  """``features(images)`` -> dict(pool=(B, 2048), logits=(B, 1008)) numpy float32 of images
  uint8 or float in [0, 255], (B, H, W, 1 or 3), any H, W (resized to 299x299). Runs jitted
  chunks of ``batch_size`` images (the last one zero-padded), so one compile per image shape."""

  def __init__(self, params, batch_size=FEATURE_BATCH):
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1")
    self.params = jax.device_put(params)
    self.batch_size = batch_size

  def __call__(self, images):
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or 0 in images.shape[1:]:
      raise UserError(f"images must be (B, H, W, 1 or 3), got shape {images.shape}")
    if images.dtype != np.uint8:
      if not (np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype,
                                                                        np.integer)):
        raise ValueError(f"images must be uint8 or float in [0, 255], got {images.dtype}")
      images = images.astype(np.float32)
      if images.size and not (images.min() >= 0 and images.max() <= 255):
        raise ValueError(f"images must lie in [0, 255] (pytorch-fid scales 8-bit pixels), got "
                         f"values in [{images.min()}, {images.max()}]; map [-1, 1] images with "
                         f"(x + 1) * 127.5")
    n = images.shape[0]
    if n == 0:
      return {"pool": np.zeros((0, POOL_FEATURES), np.float32),
              "logits": np.zeros((0, NUM_CLASSES), np.float32)}
    bs = min(n, self.batch_size)
    outs = []
    for start in range(0, n, bs):
      chunk = images[start:start + bs]
      if len(chunk) < bs:
        pad = np.zeros((bs - len(chunk),) + chunk.shape[1:], chunk.dtype)
        chunk = np.concatenate([chunk, pad])
      outs.append(network(self.params, preprocess(chunk)))
    return {k: np.concatenate([np.asarray(o[k]) for o in outs])[:n].astype(np.float32)
            for k in ("pool", "logits")}


def load_fid_inception(path, batch_size=FEATURE_BATCH):
  """FIDFeatures (``features(images)``) with pytorch-fid's FID Inception weights from the local
  file ``path``: ``pt_inception-2015-12-05-6726825d.pth`` (``.pth``/``.pt``) or the same state_dict
  as ``.npz``. Nothing is downloaded; a missing or wrong file raises CheckpointError saying what
  the file should be and where to get it."""
  path = os.fspath(path)
  what = (f"expected pytorch-fid's FID Inception weights {os.path.basename(WEIGHTS_URL)} "
          f"(download it yourself from {WEIGHTS_URL}; nothing is downloaded automatically) or "
          f"the same state_dict saved as .npz")
  if not os.path.isfile(path):
    raise CheckpointError(f"FID Inception weights file {path!r} not found: {what}")
  try:
    params = convert_pytorch_fid(load_state_dict(path))
  except CheckpointError as e:
    msg = str(e) if str(e).startswith(path) else f"{path}: {e}"
    raise CheckpointError(f"{msg}; {what}") from None
  return FIDFeatures(params, batch_size)
