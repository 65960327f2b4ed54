"""`farmer_jax export`: a training run's checkpoint (the newest, or ``--step``) as a self-contained
model directory (config, params in the chosen dtype, optionally a distilled student) that
sample/eval/fid/score and ``farmer_jax.load`` read, local or in a bucket."""

from absl import app

from farmer_jax.commands import common
from farmer_jax.commands.common import Flag
from farmer_jax.config.schema import DTYPE_NAMES

PURPOSE = "write a training run's checkpoint (the newest, or --step) as a model directory"
EXAMPLE = ("farmer_jax export --workdir=/tmp/run --out=/tmp/model [--step=2000] [--dtype=bfloat16] "
           "[--overwrite]")


FLAGS = (
    Flag("workdir", None, "The training run to export."),
    Flag("out", None, "Output model directory, local or in a bucket (gs://...)."),
    Flag("step", None, "Export this checkpoint step (one the run keeps: checkpoints/<step>/) "
         "instead of the newest readable one.", int),
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
  if f.step is not None and f.step < 0:
    raise app.UsageError(f"--step={f.step}: a checkpoint step is >= 0. Fix: pass a step the run "
                         "keeps (ls WORKDIR/checkpoints), or leave --step out for the newest")
  # checks --out before reading any checkpoint
  from farmer_jax.artifacts.export import export_model
  meta = export_model(f.workdir, f.out, f.dtype, f.overwrite, student=f.student, step=f.step)
  print(f"exported step {meta['step']} ({meta['params']} params, {meta['dtype']}) -> {f.out}")
