"""`farmer_jax export`: a training run's latest checkpoint as a self-contained model directory
(config, params in the chosen dtype, optionally a distilled student) that sample/eval/fid read."""

from absl import app, flags

from farmer_jax.commands import common
from farmer_jax.config.schema import DTYPE_NAMES

PURPOSE = "write a training run's latest checkpoint as a model directory"
EXAMPLE = "farmer_jax export --workdir=/tmp/run --out=/tmp/model [--dtype=bfloat16] [--overwrite]"


def define_flags(fv):
  flags.DEFINE_string("workdir", None, "The training run to export.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output model directory.", flag_values=fv)
  flags.DEFINE_enum("dtype", "float32", list(DTYPE_NAMES), "Param dtype to store.", flag_values=fv)
  flags.DEFINE_string("student", None,
                      "Also export the distilled student of this distill --workdir.",
                      flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out directory.", flag_values=fv)
  common.define_output(fv)


def main(f):
  if not f.workdir or not f.out:
    raise app.UsageError(
        "--workdir (a training run) and --out (the export directory) are required")
  # checks --out before reading any checkpoint
  from farmer_jax.artifacts.export import export_model
  meta = export_model(f.workdir, f.out, f.dtype, f.overwrite, student=f.student)
  print(f"exported step {meta['step']} ({meta['params']} params, {meta['dtype']}) -> {f.out}")
