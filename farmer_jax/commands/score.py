"""`farmer_jax score`: likelihood maps. The exact bits/dim of every token of every image
(``Model.bits_per_token``, eval/likelihood.py), for a folder of image files, an ``.npz`` or a split
of the model's dataset, written to a new folder as per-image scores (JSON, CSV), the maps (.npz)
and PNG pages of each image beside its heat map (eval/heatmap.py). docs/eval.md shows its use for
out-of-distribution checks."""

import csv
import json
import os

import numpy as np
from absl import app

from farmer_jax.commands import common
from farmer_jax.commands.common import Flag
from farmer_jax.errors import UserError

PURPOSE = "likelihood maps: per-token bits/dim of images (a folder, an .npz or a split)"
EXAMPLE = ("farmer_jax score --model=/tmp/model --images=digits/ | x.npz | split:test "
           "--out=/tmp/scores [--labels=data|3] [--overwrite]")

KIND = "farmer_jax score"           # scores.json's marker: only such a folder is ever replaced
SCORES, CSV, MAPS = "scores.json", "scores.csv", "maps.npz"
PAGE = "maps_{:03d}.png"
SPLIT_PREFIX = "split:"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

FLAGS = (
    Flag("model", None, "An export directory (farmer_jax export / convert) or a training run's "
         "workdir (its newest checkpoint)."),
    Flag("images", None, "What to score: a folder of image files (decoded, channels converted and "
         "center-cropped to the model's size), an .npz with uint8 'images' (or 'arr_0', as "
         "`farmer_jax sample --npz` writes) of shape (n, H, W, c) and optional 'labels', or "
         "split:NAME, a split of the model's dataset."),
    Flag("out", None, "A new folder for scores.json, scores.csv, maps.npz and maps_*.png."),
    Flag("labels", "null", "'null': the null class for every image (the unconditional "
         "-log p(x)); a class id for every image; or 'data': the .npz's or split's labels."),
    Flag("num", 0, "Score at most this many images, the first ones (0 = all)."),
    Flag("draw", 64, "Draw the first this many images into the PNG pages (0 = none)."),
    Flag("per_page", 16, "Images per PNG page (one colour scale per page)."),
    Flag("vmin", None, "The colour scale's low end in bits/dim (default: each page's smallest "
         "token bits/dim).", float),
    Flag("vmax", None, "The colour scale's high end in bits/dim (default: each page's largest; "
         "larger values take the top colour, e.g. --vmax=8 to compare pages).", float),
    Flag("dequant_samples", 1, "Uniform dequantization draws per image (averaged)."),
    Flag("seed", 0, "The dequantization seed (image i, draw k: fold_in(fold_in(key(seed), i), "
         "k), as `farmer_jax eval`)."),
    Flag("batch", None, "Images per call (default: the model's config.eval.batch_size).", int),
    Flag("data_dir", None, "Where the model's tfds dataset is (with --images=split:NAME; "
         "default: its config.data.data_dir)."),
    Flag("overwrite", False, "Replace --out if it is a previous `farmer_jax score` output."),
)


def define_flags(fv):
  common.define(fv, FLAGS)
  common.define_compilation_cache(fv)
  common.define_output(fv)


def main(f):
  if not (f.model and f.images and f.out):
    raise app.UsageError("--model, --images and --out are required. Fix: e.g. farmer_jax score "
                         "--model=MODEL --images=DIR --out=OUT")
  for name in ("num", "draw"):
    if getattr(f, name) < 0:
      raise UserError(f"--{name}={getattr(f, name)} must be >= 0. Fix: a count, or 0 for "
                      f"{'all' if name == 'num' else 'none'}")
  for name in ("per_page", "dequant_samples"):
    if getattr(f, name) < 1:
      raise UserError(f"--{name}={getattr(f, name)} must be >= 1. Fix: e.g. --{name}=1")
  if f.batch is not None and f.batch < 1:
    raise UserError(f"--batch={f.batch} must be >= 1. Fix: e.g. --batch=64, or leave it out")
  for name in ("vmin", "vmax"):
    if getattr(f, name) is not None and not np.isfinite(getattr(f, name)):
      raise UserError(f"--{name}={getattr(f, name)} must be a finite number of bits/dim. Fix: "
                      "e.g. --vmin=0 --vmax=8")
  if f.vmin is not None and f.vmax is not None and not f.vmin < f.vmax:
    raise UserError(f"--vmin={f.vmin} must be below --vmax={f.vmax}. Fix: e.g. --vmin=0 --vmax=8")
  label_spec = parse_labels(f.labels)
  out = check_out(f.out, f.overwrite)
  kind = images_kind(f.images)
  if not os.path.exists(f.model) and "://" not in f.model:
    raise UserError(f"--model={f.model} does not exist. Fix: pass an export directory (farmer_jax "
                    "export) or a training run's --workdir")
  common.start_jax(f)
  say = common.say(f)

  import farmer_jax
  model = farmer_jax.load(f.model)
  images, labels, names = read_images(model, kind, f.images, f.num, f.data_dir, say)
  labels, labels_text = choose_labels(model, label_spec, labels, len(images), f.images)
  say(f"scoring {len(images)} image(s) of {f.images} with {f.model}: {labels_text}")
  res = model.bits_per_token(images, labels, seed=f.seed, samples=f.dequant_samples,
                             batch=f.batch, progress=not f.quiet, return_terms=True)
  if not np.all(np.isfinite(res["token_bpd"])):
    raise UserError("some bits/dim are not finite; nothing was written. Fix: check the model (a "
                    "diverged run or a corrupt export)")
  summary = {"kind": KIND, "model": os.path.abspath(f.model) if "://" not in f.model else f.model,
             "images": f.images, "labels": labels_text, "seed": f.seed,
             "dequant_samples": f.dequant_samples, "count": len(images),
             "token_grid": list(res["token_bpd"].shape[1:]),
             "patch_size": model.model_config.patch_size,
             "bpd_mean": float(res["bpd"].mean()),
             "bpd_std": float(res["bpd"].std(ddof=1)) if len(images) > 1 else None}
  write_outputs(out, summary, names, images, labels, res, model.null_class, f.draw, f.per_page,
                f.overwrite, (f.vmin, f.vmax))
  std = f" +- {summary['bpd_std']:.4f} (std over images)" if summary["bpd_std"] is not None else ""
  say(f"bits/dim {summary['bpd_mean']:.4f}{std}; -> {out}")


def parse_labels(spec):
  """--labels -> 'null', 'data' or a class id (int); checked against the model later."""
  spec = str(spec).strip()
  if spec in ("null", "data"):
    return spec
  try:
    return int(spec)
  except ValueError:
    raise UserError(f"--labels={spec}: not 'null', 'data' or a class id. Fix: e.g. --labels=null "
                    "(unconditional), --labels=3 or --labels=data") from None


def check_out(out, overwrite):
  """Refuses, before any work, an --out that cannot be written or that exists (without
  --overwrite, or when it is not a previous score output). Returns its absolute path."""
  if "://" in out:
    raise UserError(f"--out={out}: score writes a local folder. Fix: write it locally, then copy "
                    "it (e.g. gcloud storage cp -r)")
  out = os.path.abspath(out)
  parent = os.path.dirname(out)
  if not os.path.isdir(parent):
    raise UserError(f"--out={out}: the folder {parent} does not exist. Fix: create it first "
                    "(mkdir -p) or choose another --out")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UserError(f"--out={out}: {parent} is not writable. Fix: choose a writable folder")
  if not os.path.lexists(out):
    return out
  if not overwrite:
    raise UserError(f"--out={out} already exists. Fix: pass --overwrite to replace a previous "
                    "score output, or choose another --out")
  if os.path.islink(out) or not os.path.isdir(out) or not _is_score_dir(out):
    raise UserError(f"--out={out} is not a previous `farmer_jax score` output (no {SCORES} of "
                    "kind 'farmer_jax score'), so --overwrite will not replace it. Fix: choose "
                    "another --out, or move it away yourself")
  foreign = [n for n in os.listdir(out) if n not in (SCORES, CSV, MAPS) and not
             (n.startswith("maps_") and n.endswith(".png"))]
  if foreign:
    raise UserError(f"--out={out} also holds files score did not write ({', '.join(foreign[:5])})"
                    "; --overwrite would delete them. Fix: move them out or choose another --out")
  return out


def _is_score_dir(path):
  try:
    with open(os.path.join(path, SCORES)) as fh:
      return json.load(fh).get("kind") == KIND
  except (OSError, ValueError, AttributeError):
    return False


def images_kind(spec):
  """'split', 'npz' or 'folder' for --images, refusing a path that is neither (before loading
  the model)."""
  if spec.startswith(SPLIT_PREFIX):
    if not spec[len(SPLIT_PREFIX):]:
      raise UserError(f"--images={spec} names no split. Fix: e.g. --images=split:test")
    return "split"
  if os.path.isdir(spec):
    _image_files(spec)
    return "folder"
  if os.path.isfile(spec) and spec.lower().endswith(".npz"):
    return "npz"
  what = "is not an .npz file" if os.path.isfile(spec) else "does not exist"
  raise UserError(f"--images={spec} {what}. Fix: pass a folder of image files, an .npz with "
                  "uint8 'images' (n, H, W, c), or split:NAME (a split of the model's dataset)")


def read_images(model, kind, spec, num, data_dir, say):
  """(images uint8 (n, H, W, c) at the model's shape, labels (n,) int or None, names (n,))."""
  if kind == "folder":
    return _read_folder(model, spec, num, say)
  if kind == "npz":
    return _read_npz(model, spec, num)
  return _read_split(model, spec[len(SPLIT_PREFIX):], num, data_dir)


def _read_folder(model, folder, num, say):
  from farmer_jax.data import preprocess
  size, c = model.model_config.image_size, model.model_config.channels
  files = _image_files(folder)
  skipped = len([n for n in os.listdir(folder) if not n.startswith(".")]) - len(files)
  if skipped:
    say(f"{skipped} file(s) of {folder} without an image extension are not scored")
  files = files[:num or None]
  check_memory(model, len(files), f"--images={folder}")
  images = []
  for name in files:
    path = os.path.join(folder, name)
    try:
      with open(path, "rb") as fh:
        im = preprocess.decode(fh.read(), channels=c)
    except (preprocess.BadImage, OSError) as e:
      raise UserError(f"--images: {path} cannot be read ({e}). Fix: remove or replace that "
                      "file") from None
    arr = preprocess.center_crop(im, size) if im.size != (size, size) else np.asarray(im)
    images.append(arr[..., None] if arr.ndim == 2 else arr)
  return np.stack(images), None, files


def _image_files(folder):
  """The image files of ``folder`` (by extension), in name order; refuses a folder without any."""
  files = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTS)
                 and os.path.isfile(os.path.join(folder, n)))
  if not files:
    raise UserError(f"--images={folder} holds no image files ({', '.join(IMAGE_EXTS)}). Fix: "
                    "pass a folder of images, an .npz, or split:NAME")
  return files


def _read_npz(model, path, num):
  from farmer_jax import untrusted
  from farmer_jax.eval.metrics import IMAGE_KEYS, check_images
  want = model.image_shape
  with untrusted.Npz(path) as data:
    key = next((k for k in IMAGE_KEYS if k in data), None)
    if key is None:
      raise UserError(f"--images={path} holds no {' or '.join(map(repr, IMAGE_KEYS))} array (it "
                      f"has {sorted(data.files)}). Fix: save the uint8 images (n, H, W, c) as "
                      "np.savez(path, images=..., labels=...)")
    images = np.asarray(data[key])
    labels = np.asarray(data["labels"]) if "labels" in data else None
  if images.ndim == 3 and want[2] == 1:
    images = images[..., None]     # (n, H, W) grayscale
  check_images(images, key, f"--images={path}")
  if images.shape[1:] != want or not len(images):
    raise UserError(f"--images={path}: '{key}' is {images.dtype} {images.shape}; this model takes "
                    f"uint8 (n, {', '.join(map(str, want))}). Fix: resize/convert the images to "
                    f"{want[0]}x{want[1]} with {want[2]} channel(s), pixels 0..255 as uint8")
  if labels is not None and labels.shape != images.shape[:1]:
    raise UserError(f"--images={path}: 'labels' has shape {labels.shape} for {len(images)} "
                    "images. Fix: one label per image, or no 'labels'")
  stem = os.path.splitext(os.path.basename(path))[0]
  names = [f"{stem}[{i}]" for i in range(len(images))]
  n = num or len(images)
  return images[:n], None if labels is None else labels[:n], names[:n]


def _read_split(model, split, num, data_dir):
  from farmer_jax.data import pipeline, sources
  from farmer_jax.eval.evaluate import eval_data
  data = eval_data(model.config, data_dir)
  sources.require_dataset(data, f"--images={SPLIT_PREFIX}{split}: the model")
  sources.require_split(data, split, f"--images={SPLIT_PREFIX}{split}", "use one of them")
  source, prep = sources.open_split(data, split), pipeline.Preprocess(data)
  n = min(num or len(source), len(source))
  check_memory(model, n, f"--images={SPLIT_PREFIX}{split}")
  records = [prep.map(source[i]) for i in range(n)]
  return (np.stack([r["image"] for r in records]), np.array([r["label"] for r in records]),
          [f"{split}[{i}]" for i in range(n)])


def check_memory(model, n, what, available=None):
  """Refuses, before reading them, ``n`` images whose scoring would not fit in memory: each is held
  as uint8 and copied into maps.npz, with its token maps (fp32, 4 of them)."""
  from farmer_jax.sampling.generate import available_memory
  h, w, c = model.image_shape
  need = n * (2 * h * w * c + 4 * 4 * model.latent_shape[0] + 256)
  available = available_memory() if available is None else available
  if available is not None and need > 0.8 * available:
    fit = max(int(0.8 * available // (need / n)), 1)
    raise UserError(f"{what}: its {n} images of {h}x{w}x{c} need about {need / 2**30:.1f} GiB of "
                    f"memory to score; {available / 2**30:.1f} GiB is available. Fix: score at "
                    f"most --num={fit} at a time")


def choose_labels(model, spec, data_labels, n, images_spec):
  """(labels (n,) int32, what they are in words) for --labels=``spec``."""
  null = model.null_class
  if spec == "null" or spec == null:
    return np.full((n,), null, np.int32), f"null class {null} (unconditional -log p(x))"
  if not model.num_classes:
    raise UserError(f"--labels={spec}: the model is unconditional (its only label is the null "
                    "class). Fix: drop --labels")
  if spec == "data":
    if data_labels is None:
      raise UserError(f"--labels=data: {images_spec} carries no labels (a folder, or an .npz "
                      "without 'labels'). Fix: pass --labels=CLASS or --labels=null")
    labels = np.asarray(data_labels)
    text = "the data's labels (class-conditional -log p(x | y))"
  else:
    labels = np.full((n,), spec)
    text = f"class {spec} for every image (class-conditional -log p(x | {spec}))"
  if labels.dtype.kind not in "iu":
    raise UserError(f"--labels=data: the labels of {images_spec} are {labels.dtype}, not class "
                    "ids. Fix: store integer labels")
  bad = np.flatnonzero((labels < 0) | (labels > null))
  if len(bad):
    raise UserError(f"--labels: label {int(labels[bad[0]])} (image {int(bad[0])}) is not a class "
                    f"of this model (0..{model.num_classes - 1}, or the null class {null}). Fix: "
                    "pass labels in that range")
  return labels.astype(np.int32), text


def write_outputs(out, summary, names, images, labels, res, null, draw, per_page, overwrite,
                  scale=(None, None)):
  """Writes the folder ``out`` whole (``storage.staged_dir``: built aside, swapped in; a previous
  score output, with --overwrite, re-checked and replaced only then). ``scale``: the pages' (vmin,
  vmax), None for each page's own."""
  from farmer_jax.artifacts import storage
  from farmer_jax.eval import heatmap
  with storage.staged_dir(out, lambda o: check_out(o, overwrite)) as tmp:
    rows = [{"name": str(name), "label": int(y), "conditional": bool(y != null), "bpd": float(b)}
            for name, y, b in zip(names, labels, res["bpd"])]
    with open(os.path.join(tmp, SCORES), "w") as fh:
      json.dump(dict(summary, per_image=rows), fh, indent=1)
    with open(os.path.join(tmp, CSV), "w", newline="") as fh:   # floats as repr: exact
      w = csv.DictWriter(fh, fieldnames=["name", "label", "conditional", "bpd"])
      w.writeheader()
      w.writerows(rows)
    terms = res["token_terms"]
    np.savez(os.path.join(tmp, MAPS), token_bpd=res["token_bpd"], bpd=res["bpd"], images=images,
             labels=labels, token_af_logdet=terms["af_logdet"],
             token_informative=terms["informative"], token_redundant=terms["redundant"],
             bin_width=np.float64(terms["bin_width"]))
    shown = min(draw, len(images))
    for p, start in enumerate(range(0, shown, per_page)):
      sl = slice(start, min(start + per_page, shown))
      heatmap.page(images[sl], res["token_bpd"][sl], res["bpd"][sl], names[sl],
                   vmin=scale[0], vmax=scale[1]).save(os.path.join(tmp, PAGE.format(p)))
