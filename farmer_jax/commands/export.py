"""`farmer_jax export`: a training run's latest checkpoint as a self-contained model directory
(config, params in the chosen dtype, optionally a distilled student) that sample/eval/fid read."""

from absl import app

from farmer_jax.commands import common
from farmer_jax.commands.common import Flag
from farmer_jax.config.schema import DTYPE_NAMES

PURPOSE = "write a training run's latest checkpoint as a model directory"
EXAMPLE = "farmer_jax export --workdir=/tmp/run --out=/tmp/model [--dtype=bfloat16] [--overwrite]"


FLAGS = (
    Flag("workdir", None, "The training run to export."),
    Flag("out", None, "Output model directory."),
    Flag("dtype", "float32", "Param dtype to store.", choices=DTYPE_NAMES),
    Flag("student", None, "Also export the distilled student of this distill --workdir."),
    Flag("overwrite", False, "Replace an existing --out directory."),
)


def define_flags(fv):
  common.define(fv, FLAGS)
  common.define_output(fv)


def main(f):
  if not f.workdir or not f.out:
    raise app.UsageError(
        "--workdir (a training run) and --out (the export directory) are required")
  # checks --out before reading any checkpoint
  from farmer_jax.artifacts.export import export_model
  meta = export_model(f.workdir, f.out, f.dtype, f.overwrite, student=f.student)
  print(f"exported step {meta['step']} ({meta['params']} params, {meta['dtype']}) -> {f.out}")
