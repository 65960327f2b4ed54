"""The datasets ``config.data.name`` can name, as random-access sources of uint8 images + labels.

* ``mnist5k`` — the MNIST-5k digits shipped in the package (data/mnist.py), zero-padded to
  ``data.image_size``; splits train (4500) / test (500).
* ``tfds:NAME`` — a TFDS dataset prepared in ArrayRecord format under ``data.data_dir`` (a local
  path or ``gs://...``; empty = TFDS's default ``~/tensorflow_datasets``), read with
  ``tfds.data_source(NAME, split=..., data_dir=..., download=False)``: ``tfds:imagenet2012``
  (``tfds build`` with ``--file_format=array_record``, docs/data.md) or a dataset written by
  ``farmer_jax prepare`` from an image folder.
* ``folder:PATH`` — an image folder is converted once by ``farmer_jax prepare`` and then read as
  ``tfds:NAME``; naming the folder here is refused with that command spelled out.

``describe(data)`` reads only metadata (split sizes, image shape, class count) so a config is
checked before training starts; ``open_split(data, split)`` returns the source itself: ``len`` and
``source[i] -> {'image': uint8 (H, W, c), 'label': int, ...}``.
"""

import dataclasses
import os

import numpy as np

from farmer_jax.config.rules import FieldError
from farmer_jax.errors import ConfigError, UserError

TFDS_PREFIX, FOLDER_PREFIX = "tfds:", "folder:"
KNOWN_FORMS = ("mnist5k", "tfds:NAME", "folder:PATH (via farmer_jax prepare)")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What ``config.data`` must agree with (checked by ``check_config``)."""
  name: str
  channels: int
  num_classes: int          # labels are 0 .. num_classes - 1
  image_shape: tuple        # (H, W) of the stored images; (None, None) if they vary
  splits: dict              # split name -> number of examples
  pad_from: int = 0         # mnist5k: images are pad_from^2, zero-padded evenly to image_size


@dataclasses.dataclass
class ArraySource:
  """Random access over in-memory arrays: images uint8 (n, H, W, c), labels (n,)."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i]}


def _bad(field, value, why, fix):
  return FieldError(field, value, why, fix)


def _folder_refusal(name):
  path = name[len(FOLDER_PREFIX):]
  return _bad(
      "data.name", name, "an image folder is read after converting it once to an ArrayRecord "
      "dataset",
      f"run `farmer_jax prepare --folder={path} --data_dir=DIR --name=NAME [--image_size=256]`, "
      "then train with --config.data.name=tfds:NAME --config.data.data_dir=DIR")


def _tfds_builder(data):
  """The TFDS builder of ``tfds:NAME`` under data.data_dir, or a ConfigError saying what is
  missing."""
  name = data.name[len(TFDS_PREFIX):]
  data_dir = data.data_dir or None
  if not name:
    raise _bad("data.name", data.name, "the dataset name after 'tfds:' is empty",
               "use e.g. tfds:imagenet2012")
  if data_dir and "://" not in data_dir and not os.path.isdir(data_dir):
    raise _bad("data.data_dir", data.data_dir, "the directory does not exist",
               "point --config.data.data_dir at the directory holding the prepared dataset "
               f"(it contains {name}/<version>/), see docs/data.md")
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # noqa: BLE001 - tfds raises many types for "not there"
    raise _bad("data.name", data.name,
               f"no prepared TFDS dataset {name!r} was found in data_dir="
               f"{data.data_dir or '~/tensorflow_datasets'} ({type(e).__name__}: "
               f"{str(e).splitlines()[0][:200]})",
               "prepare it (farmer_jax prepare for an image folder; `tfds build NAME "
               "--file_format=array_record` for a TFDS dataset, docs/data.md) or set "
               "--config.data.data_dir to where it lives") from None
  if not builder.is_prepared():
    raise _bad("data.name", data.name,
               f"TFDS dataset {name!r} is not prepared in {builder.data_dir} (nothing is "
               "downloaded at run time)",
               f"prepare it there first (`tfds build {name} --file_format=array_record "
               f"--data_dir=...`), see docs/data.md")
  fmt = str(getattr(builder.info, "file_format", "") or "")
  if "array_record" not in fmt.lower():
    raise _bad("data.name", data.name,
               f"{builder.data_dir} holds the {fmt or 'unknown'} format; the pipeline needs "
               "random access (ArrayRecord)",
               f"re-prepare it with --file_format=array_record (`tfds build {name} "
               "--file_format=array_record`), or convert with `farmer_jax prepare`")
  return builder


def describe(data) -> DatasetInfo:
  """Metadata of ``config.data``'s dataset (no example is read); ConfigError if it is unknown,
  missing, or not prepared."""
  name = data.name
  if name == "mnist5k":
    return DatasetInfo(name, channels=1, num_classes=10, image_shape=(28, 28),
                       splits={"train": 4500, "test": 500}, pad_from=28)
  if isinstance(name, str) and name.startswith(FOLDER_PREFIX):
    raise _folder_refusal(name)
  if not (isinstance(name, str) and name.startswith(TFDS_PREFIX)):
    hint = f" (did you mean tfds:{name}?)" if isinstance(name, str) and name else ""
    raise _bad("data.name", name, f"unknown dataset{hint}; this release reads {list(KNOWN_FORMS)}",
               "use mnist5k (the quickstart), tfds:NAME with --config.data.data_dir, or prepare "
               "an image folder with farmer_jax prepare")
  builder = _tfds_builder(data)
  feats = builder.info.features
  for key in ("image", "label"):
    if key not in feats:
      raise _bad("data.name", name, f"the dataset has no {key!r} feature (it has "
                 f"{sorted(feats.keys())})", "use a dataset of (image, label) examples")
  shape = tuple(feats["image"].shape)
  num_classes = getattr(feats["label"], "num_classes", None)
  if num_classes is None:
    raise _bad("data.name", name, "its 'label' feature is not a ClassLabel (no class count)",
               "use a dataset with a ClassLabel 'label'")
  splits = {k: int(v.num_examples) for k, v in builder.info.splits.items()}
  return DatasetInfo(name, channels=int(shape[-1]) if shape[-1] else 3,
                     num_classes=int(num_classes), image_shape=tuple(shape[:2]), splits=splits)


def check_config(data, info: DatasetInfo, splits=()):
  """``config.data`` (a DataConfig) against its dataset: image size (or the resize/pad rule),
  channels, class count, and that ``splits`` (train_split, eval split) exist. ConfigError."""
  name, size = info.name, data.image_size
  for field, split in splits:
    if split not in info.splits:
      raise _bad(field, split, f"{name} has the splits {list(info.splits)}",
                 f"use one of {list(info.splits)}")
    if info.splits[split] < 1:
      raise _bad(field, split, f"split {split!r} of {name} is empty", "use a non-empty split")
  if info.pad_from:
    p = info.pad_from
    if not (size >= p and (size - p) % 2 == 0):
      raise _bad("data.image_size", size,
                 f"{name} images are {p}x{p}, zero-padded evenly on each side to data.image_size",
                 f"use {p} or more, with an even difference to {p} (e.g. {p + 4})")
  elif data.resize == "none":
    h, w = info.image_shape
    if h is None or w is None:
      raise _bad("data.resize", "none", f"{name} images vary in size",
                 "set --config.data.resize=center_crop (the ADM recipe) so every image becomes "
                 f"{size}x{size}")
    if (h, w) != (size, size):
      raise _bad("data.image_size", size, f"{name} images are {h}x{w}",
                 f"set --config.data.image_size={h} if square, or --config.data.resize="
                 "center_crop to center-crop them to data.image_size")
  if data.channels != info.channels:
    raise _bad("data.channels", data.channels, f"{name} has {info.channels} channel(s)",
               f"set --config.data.channels={info.channels}")
  if data.num_classes not in (0, info.num_classes):
    raise _bad("data.num_classes", data.num_classes,
               f"{name} has {info.num_classes} classes (labels 0..{info.num_classes - 1}); a "
               "different count would leave labels outside the class embedding",
               f"set --config.data.num_classes={info.num_classes} (or 0 for an unconditional "
               "model)")


def require_dataset(data, where):
  """A model converted without --config (``farmer_jax convert``) names no dataset: say how to
  give it one instead of the generic unknown-dataset error."""
  if not data.name:
    raise UserError(f"{where} names no dataset (config.data.name is empty: a converted "
                    "checkpoint). Fix: convert again with --config=tarflow:PRESET "
                    "--config.data.name=tfds:NAME (and --config.data.data_dir=...)")


def require_split(data, split, flag, fix):
  """Refuses (UserError, naming ``flag``) a split that ``data``'s dataset lacks or that is empty;
  reads only metadata."""
  splits = describe(data).splits
  if splits.get(split, 0) < 1:
    raise UserError(f"{flag}: {data.name} has no (non-empty) split {split!r}; its splits: "
                    f"{sorted(splits)}. Fix: {fix}")


def open_split(data, split):
  """The random-access source of one split (see module doc)."""
  if data.name == "mnist5k":
    from farmer_jax.data.mnist import load_mnist5k
    images, labels = load_mnist5k(split, pad_to=data.image_size)
    return ArraySource(images, check_labels(labels, data.num_classes,
                                            f"{data.name} split {split!r}"))
  _tfds_builder(data)  # the checks, with their messages
  import tensorflow_datasets as tfds
  return tfds.data_source(data.name[len(TFDS_PREFIX):], split=split,
                          data_dir=data.data_dir or None, download=False)


def check_labels(labels, num_classes, what="the data"):
  """labels (n,) int -> int32 labels, checked against config.data.num_classes (0 =
  unconditional: every label becomes the null class, 0)."""
  labels = np.asarray(labels)
  if num_classes == 0:
    return np.zeros(labels.shape, np.int32)
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    raise ConfigError(
        f"{int(bad.sum())} of {labels.size} labels in {what} lie outside [0, {num_classes}) "
        f"(labels found: {int(labels.min())}..{int(labels.max())}) with "
        f"config.data.num_classes={num_classes}. Fix: set --config.data.num_classes to the "
        "dataset's class count (labels 0..n-1), or 0 for an unconditional model; out-of-range "
        "labels are never mapped to the null class")
  return labels.astype(np.int32)
