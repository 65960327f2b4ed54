"""The Python API: ``farmer_jax.load(path)`` -> a ``Model`` to sample, score, encode and decode
images with, from a notebook or another codebase (docs/api.md).

Everything here runs the code the commands run: ``Model.sample`` draws what `farmer_jax sample`
draws (the export's config.sample settings with the arguments on top, checked by the same rules,
its latent variance, self-denoising, student inverse and decode_dtype: ``generate.export_sampler``,
``on_mesh``, ``draw_samples``), ``Model.bits_per_dim`` computes what `farmer_jax eval` computes
(``likelihood.evaluate_bpd``: image i's dequantization draw k uses fold_in(fold_in(key(seed), i),
k), the bits/dim conventions of docs/math.md), and ``Model.bits_per_token`` what `farmer_jax
score` computes (``likelihood.token_bits_per_dim``, the same draws). Arguments are checked here,
once, with errors that name the bad value and the fix (``UserError``, a ValueError); the library
below trusts them.

Shape letters: n images, H W c image, N tokens, d token dim.
"""

import os

import jax
import numpy as np

from farmer_jax import conventions
from farmer_jax.artifacts import runs, storage
from farmer_jax.artifacts.export import load_model
from farmer_jax.config.rules import SettingError, is_int, is_real
from farmer_jax.config.schema import INVERSES, SAMPLE_BATCH, SAMPLER_KEYS, sampler_overrides
from farmer_jax.distributed import skip_absent_tpu
from farmer_jax.errors import UserError
from farmer_jax.eval.evaluate import load_params
from farmer_jax.eval.likelihood import evaluate_bpd, per_image_nats, token_bits_per_dim
from farmer_jax.model import Farmer
from farmer_jax.sampling import generate
from farmer_jax.sampling.sampler import invert

_STUDENT_FIX = (". Fix: load an export that carries its student (`farmer_jax export "
                "--workdir=RUN --student=DISTILL_RUN --out=DIR`), or pass inverse='exact' or "
                "'jacobi'")


def load(path, verbose=False, step=None):
  """The model at ``path``, local or in a bucket (gs://...): an export directory (`farmer_jax
  export` / `convert`, read by ``export.load_model``) or a training run's workdir (its newest
  readable checkpoint, or checkpoint ``step``; EMA params if kept; read by ``evaluate.load_params``
  as `farmer_jax eval` reads it). ``verbose``: print what is loaded and where it computes."""
  say = print if verbose else (lambda _: None)
  skip_absent_tpu(dict(os.environ))   # no libtpu start-up warnings where no TPU is attached
  path = str(path)
  if step is not None and (not is_int(step) or step < 0):
    raise UserError(f"farmer_jax.load(step={step!r}): a checkpoint step is an int >= 0. Fix: pass "
                    "a step the run keeps (its checkpoints/ folder lists them), or None")
  if storage.exists(storage.join(path, runs.EXPORT_META)):
    if step is not None:
      raise UserError(f"farmer_jax.load({path!r}, step={step}): {path} is an export, which holds "
                      "one step. Fix: leave step out, or pass the training run's workdir")
    mcfg, params, config, meta = load_model(path)
  elif storage.exists(storage.join(path, runs.CONFIG)):
    config, mcfg, params, source = load_params(workdir=path, say=say, step=step)
    meta = {"step": source["step"], "params": source["params"]}
  else:
    what = "does not exist" if not storage.exists(path) else (
        f"holds neither {runs.EXPORT_META} (an export) nor {runs.CONFIG} (a training run)")
    raise UserError(f"farmer_jax.load({path!r}): {path} {what}. Fix: pass the --out folder of "
                    "`farmer_jax export` (or `convert`) or the --workdir of `farmer_jax train`")
  say(f"loaded {path}: {_describe(mcfg, meta)}")
  return Model(path, mcfg, params, config, meta, say)


def _describe(mcfg, meta):
  h, c = mcfg.image_size, mcfg.channels
  classes = f"{mcfg.num_classes} classes" if mcfg.num_classes else "unconditional"
  step = f", step {meta['step']}" if meta.get("step") is not None else ""
  return f"{h}x{h}x{c} images, {classes}, prior {mcfg.prior}{step}"


class Model:
  """A loaded FARMER model (``load``). Images are uint8 arrays (n, H, W, c); labels are class ids
  0..num_classes-1, or ``null_class`` (no class: the unconditional model). Latents are float32
  (n, N, d) in the AR prior's order, what ``encode`` returns and ``decode`` takes.

  Attributes: ``path``, ``model_config`` (ModelConfig), ``config`` (the run config),
  ``image_shape`` (H, W, c), ``num_classes``, ``null_class``, ``latent_shape`` (N, d)."""

  def __init__(self, path, mcfg, params, config, meta, say):
    self.path = path
    self.model_config = mcfg
    self.config = config
    self._meta = meta
    self._params = jax.tree.map(np.asarray, params)   # host; placed on first use (on_mesh)
    self._say = say
    self._held = None    # (batch argument, OnMesh): the params where they compute
    self._drawn = None   # (overrides, ExportSampler): the last sampler asked for

  def __repr__(self):
    return f"farmer_jax.Model({self.path!r}: {_describe(self.model_config, self._meta)})"

  @property
  def image_shape(self):
    m = self.model_config
    return (m.image_size, m.image_size, m.channels)

  @property
  def num_classes(self):
    return self.model_config.num_classes

  @property
  def null_class(self):
    return self.model_config.null_class

  @property
  def latent_shape(self):
    return (self.model_config.num_tokens, self.model_config.token_dim)

  # -- sampling -----------------------------------------------------------------------------------

  def sample(self, classes=None, num=1, cfg=None, seed=0, *, guidance=None, inverse=None,
             batch=None, progress=False, return_stats=False, **settings):
    """Draws ``num`` samples of each of ``classes`` -> (images uint8 (n, H, W, c), labels (n,)),
    n = len(classes) * num, class-major: exactly the images (and the order) of `farmer_jax sample
    --classes=... --num=... --seed=... --npz=...` with the same settings.

    ``classes``: class ids (``null_class`` for unconditional samples); None = every class (an
    unconditional model: the null class). ``cfg``: the guidance scale w (with no ``guidance``:
    resampling CFG for w > 0, none for 0); ``guidance``, ``inverse`` ('exact', 'jacobi',
    'student') and ``settings`` (any other config.sample sampler key, e.g. ``t_sigma=0.8``,
    ``af_guidance=1.5``) override the model's config.sample. Sample j uses the key
    fold_in(key(seed), j), whatever ``batch``. ``return_stats``: also the per-sample stats
    (resampling CFG's effective sample sizes, Jacobi iterations)."""
    classes = self._classes(classes)
    _check_int("num", num, 1, "the samples per class, e.g. num=8")
    _check_int("seed", seed, None, "e.g. seed=0")
    if batch is not None:
      _check_int("batch", batch, 1, "samples per call over all devices, e.g. batch=64")
    drawn = self._sampler(cfg, guidance, inverse, settings)
    placed = self._on_mesh(batch, drawn.student, exact_batch=True)
    images, labels, stats = generate.draw_samples(self.model_config, placed, drawn, classes, num,
                                                  seed, progress=progress)
    images, labels = images.reshape(-1, *images.shape[2:]), labels.reshape(-1)
    return (images, labels, stats) if return_stats else (images, labels)

  def _sampler(self, cfg, guidance, inverse, settings):
    """The ``generate.export_sampler`` of these arguments (the last one is kept)."""
    if cfg is not None and not is_real(cfg):
      raise UserError(f"cfg={cfg!r} is not a finite number. Fix: pass the guidance scale w >= 0, "
                      "e.g. cfg=2.0 (or leave it out: the model's config.sample.cfg)")
    if guidance is not None and not isinstance(guidance, str):
      raise UserError(f"guidance={guidance!r} is not a name. Fix: e.g. guidance='resampling'")
    if inverse is not None and inverse not in INVERSES:
      raise UserError(f"inverse={inverse!r} is unknown. Fix: one of {', '.join(INVERSES)} (or "
                      "leave it out: the model's config.sample.inverse)")
    try:
      over = sampler_overrides(cfg, guidance, inverse, settings)
      key = tuple(sorted(over.items()))
      if self._drawn is None or self._drawn[0] != key:
        self._drawn = None
        self._drawn = (key, generate.export_sampler(self.path, self.model_config, self.config,
                                                    self._meta, over, student_fix=_STUDENT_FIX))
    except SettingError as e:
      fix = (f"pass a valid {' and '.join(e.names)} (what is not passed comes from the model's "
             "config.sample)") if e.names[0] in SAMPLER_KEYS else "use one of the known settings"
      raise UserError(f"{e}. Fix: {fix}") from None
    except TypeError as e:   # a value of the wrong kind, e.g. a list where a number goes
      raise UserError(f"sampler settings {settings}: {e}. Fix: numbers for the numeric "
                      "settings, names for guidance, redundant_pool, decode_dtype") from None
    return self._drawn[1]

  def _on_mesh(self, batch=None, student=None, exact_batch=False):
    """The params placed for computing (``generate.on_mesh``; ``student``: placed too), kept: placed
    again only for a student they lack or, with ``exact_batch``, another ``batch`` argument."""
    held = self._held
    if (held is None or (student is not None and held[1].student is None)
        or (exact_batch and held[0] != batch)):
      self._held = None   # the old copy goes before the new one is made
      self._held = (batch, generate.on_mesh(self.config, self.model_config, self._params,
                                            student, batch, self._say))
    return self._held[1]

  # -- likelihood ---------------------------------------------------------------------------------

  def bits_per_dim(self, images, labels=None, seed=0, samples=1, batch=None):
    """Exact bits/dim of each image (n,) float64, what `farmer_jax eval` computes: -log p(x + u
    | y) / D in nats, mean over ``samples`` uniform dequantization draws u (draw k of image i from
    fold_in(fold_in(key(seed), i), k)), converted to bits of the 8-bit image (docs/math.md).
    ``labels``: (n,) class ids or one id for all; None = the null class (-log p(x | null), the
    unconditional number)."""
    nats = self._nats_per_dim(images, labels, seed, samples, batch)
    return np.asarray(conventions.bits_per_dim(nats, self.model_config.pixels))

  def log_prob(self, images, labels=None, seed=0, samples=1, batch=None):
    """log P(image | label) of each uint8 image (n,) float64, in nats: the uniform-dequantization
    bound of the discrete image's log-probability, mean_u log p(x + u | y) + D log(bin width), so
    that ``bits_per_dim == -log_prob / (D ln 2)``. Arguments as ``bits_per_dim``."""
    nats = self._nats_per_dim(images, labels, seed, samples, batch)
    d = self.model_config.num_dims
    return -(nats - conventions.log_bin_width(self.model_config.pixels)) * d

  def bits_per_token(self, images, labels=None, seed=0, samples=1, batch=None, progress=False,
                     return_terms=False):
    """Likelihood maps: the exact bits/dim of each token (n, H/p, W/p) float64, token (r, s) the
    p x p patch at rows r p.., columns s p..: its -log p over its p^2 c dims (its AF log-det and
    its prior terms; docs/eval.md), with the dequantization draws of ``bits_per_dim`` (same
    arguments), so ``bits_per_token(x, y).mean(axis=(1, 2)) == bits_per_dim(x, y)`` up to fp32
    rounding. ``progress``: print a progress bar. ``return_terms``: return instead the dict of
    ``likelihood.token_bits_per_dim`` ('token_bpd', 'bpd', 'token_terms')."""
    images, labels, batch = self._likelihood_args(images, labels, seed, samples, batch)
    bar = None
    if progress:
      from tqdm import tqdm
      bar = tqdm(total=len(images), desc="bits/token", dynamic_ncols=True)
    res = token_bits_per_dim(Farmer(self.model_config), self._on_mesh().params, images, labels,
                             batch, seed=seed, samples=samples,
                             progress=bar and (lambda done: bar.update(done - bar.n)))
    if bar is not None:
      bar.close()
    return res if return_terms else res["token_bpd"]

  def _nats_per_dim(self, images, labels, seed, samples, batch):
    images, labels, batch = self._likelihood_args(images, labels, seed, samples, batch)
    placed = self._on_mesh()
    res = evaluate_bpd(Farmer(self.model_config), placed.params, images, labels, batch, seed=seed,
                       samples=samples, per_example=True)
    return per_image_nats(res["per_example"]["log_prob"], self.model_config.num_dims)

  def _likelihood_args(self, images, labels, seed, samples, batch):
    """The checked (images, labels, batch) of a likelihood call."""
    images = self._images(images, floats=False)
    labels = self._labels(labels, len(images))
    _check_int("seed", seed, None, "e.g. seed=0")
    _check_int("samples", samples, 1, "dequantization draws per image, e.g. samples=1")
    batch = self._batch(batch, len(images), int(self.config.get("eval", {}).get("batch_size", 0))
                        or SAMPLE_BATCH)
    return images, labels, batch

  # -- the flow -----------------------------------------------------------------------------------

  def encode(self, images, labels=None, batch=None):
    """Images -> their latents z (n, N, d) float32 (the AF forward, in AR order), computing in the
    model's dtype. ``images``: uint8 (each pixel at the centre of its bin) or floats in model
    space; ``labels`` as ``bits_per_dim`` (they matter only for a class-conditional AF)."""
    x = self._images(images, floats=True)
    if x.dtype == np.uint8:
      x = np.asarray(conventions.uint8_to_centre(x, self.model_config.pixels))
    y = self._labels(labels, len(x))
    params = self._on_mesh().params
    return _chunked(lambda xx, yy: _encode(self.model_config, params, xx, yy),
                    self._batch(batch, len(x)), x, y)

  def decode(self, z, labels=None, inverse=None, as_uint8=True, batch=None, **settings):
    """Latents z (n, N, d) -> images: uint8 (n, H, W, c), or with ``as_uint8=False`` float32 in
    model space. The AF inverse ``inverse`` ('exact', 'jacobi', or 'student': an export's distilled
    student; default: the model's config.sample.inverse) in its decode_dtype, the same inverse
    ``sample`` runs, without guidance or denoising: decode(encode(x)) == x. ``settings``: other
    sampler keys (jacobi_tol, jacobi_max_iters, decode_dtype)."""
    z = self._latents(z)
    y = self._labels(labels, len(z))
    drawn = self._sampler(None, None, inverse, dict(settings, af_guidance=0.0))
    placed = self._on_mesh(student=drawn.student)
    s, mcfg = drawn.sampler, self.model_config
    x = _chunked(lambda zz, yy: _invert(mcfg, placed.params, zz, yy, s, placed.student)[0],
                 self._batch(batch, len(z)), z, y)
    return conventions.to_uint8(x, mcfg.pixels) if as_uint8 else x

  def interpolate(self, a, b, steps=8, label=None, inverse=None):
    """``steps`` images (steps, H, W, c) uint8 on the straight line from ``a``'s latents to
    ``b``'s (each one image (H, W, c), uint8 or floats in model space), both encoded and decoded
    with ``label`` (None: the null class); the first is ``a``, the last ``b``."""
    _check_int("steps", steps, 2, "frames including both ends, e.g. steps=8")
    z = []
    for name, v in (("a", a), ("b", b)):
      v = np.asarray(v)
      if v.shape != self.image_shape:
        raise UserError(f"{name} has shape {v.shape}; interpolate takes one image of shape "
                        f"{self.image_shape}. Fix: pass images[i], not a batch")
      z.append(self.encode(v[None], label)[0])
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None, None]
    return self.decode((1 - t) * z[0] + t * z[1], label, inverse)

  # -- argument checks ----------------------------------------------------------------------------

  def _images(self, images, floats):
    """images as a checked numpy array (n, H, W, c): uint8, or (``floats``) finite floats."""
    x = np.asarray(images)
    want = self.image_shape
    if x.ndim != 4 or x.shape[1:] != want or x.shape[0] < 1:
      fix = f"pass an array of shape (n, {', '.join(map(str, want))})"
      if x.shape == want:
        fix = "add the batch axis: images[None]"
      elif x.ndim == 4 and x.shape[1] == want[2] and x.shape[2:] == want[:2]:
        fix = "channels last: images.transpose(0, 2, 3, 1)"
      raise UserError(f"images have shape {x.shape}; this model takes (n, H, W, c) = "
                      f"(n, {', '.join(map(str, want))}). Fix: {fix}")
    if x.dtype == np.uint8:
      return x
    if floats and np.issubdtype(x.dtype, np.floating):
      if not np.all(np.isfinite(x)):
        raise UserError("images hold NaN or inf values. Fix: pass finite model-space values "
                        "(or uint8 pixels)")
      return x.astype(np.float32)
    kinds = "uint8 pixels (0..255)" + (" or floats in model space" if floats else "")
    raise UserError(f"images have dtype {x.dtype}; this takes {kinds}. Fix: "
                    "images.astype(np.uint8) if they hold 0..255 pixel values")

  def _latents(self, z):
    z = np.asarray(z)
    want = self.latent_shape
    if z.ndim != 3 or z.shape[1:] != want or z.shape[0] < 1:
      fix = "add the batch axis: z[None]" if z.shape == want else (
          f"pass latents of shape (n, {want[0]}, {want[1]}), e.g. from model.encode")
      raise UserError(f"z has shape {z.shape}; this model's latents are (n, N, d) = "
                      f"(n, {want[0]}, {want[1]}). Fix: {fix}")
    if not np.issubdtype(z.dtype, np.floating) or not np.all(np.isfinite(z)):
      raise UserError(f"z must hold finite floats (got dtype {z.dtype}). Fix: pass model.encode's "
                      "output or interpolations of it")
    return z.astype(np.float32)

  def _labels(self, labels, n):
    """(n,) int32 labels: None = the null class, one id = for every image; each checked."""
    if labels is None:
      return np.full((n,), self.null_class, np.int32)
    y = np.asarray(labels)
    if y.ndim == 0:
      y = np.full((n,), y)
    if y.shape != (n,):
      raise UserError(f"labels have shape {y.shape}; there are {n} images. Fix: one label per "
                      "image (shape (n,)), one id for all, or None for the null class")
    if y.dtype.kind not in "iu":
      raise UserError(f"labels have dtype {y.dtype}; they are class ids. Fix: "
                      "labels.astype(np.int32)")
    bad = np.flatnonzero((y < 0) | (y > self.null_class))
    if len(bad):
      i = int(bad[0])
      raise UserError(f"labels[{i}] = {int(y[i])} is out of range: {self._class_range()}. Fix: "
                      "pass ids in that range")
    return y.astype(np.int32)

  def _classes(self, classes):
    if classes is None:
      return generate.parse_classes(None, self.num_classes)
    items = [classes] if np.ndim(classes) == 0 else list(np.asarray(classes).reshape(-1))
    if not items:
      raise UserError("classes=[] asks for nothing. Fix: pass class ids, or None for all")
    for c in items:
      if not is_int(c) or not 0 <= c <= self.null_class:
        shown = int(c) if is_int(c) else repr(c)
        raise UserError(f"classes: {shown} is not a class id of this model: "
                        f"{self._class_range()}. Fix: pass ids in that range")
    return [int(c) for c in items]

  def _class_range(self):
    if not self.num_classes:
      return f"it is unconditional; its only label is the null class {self.null_class}"
    return (f"this model has {self.num_classes} classes (0..{self.num_classes - 1}) and the null "
            f"class {self.null_class} (unconditional)")

  @staticmethod
  def _batch(batch, n, default=SAMPLE_BATCH):
    if batch is None:
      return min(n, default)
    _check_int("batch", batch, 1, "e.g. batch=64")
    return min(n, batch)


def _check_int(name, v, low, fix):
  if not is_int(v) or (low is not None and v < low):
    need = "an integer" + (f" >= {low}" if low is not None else "")
    raise UserError(f"{name}={v!r} must be {need}. Fix: {fix}")


def _chunked(fn, batch, *arrays):
  """fn over rows of ``arrays`` in chunks of ``batch`` (the last one padded with its last row, so
  one compiled shape serves every chunk) -> numpy, rows in order."""
  n = len(arrays[0])
  out = []
  for start in range(0, n, batch):
    part = [a[start:start + batch] for a in arrays]
    m = len(part[0])
    if m < batch:
      part = [np.concatenate([p, np.repeat(p[-1:], batch - m, axis=0)]) for p in part]
    out.append(np.asarray(fn(*part))[:m])
  return np.concatenate(out)


def _encode_fn(cfg, params, x, y):
  return Farmer(cfg).apply({"params": params}, x, y, method=Farmer.encode)[0]


_encode = jax.jit(_encode_fn, static_argnums=0)
_invert = jax.jit(invert, static_argnums=(0, 4))
