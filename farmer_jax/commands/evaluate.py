"""`farmer_jax eval`: the test bits/dim of a training run or an export (every example once, K
dequantization draws), written as JSON (and TensorBoard for a run)."""

from absl import app, flags

from farmer_jax.commands import common

PURPOSE = "bits/dim of a training run or an export on a data split"
EXAMPLE = ("farmer_jax eval --workdir=/tmp/run | --model=/tmp/model [--split=test] "
           "[--dequant_samples=4]")


def define_flags(fv):
  flags.DEFINE_string("workdir", None, "A training run (or pass --model).", flag_values=fv)
  flags.DEFINE_string("model", None, "An exported model directory (or pass --workdir).",
                      flag_values=fv)
  flags.DEFINE_string("split", None,
                      "The split to evaluate (default: the run's config.eval.split).",
                      flag_values=fv)
  flags.DEFINE_integer("dequant_samples", None,
                       "Uniform dequantization draws per image (default: config.eval's).",
                       flag_values=fv)
  flags.DEFINE_integer("batch", None, "Global batch (default: config.eval.batch_size).",
                       flag_values=fv)
  flags.DEFINE_string("data_dir", None, "Where the run's tfds dataset is (default: its "
                      "config.data.data_dir).", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "The dequantization seed.", flag_values=fv)
  flags.DEFINE_string("out", None, "The JSON result (default: next to the model).",
                      flag_values=fv)
  common.define_launch(fv)
  common.define_output(fv)


def main(f):
  if bool(f.workdir) == bool(f.model):
    raise app.UsageError("pass exactly one of --workdir (a training run) and --model (an export "
                         "directory)")
  common.start_jax(f)
  from farmer_jax.eval.evaluate import likelihood_eval
  likelihood_eval(workdir=f.workdir or None, model_dir=f.model or None, split=f.split,
                  dequant_samples=f.dequant_samples, batch_size=f.batch, data_dir=f.data_dir,
                  seed=f.seed, out=f.out, quiet=f.quiet, say=common.say(f))
