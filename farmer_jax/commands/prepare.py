"""`farmer_jax prepare`: an image folder (one subfolder per class) as a tfds dataset that
`train --config.data.name=tfds:NAME` reads: ADM center crop, JPEG or PNG, optional validation
split."""

import os

from absl import app

from farmer_jax.commands import common
from farmer_jax.commands.common import Flag

PURPOSE = "turn an image folder (one subfolder per class) into a tfds dataset"
EXAMPLE = ("farmer_jax prepare --folder=/data/photos --data_dir=/data/tfds --name=photos "
           "[--image_size=256]")

FLAGS = (
    Flag("folder", None, "Image folder, one subfolder per class."),
    Flag("data_dir", None, "Where the dataset is written (DIR/NAME/1.0.0)."),
    Flag("name", None, "Dataset name; train with data.name=tfds:NAME."),
    Flag("image_size", 256, "Side of the square images (ADM center crop)."),
    Flag("val_fraction", 0.0, "Fraction of each class in the 'validation' split (by path hash)."),
    Flag("val_folder", None, "A second folder (same class names) for the 'validation' split."),
    Flag("channels", 3, "3 (RGB) or 1 (grayscale)."),
    Flag("encoding", "jpeg", "How images are stored.", choices=("jpeg", "png")),
    Flag("quality", 95, "JPEG quality."),
    Flag("workers", None, "Decoding processes (default: the CPU count, at most 16; 0 = none).",
         int),
    Flag("overwrite", False, "Replace an existing dataset."),
)


def define_flags(fv):
  common.define(fv, FLAGS)
  common.define_output(fv)


def main(f):
  if not f.folder or not f.data_dir or not f.name:
    raise app.UsageError("--folder (one subfolder per class), --data_dir and --name are required")
  from farmer_jax.data import prepare
  say = common.say(f)
  workers = f.workers if f.workers is not None else min(16, os.cpu_count() or 1)
  o = prepare.Options(folder=f.folder, data_dir=f.data_dir, name=f.name,
                      image_size=f.image_size, val_fraction=f.val_fraction, channels=f.channels,
                      encoding=f.encoding, quality=f.quality, workers=workers,
                      overwrite=f.overwrite, val_folder=f.val_folder or "")
  prepare.check_options(o)
  plan = prepare.plan(o)
  say(prepare.describe_plan(o, plan))
  report = prepare.write_dataset(o, plan)
  say(prepare.summary(report))
