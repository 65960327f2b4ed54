"""Batched, seeded, batch-size-independent generation from a model (what `farmer_jax sample`,
`fid` and the Python API draw with), the sampler of an export (``export_sampler``), and a model
placed for sampling on its run's mesh (``on_mesh``, ``draw_samples``).

Shape letters: R requested classes, K samples per class, H W c image.
Sample j of the flattened (class-major) grid always uses key fold_in(key(seed), j), so a sample does
not depend on the batch size or on which other samples are drawn with it.
"""

import contextlib
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from farmer_jax import sharding
from farmer_jax.artifacts.storage import atomic_file
from farmer_jax.config.schema import SAMPLE_BATCH, SAMPLER_KEYS, SamplerConfig
from farmer_jax.conventions import to_uint8
from farmer_jax.errors import UserError
from farmer_jax.sampling.images import grid_image
from farmer_jax.sampling.sampler import sample_images, sample_keys


def parse_classes(spec, num_classes):
  """'3,7,9' | 'all' | 'null' -> list of int labels; the null class id is num_classes."""
  if spec in (None, "", "all"):
    return list(range(num_classes)) if num_classes else [num_classes]
  out = []
  for tok in str(spec).split(","):
    tok = tok.strip()
    if tok == "null":
      out.append(num_classes)
      continue
    try:
      c = int(tok)
    except ValueError:
      raise UserError(
          f"--classes entry {tok!r} is not an integer class id (or 'null'/'all')") from None
    if not 0 <= c < num_classes:
      raise UserError(
          f"class id {c} is out of range: this model has {num_classes} classes "
          f"(0..{num_classes - 1}); use 'null' for unconditional samples")
    out.append(c)
  return out


@dataclasses.dataclass(frozen=True)
class ExportSampler:
  """What draws an export's samples: the checked ``sampler``, the config.sample ``settings`` it was
  built from (the export's, with the overrides on top), the distilled ``student`` params
  (inverse=student, else None) and the export's ``latent_var`` (or None)."""
  sampler: SamplerConfig
  settings: dict
  student: object
  latent_var: object


def export_sampler(model_dir, mcfg, config, meta, overrides=None, student_fix=""):
  """The sampler of the export at ``model_dir`` (``mcfg, config, meta`` from
  ``export.load_model``): its config.sample sampler settings with ``overrides`` (config.sample
  keys) on top, checked against the model (SettingError), with its student when the inverse is
  ``student`` (ExportError when it carries none; ``student_fix`` ends that message) and its latent
  variance."""
  from farmer_jax.artifacts.export import ExportError, load_latent_var, load_student
  settings = {k: v for k, v in dict(config.get("sample", {})).items() if k in SAMPLER_KEYS}
  settings.update(overrides or {})
  sampler = SamplerConfig.from_config(settings)
  sampler.check_model(mcfg)
  student = None
  if sampler.inverse == "student":
    student = load_student(model_dir, mcfg, meta)
    if student is None:
      raise ExportError(f"inverse=student: {model_dir} carries no distilled student"
                        + student_fix)
  return ExportSampler(sampler, settings, student, load_latent_var(model_dir, mcfg, meta))


def make_sample_fn(mcfg, sampler, latent_var=None, batch_sharding=None, gather_weights=False):
  """The jitted sampler, kept for the next request of the same one (``_sample_fn``): f(params,
  key_data (B, 2) uint32, labels (B,), student_params) -> (images in model space (B, H, W, c),
  finite (B,) bool, per-sample stats); ``key_data``: the samples' keys
  (``sample_keys``) as ``jax.random.key_data``. ``batch_sharding``: a mesh's batch sharding (the
  keys, labels and images are split over its data-parallel slots, across processes; ``finite`` and
  the stats, small, are replicated so every process sees them), or None: one device.
  ``latent_var``: an export's latent variance (``export.load_latent_var``), or None.
  ``gather_weights`` (with a mesh): the weights are gathered once per call and every device runs
  the whole model on its own samples, computing each as one device would (a contraction split over
  FSDP shards sums in another order) with no per-token collectives in the decode loop, at the cost
  of a full copy of the weights per device; else they stay sharded as given. The returned
  ``SampleFn`` also names the model's pixel mapping (``draw_batch`` reads it)."""
  if latent_var is not None:   # hashable: by value
    latent_var = np.asarray(latent_var, np.float32)
    latent_var = (latent_var.shape, latent_var.tobytes())
  return _sample_fn(mcfg, sampler, latent_var, batch_sharding, gather_weights)


@functools.lru_cache(maxsize=8)
def _sample_fn(mcfg, sampler, latent_var, batch_sharding, gather_weights):
  """``make_sample_fn``, remembered: a second request for the same sampler (a notebook's next
  ``Model.sample``) reuses its compilation. ``latent_var``: (shape, float32 bytes) or None."""
  if latent_var is not None:
    latent_var = np.frombuffer(latent_var[1], np.float32).reshape(latent_var[0])
  jit_kw, rep = {}, None
  if isinstance(batch_sharding, NamedSharding):
    rep = NamedSharding(batch_sharding.mesh, PartitionSpec())
    jit_kw = {"out_shardings": (batch_sharding, rep, rep)}
  elif batch_sharding is not None:   # one device, named
    jit_kw = {"out_shardings": batch_sharding}

  def sample(params, key_data, labels, student_params):
    if gather_weights and rep is not None:
      params, student_params = jax.lax.with_sharding_constraint((params, student_params), rep)
    x, stats = sample_images(mcfg, params, jax.random.wrap_key_data(key_data), labels, sampler,
                             return_stats=True, student_params=student_params,
                             latent_var=latent_var)
    finite = jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
    return x, finite, stats

  return SampleFn(jax.jit(sample, **jit_kw), mcfg.pixels, batch_sharding)


@dataclasses.dataclass(frozen=True)
class SampleFn:
  """A jitted sampler (``make_sample_fn``), the pixel mapping its images are in, and the sharding
  of its batch (None: one device)."""
  fn: object
  pixels: str
  batch_sharding: object = None

  def put(self, host_array):
    """A batch input (the same numpy array on every process) where the sampler takes it."""
    if self.batch_sharding is None:
      return jnp.asarray(host_array)
    return sharding.host_to_global(host_array, self.batch_sharding)

  def __call__(self, *args):
    return self.fn(*args)


@dataclasses.dataclass(frozen=True)
class Drawn:
  """This process's part of a drawn batch: ``rows`` (indices into the padded batch, the same
  count on every process), their uint8 ``images`` (len(rows), H, W, c), and the ``stats`` of the
  batch's ``count`` requested samples ({stat: (count, ...)}, the same on every process)."""
  rows: np.ndarray
  images: np.ndarray
  stats: dict
  count: int
  size: int   # the padded batch

  def gathered(self, tree=None):
    """``tree`` (default: the images), a tree of arrays with one row per ``rows``, from every
    process, as the batch's ``count`` requested samples in order; a collective."""
    tree = self.images if tree is None else tree
    return jax.tree.map(lambda a: a[:self.count],
                        sharding.gather_rows(self.rows, tree, self.size))


def draw_batch(fn, params, labels, start, seed, pad_to=None, student_params=None, total=None):
  """Samples ``start .. start + len(labels) - 1`` of a seed (sample j: key fold_in(key(seed), j))
  with ``fn`` (``make_sample_fn``) -> ``Drawn``: this process's share of them as uint8 images
  (``Drawn.gathered`` brings every process's together). ``pad_to`` pads the batch (repeating the
  last label) so every call has one jit shape. Non-finite samples raise UserError on every process
  (never turned into black pixels)."""
  y = np.asarray(labels, np.int32)
  m = len(y)
  pad = max((pad_to or m) - m, 0)
  keys = np.asarray(jax.random.key_data(sample_keys(seed, start, m + pad)))
  yy = np.concatenate([y, np.full((pad,), y[-1], np.int32)])
  x, finite, st = fn(params, fn.put(keys), fn.put(yy), student_params)
  bad = int(np.sum(~np.asarray(finite)[:m]))
  if bad:
    of = f" of {total}" if total else ""
    raise UserError(
        f"{bad} of {m} samples (samples {start}..{start + m - 1}{of}) are not finite (NaN/inf); "
        "sampling stopped and nothing was written. Fix: check the run's training loss and the "
        "export (a diverged or corrupt model), try a bfloat16 export again as float32, or lower "
        "the temperatures (--sampler=t_sigma=...) / guidance (--cfg)")
  rows, local = sharding.local_rows(x)
  return Drawn(rows, to_uint8(local, fn.pixels), {k: np.asarray(v)[:m] for k, v in st.items()},
               m, m + pad)


def available_memory():
  """Bytes of memory available to this process now (Linux: MemAvailable), or None if unknown."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def check_output_size(mcfg, classes, num, png, available=None):
  """Refuses a request whose outputs cannot fit, before any sampling: ``num`` samples of each of
  ``classes`` are kept in memory as uint8 (twice while gathered) with their labels, plus the PNG
  grid when ``png``; a PNG is at most 2^31 - 1 pixels wide."""
  h = w = mcfg.image_size
  c = mcfg.channels
  n = len(classes) * num
  per = 2 * h * w * c + 4 + 64 + ((h + 2) * (w + 2) * c if png else 0)
  need = n * per
  available = available_memory() if available is None else available
  if available is not None and need > 0.8 * available:
    raise UserError(
        f"--num={num} x {len(classes)} class(es) = {n} samples of {h}x{w}x{c} need about "
        f"{need / 2**30:.1f} GiB of memory; {available / 2**30:.1f} GiB is available. Fix: lower "
        "--num, or draw in several runs with different --seed values")
  if png and num * (w + 2) + 2 >= 2**31:
    raise UserError(f"--num={num}: a PNG grid {num} images wide exceeds the PNG size limit. Fix: "
                    "lower --num, or write only --npz")


def generate(mcfg, params, classes, num, sampler, seed=0, batch_size=SAMPLE_BATCH,
             progress=True, return_stats=False, student_params=None, latent_var=None,
             batch_sharding=None, gather_weights=False):
  """Returns uint8 images (R, K, H, W, c) and labels (R, K) [, stats: per-sample arrays (R*K,), e.g.
  the resampling weights' effective sample sizes ``ess_informative`` / ``ess_redundant`` (see
  docs/sampling.md)], on every process.

  ``batch_sharding``, ``gather_weights``: see ``make_sample_fn``; with a batch sharding every
  batch is padded to ``batch_size`` (a
  multiple of the mesh's data-parallel slots and of the processes: ``sharding.padded_batch_size``)
  and each process draws its share of it."""
  if num < 1:
    raise UserError(f"--num={num} must be >= 1")
  if batch_size < 1:
    raise UserError(f"--batch={batch_size} must be >= 1")
  labels = np.repeat(np.asarray(classes, np.int32), num)
  total = len(labels)
  fn = make_sample_fn(mcfg, sampler, latent_var, batch_sharding, gather_weights)
  pad_to = batch_size if total > batch_size or batch_sharding is not None else None
  out, stats = [], {}
  bar = tqdm(total=total, desc="sample", disable=not progress, dynamic_ncols=True)
  try:
    for start in range(0, total, batch_size):
      y = labels[start:start + batch_size]
      drawn = draw_batch(fn, params, y, start, seed, pad_to, student_params, total)
      out.append(drawn.gathered())
      for k, v in drawn.stats.items():
        stats.setdefault(k, []).append(v)
      bar.update(len(y))
  finally:
    bar.close()
  images = np.concatenate(out).reshape(len(classes), num, *out[0].shape[1:])
  if return_stats:
    return images, labels.reshape(len(classes), num), {
        k: np.concatenate(v) for k, v in stats.items()
    }
  return images, labels.reshape(len(classes), num)


@dataclasses.dataclass(frozen=True)
class OnMesh:
  """A model placed for sampling on the devices at hand: its ``params`` (and distilled
  ``student``) on the run config's mesh, sharded as in training; the global ``batch``, the
  ``batch_sharding`` that splits it, and ``context()``, the mesh and rules to sample under."""
  params: object
  student: object
  batch: int
  batch_sharding: object
  context: object


def on_mesh(config, mcfg, params, student, batch, say):
  """Places a model (``export.load_model``'s config, ModelConfig and params; ``student``: its
  distilled student's params or None) on the run config's mesh (``sharding.fitting_mesh``) with a
  global ``batch`` (None: SAMPLE_BATCH per data-parallel slot)."""
  from farmer_jax.eval.evaluate import params_on_mesh
  host = lambda tree: jax.tree.map(np.asarray, tree)
  mesh, rules, params = params_on_mesh(config, mcfg, host(params), say)
  if student is not None:
    rep = sharding.replicated(mesh)
    student = sharding.host_to_global(host(student), jax.tree.map(lambda _: rep, student))
  slots = sharding.batch_slots(mesh, rules)
  batch = sharding.padded_batch_size(batch or SAMPLE_BATCH * slots, mesh, rules)
  say(f"sampling on mesh {dict(mesh.shape)}, {jax.process_count()} process(es): batch {batch} "
      f"({batch // slots} per data-parallel slot)")
  return OnMesh(params, student, batch, sharding.batch_sharding(mesh, rules),
                lambda: sharding.mesh_context(mesh, rules))


def draw_samples(mcfg, placed, drawn, classes, num, seed=0, progress=True):
  """The samples of `farmer_jax sample` and ``farmer_jax.load(...).sample``: ``num`` of each of
  ``classes`` from a model placed by ``on_mesh`` (with ``drawn.student`` when the inverse is the
  student), drawn with ``drawn`` (``export_sampler``: its sampler and latent variance), every
  device computing its samples with the whole model (``make_sample_fn``'s gather_weights).
  Returns uint8 images (R, K, H, W, c), labels (R, K) and the per-sample stats, on every process."""
  with placed.context():
    return generate(mcfg, placed.params, classes, num, drawn.sampler, seed, placed.batch,
                    progress=progress and jax.process_index() == 0, return_stats=True,
                    student_params=placed.student, latent_var=drawn.latent_var,
                    batch_sharding=placed.batch_sharding, gather_weights=True)


def describe_stats(stats, sampler):
  """Lines summarising the resampling weights' effective sample sizes and the Jacobi inverse's
  iterations per block (empty if there are none)."""
  parts, lines = [], []
  for key, name, pool in (("ess_informative", "informative", sampler.informative_pool),
                          ("ess_redundant", "redundant", sampler.redundant_pool_size)):
    if key in stats:
      v = stats[key]
      parts.append(f"{name} mean {v.mean():.2f} (min {v.min():.2f}) of {pool} candidates")
  if "redundant_distinct" in stats:
    v = stats["redundant_distinct"]
    parts.append(f"distinct redundant tokens per image (one shared pool) mean {v.mean():.1f} "
                 f"(min {v.min()})")
  if parts:
    lines.append("resampling-CFG effective sample size per draw: " + "; ".join(parts))
  if "jacobi_iters" in stats:
    it = stats["jacobi_iters"]                      # (samples, blocks), in flow block order
    lines.append(f"Jacobi AF inverse (tol {sampler.jacobi_tol:g}): iterations per block, mean "
                 f"over batches: {', '.join(f'{v:.1f}' for v in it.mean(axis=0))}")
  return "\n".join(lines)


OUTPUT_FORMATS = {"--out": (".png",), "--npz": (".npz",)}


def check_output_path(path, flag):
  """Refuses, before any sampling, an output path that cannot be written: unsupported extension
  (``--out`` writes lossless PNG only, ``--npz`` a .npz), an existing directory, a missing or
  unwritable parent directory."""
  exts = OUTPUT_FORMATS[flag]
  ext = os.path.splitext(path)[1].lower()
  if ext not in exts:
    what = "a lossless PNG grid" if flag == "--out" else "uint8 images + labels as .npz"
    found = repr(ext) if ext else "(no extension)"
    raise UserError(
        f"{flag}={path}: unsupported file type {found}; {flag} writes {what} only. Fix: name it "
        f"*{exts[0]}")
  if os.path.isdir(path):
    raise UserError(
        f"{flag}={path} is a directory. Fix: pass a file path, e.g. "
        f"{os.path.join(path, 'x' + exts[0])}"
    )
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise UserError(
        f"{flag}={path}: the directory {parent} does not exist. Fix: create it first (mkdir -p) or "
        "choose another path")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UserError(
        f"{flag}={path}: the directory {parent} is not writable. Fix: choose a writable directory")


def write_outputs(images, labels, out_png=None, out_npz=None, stats=None):
  """PNG grid (rows = classes) and/or .npz with uint8 images under 'arr_0' (n, H, W, c: the name
  the ADM / guided-diffusion evaluator reads), 'labels' (n,) and any per-sample ``stats`` arrays
  (n,). Atomic and all-or-nothing: both files are written to unique
  temporary names first and renamed into place only once both are complete; a failure leaves no file
  and no temporary behind."""
  for path, flag in ((out_png, "--out"), (out_npz, "--npz")):
    if path:
      check_output_path(path, flag)
  with contextlib.ExitStack() as stack:
    if out_png:
      grid_image(images).save(stack.enter_context(atomic_file(out_png)), format="PNG")
    if out_npz:
      np.savez(stack.enter_context(atomic_file(out_npz)),   # a file object: no suffix added
               arr_0=images.reshape(-1, *images.shape[2:]), labels=labels.reshape(-1),
               **(stats or {}))
