"""``farmer_jax prepare``: an image folder (one subfolder per class) -> a TFDS ArrayRecord dataset
that ``tfds.data_source`` (and so ``config.data.name='tfds:NAME'``) reads back. No TensorFlow.

Every file is decoded, converted to RGB (or grayscale with ``channels=1``) where that is well
defined (grayscale, palette, CMYK, alpha over white), center-cropped to ``image_size`` with the ADM
recipe (data/preprocess.py) and stored re-encoded (JPEG quality 95 by default, or PNG). Files that
cannot become an image (not an image, truncated, 16-bit or float modes, outside a class folder)
are skipped and reported, never silently dropped. A file goes to the validation split iff a hash
of its path relative to the folder falls below ``val_fraction``, so the split is stable when files
are added. The dataset is written in a temporary directory next to the target and renamed into
place at the end (``storage.staged_dir``): a failure or Ctrl-C leaves no partial dataset.
``--overwrite`` replaces only a dataset prepare wrote (its report carries ``DATASET_KIND``), never
a folder holding or inside a source folder, nor anything else.
"""

import collections
import concurrent.futures as futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys

from farmer_jax.artifacts import storage
from farmer_jax.data import preprocess
from farmer_jax.errors import UserError

VERSION = "1.0.0"
REPORT = "farmer_jax_prepare.json"
# the report's marker: only a folder carrying it is ever replaced by --overwrite
DATASET_KIND = "farmer_jax_dataset"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class PrepareError(UserError):
  """Bad arguments or input folder; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class Options:
  folder: str
  data_dir: str
  name: str
  image_size: int = 256
  val_fraction: float = 0.0
  channels: int = 3
  encoding: str = "jpeg"
  quality: int = 95
  workers: int = 0
  overwrite: bool = False
  val_folder: str = ""   # a second folder (same class names) that becomes the validation split


def check_options(o: Options):
  """Refuses bad arguments before anything is read or written (PrepareError)."""
  if not os.path.isdir(o.folder):
    raise PrepareError(f"--folder={o.folder} is not a directory. Fix: pass the image folder (one "
                       "subfolder per class)")
  if "://" in o.data_dir:
    raise PrepareError(f"--data_dir={o.data_dir}: prepare writes to a local directory. Fix: "
                       "prepare locally, then copy DIR/NAME to the bucket (docs/data.md)")
  if not _NAME.match(o.name or ""):
    raise PrepareError(f"--name={o.name!r} is not a valid dataset name. Fix: use lowercase "
                       "letters, digits and '_', starting with a letter (e.g. my_images)")
  if not (isinstance(o.image_size, int) and o.image_size >= 8):
    raise PrepareError(f"--image_size={o.image_size} must be an integer >= 8")
  if not 0.0 <= o.val_fraction < 1.0:
    raise PrepareError(f"--val_fraction={o.val_fraction} must be in [0, 1) (0 = no validation "
                       "split)")
  if o.val_folder and o.val_fraction:
    raise PrepareError(f"--val_folder={o.val_folder} and --val_fraction={o.val_fraction} both "
                       "define the validation split. Fix: pass only one")
  if o.val_folder and not os.path.isdir(o.val_folder):
    raise PrepareError(f"--val_folder={o.val_folder} is not a directory. Fix: pass the "
                       "validation image folder (one subfolder per class, as --folder)")
  if o.channels not in (1, 3):
    raise PrepareError(f"--channels={o.channels} must be 1 (grayscale) or 3 (RGB)")
  if o.encoding not in ("jpeg", "png"):
    raise PrepareError(f"--encoding={o.encoding!r} must be 'jpeg' or 'png'")
  if not 1 <= o.quality <= 100:
    raise PrepareError(f"--quality={o.quality} must be in [1, 100]")
  if o.workers < 0:
    raise PrepareError(f"--workers={o.workers} must be >= 0 (0 = decode in this process)")
  from farmer_jax.errors import ConfigError
  from farmer_jax.config.parse import validate_workdir
  try:
    validate_workdir(o.data_dir, flag="--data_dir")
  except ConfigError as e:
    raise PrepareError(str(e)) from None
  target = os.path.join(o.data_dir, o.name)
  _check_sources_apart(o, target)
  if os.path.lexists(target):
    if not o.overwrite:
      raise PrepareError(f"{target} already exists. Fix: pass --overwrite to replace it (the old "
                         "dataset is removed only after the new one is complete), or choose "
                         "another --name/--data_dir")
    check_replaceable(o, target)


def _sources(o):
  return [(flag, folder) for flag, folder in (("--folder", o.folder), ("--val_folder",
                                                                       o.val_folder)) if folder]


def _check_sources_apart(o, target):
  """Refuses a target that holds a source folder (replacing it would delete the images) or lies
  inside one (the dataset would be read back as a class folder)."""
  real_target = os.path.realpath(target)
  for flag, folder in _sources(o):
    real = os.path.realpath(folder)
    if storage.within(real, real_target):
      raise PrepareError(
          f"{flag}={folder} lies inside the dataset folder {target}, which prepare replaces; "
          "nothing was changed. Fix: choose another --name or --data_dir, or move the images "
          "out of it")
    if storage.within(real_target, real):
      raise PrepareError(
          f"the dataset folder {target} would lie inside {flag}={folder} (and be read as a "
          "class folder next time). Fix: choose a --data_dir outside the image folder")


def is_prepared_dir(path):
  """True if ``path`` is a dataset folder written by prepare: only the version folder, whose
  report carries our marker."""
  try:
    if os.path.islink(path) or os.listdir(path) != [VERSION]:
      return False
    with open(os.path.join(path, VERSION, REPORT)) as f:
      report = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(report, dict) and report.get("kind") == DATASET_KIND


def _may_replace(o, target):
  """The check right before the new dataset is swapped in: the target may have appeared or
  changed while it was built."""
  if not o.overwrite:
    raise PrepareError(f"{target} appeared while the dataset was built; nothing was changed. "
                       "Fix: pass --overwrite to replace it, or choose another --name/--data_dir")
  check_replaceable(o, target)


def check_replaceable(o, target):
  """Refuses to replace ``target`` unless it is a dataset prepare wrote and holds no source
  folder (checked up front and again right before the replacement)."""
  _check_sources_apart(o, target)
  if not is_prepared_dir(target):
    what = ("a symbolic link" if os.path.islink(target) else
            "not a directory" if not os.path.isdir(target) else
            f"not a dataset written by farmer_jax prepare (no {VERSION}/{REPORT} marker, or "
            "other files beside it)")
    raise PrepareError(f"{target} is {what}, so --overwrite will not replace it; nothing was "
                       "changed. Fix: choose another --name/--data_dir, or move it away yourself")


def _is_hidden(name):
  return name.startswith(".") or name.startswith("_")


def scan(folder):
  """(class names sorted, [(relative path, class index)], [(relative path, reason)] skipped)."""
  entries = sorted(os.listdir(folder))
  classes = [e for e in entries if os.path.isdir(os.path.join(folder, e)) and not _is_hidden(e)]
  skipped = [(e, "not inside a class subfolder") for e in entries
             if os.path.isfile(os.path.join(folder, e)) and not _is_hidden(e)]
  if not classes:
    raise PrepareError(f"--folder={folder} has no class subfolders"
                       f"{' (it is empty)' if not entries else ''}. Fix: put the images in one "
                       "subfolder per class (folder/CLASS/*.jpg)")
  if len(classes) == 1:
    raise PrepareError(f"--folder={folder} has one class subfolder ({classes[0]!r}); a class "
                       "label needs at least 2. Fix: add the other classes' folders (for an "
                       "unconditional model, split the images over 2+ folders and train with "
                       "--config.data.num_classes=0)")
  files, empty = [], []
  for k, c in enumerate(classes):
    found = []
    for root, dirs, names in os.walk(os.path.join(folder, c)):
      dirs[:] = sorted(d for d in dirs if not _is_hidden(d))
      found += [os.path.relpath(os.path.join(root, n), folder) for n in sorted(names)
                if not _is_hidden(n)]
    if not found:
      empty.append(c)
    files += [(f, k) for f in found]
  if empty:
    raise PrepareError(f"class folder(s) {empty} of {folder} hold no files. Fix: remove the "
                       "empty folders or add their images")
  return classes, files, skipped


def split_of(relpath, val_fraction):
  """'validation' iff a hash of the relative path falls below val_fraction, else 'train'."""
  h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big") / 2.0 ** 64
  return "validation" if h < val_fraction else "train"


def _convert(args):
  """(folder, relpath, label, options) -> (relpath, label, encoded bytes or None, reason or
  None). Module-level: runs in worker processes."""
  folder, relpath, label, o = args
  try:
    with open(os.path.join(folder, relpath), "rb") as f:
      raw = f.read()
    im = preprocess.decode(raw, o.channels)
    arr = preprocess.center_crop(im, o.image_size)
    return relpath, label, preprocess.encode(arr, o.encoding, o.quality), None
  except preprocess.BadImage as e:
    return relpath, label, None, str(e)
  except OSError as e:
    return relpath, label, None, f"unreadable file ({type(e).__name__}: {str(e)[:120]})"


def _converted(o, items, pool, bar):
  """Yields _convert results for items (in order), through ``pool`` if given."""
  jobs = ((folder, rel, label, o) for folder, rel, label in items)
  results = pool.map(_convert, jobs, chunksize=16) if pool is not None else map(_convert, jobs)
  for r in results:
    bar.update(1)
    yield r


def _builder_class(o, classes, split_items, pool, bar, report):
  import tensorflow_datasets as tfds

  class Prepared(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(VERSION)
    # a one-part module name: tfds then does not look for checksum files next to this module's
    # source (that lookup needs the importlib_resources backport)
    __module__ = "farmer_jax_prepare"

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description=f"Prepared by farmer_jax prepare from {os.path.abspath(o.folder)} "
          f"(ADM center crop to {o.image_size}x{o.image_size}, {o.encoding}).",
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(o.image_size, o.image_size, o.channels),
                                           encoding_format=o.encoding),
              "label": tfds.features.ClassLabel(names=classes),
              "file_name": tfds.features.Text(),
          }),
          supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(s) for s, items in split_items.items() if items}

    def _generate_examples(self, split):
      for rel, label, data, reason in _converted(o, split_items[split], pool, bar):
        if data is None:
          report["skipped"].append((rel if split == "train" or not o.val_folder
                                    else f"val:{rel}", reason))
          continue
        report["counts"][split][classes[label]] += 1
        yield rel, {"image": data, "label": label, "file_name": rel}

  Prepared.name = o.name
  return Prepared


@dataclasses.dataclass(frozen=True)
class Plan:
  """What ``write_dataset`` converts: the class names, every file found ([(relative path, class
  index)], both folders), the files of each split ({split: [(folder, relative path, class
  index)]}) and the files skipped while scanning ([(path, reason)])."""
  classes: list
  files: list
  split_items: dict
  skipped: list


def plan(o: Options) -> Plan:
  """Scans ``o.folder`` (and ``o.val_folder``) into a Plan; PrepareError for class folders that
  do not match or an empty train split."""
  classes, files, skipped = scan(o.folder)
  split_items = {"train": [], "validation": []}
  for rel, label in files:
    split_items[split_of(rel, o.val_fraction)].append((o.folder, rel, label))
  if o.val_folder:
    val_classes, val_files, val_skipped = scan(o.val_folder)
    extra = sorted(set(val_classes) - set(classes))
    if extra:
      raise PrepareError(f"--val_folder={o.val_folder} has class folder(s) {extra[:5]} that "
                         f"--folder={o.folder} lacks. Fix: use the same class folder names")
    files = files + val_files
    skipped += [(f"val:{p}", r) for p, r in val_skipped]
    split_items["validation"] = [(o.val_folder, rel, classes.index(val_classes[k]))
                                 for rel, k in val_files]
  if not split_items["train"]:
    raise PrepareError(f"no file of {o.folder} fell in the train split (val_fraction="
                       f"{o.val_fraction}). Fix: lower --val_fraction")
  return Plan(classes, files, split_items, skipped)


def describe_plan(o: Options, p: Plan):
  """One line: what ``write_dataset`` is about to write."""
  return (f"prepare: {len(p.files)} files in {len(p.classes)} classes -> {o.name} "
          f"({len(p.split_items['train'])} train, {len(p.split_items['validation'])} validation "
          f"candidates), {o.image_size}x{o.image_size}x{o.channels} {o.encoding}")


def write_dataset(o: Options, p: Plan):
  """Converts the files of ``p`` and writes the dataset ``o.data_dir/o.name/1.0.0`` (see module
  doc), swapped into place once complete; returns the report dict {'counts': {split: {class:
  n}}, 'skipped': [(path, reason)], 'path': ...}."""
  import tensorflow_datasets as tfds
  from tqdm import tqdm
  tfds.disable_progress_bar()
  target = os.path.join(o.data_dir, o.name)
  report = {"counts": {s: collections.Counter() for s in p.split_items},
            "skipped": list(p.skipped)}
  pool = None
  try:
    if o.workers:
      pool = futures.ProcessPoolExecutor(o.workers,
                                         mp_context=multiprocessing.get_context("spawn"))
    with storage.staged_dir(target, lambda t: _may_replace(o, t)) as tmp:
      build = os.path.join(tmp, ".build")   # tfds writes DATA_DIR/NAME/VERSION
      with tqdm(total=len(p.files), desc="prepare", unit="img", file=sys.stderr,
                dynamic_ncols=True) as bar:
        builder = _builder_class(o, p.classes, p.split_items, pool, bar, report)(
            data_dir=build, file_format="array_record")
        builder.download_and_prepare()
      out = _finish(o, p, report, target, tmp, build)
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)
  return out


def _finish(o, p, report, target, tmp, build):
  """Refuses a dataset missing its train split or a class; else moves the built version folder
  to ``tmp`` and writes its report (last: the marker). Returns the report."""
  kept = {s: sum(c.values()) for s, c in report["counts"].items()}
  if not kept["train"]:
    raise PrepareError(f"none of the {len(p.split_items['train'])} train files of {o.folder} "
                       "could be read (see the skipped list); nothing was written")
  missing = [c for c in p.classes if not report["counts"]["train"][c]]
  if missing:
    raise PrepareError(f"class(es) {missing} have no readable train image; nothing was "
                       "written. Fix: add readable images or remove those folders")
  out = {"kind": DATASET_KIND,
         "path": os.path.abspath(os.path.join(target, VERSION)), "classes": p.classes,
         "counts": {s: dict(c) for s, c in report["counts"].items()},
         "skipped": [list(x) for x in report["skipped"]],
         "options": dataclasses.asdict(o)}
  written = os.path.join(tmp, VERSION)
  os.rename(os.path.join(build, o.name, VERSION), written)
  shutil.rmtree(build)
  out["bytes"] = sum(os.path.getsize(os.path.join(written, f)) for f in os.listdir(written))
  with open(os.path.join(written, REPORT), "w") as f:   # written last: the marker
    json.dump(out, f, indent=2)
  return out


def prepare(o: Options):
  """Checks ``o``, scans its folders and writes the dataset (``write_dataset``); returns the
  report."""
  check_options(o)
  return write_dataset(o, plan(o))


def summary(report):
  """Human-readable summary of a prepare report."""
  lines = [f"wrote {report['path']} ({report['bytes'] / 2**20:.1f} MiB)"]
  for split, counts in report["counts"].items():
    if counts:
      per = ", ".join(f"{c}: {n}" for c, n in sorted(counts.items()))
      lines.append(f"  {split}: {sum(counts.values())} images ({per})")
  skipped = report["skipped"]
  lines.append(f"  skipped: {len(skipped)} file(s)")
  reasons = collections.Counter(r for _, r in skipped)
  for reason, n in reasons.most_common():
    examples = [p for p, r in skipped if r == reason][:3]
    lines.append(f"    {n} x {reason}: e.g. {', '.join(examples)}")
  name = os.path.basename(os.path.dirname(report["path"]))
  data_dir = os.path.dirname(os.path.dirname(report["path"]))
  lines.append(f"train with: --config.data.name=tfds:{name} --config.data.data_dir={data_dir}")
  return "\n".join(lines)
