"""`farmer_jax eval`: the test bits/dim of a training run or an export (every example once, K
dequantization draws), written as JSON (``--out``, or next to the model) and, for a run, as
TensorBoard scalars ``eval_<split>/*`` at its checkpoint's step."""

import time

from absl import app

from farmer_jax.commands import common
from farmer_jax.commands.common import Flag
from farmer_jax.errors import UserError

PURPOSE = "bits/dim of a training run or an export on a data split"
EXAMPLE = "farmer_jax eval --workdir=/tmp/run | --model=/tmp/m [--split=test] [--dequant_samples=4]"

FLAGS = (
    # what is evaluated: exactly one of --workdir and --model
    Flag("workdir", None, "A training run (or pass --model)."),
    Flag("model", None, "An exported model directory (or pass --workdir)."),
    Flag("split", None, "The split to evaluate (default: the run's config.eval.split)."),
    Flag("dequant_samples", None,
         "Uniform dequantization draws per image (default: config.eval's).", int),
    Flag("batch", None, "Global batch (default: config.eval.batch_size).", int),
    Flag("data_dir", None,
         "Where the run's tfds dataset is (default: its config.data.data_dir)."),
    Flag("seed", 0, "The dequantization seed."),
    Flag("out", None, "The JSON result (default: next to the model)."),
)


def define_flags(fv):
  common.define(fv, FLAGS)
  common.define_launch(fv)
  common.define_output(fv)


def main(f):
  if bool(f.workdir) == bool(f.model):
    raise app.UsageError("pass exactly one of --workdir (a training run) and --model (an export "
                         "directory)")
  common.start_jax(f)
  t0 = time.time()
  if f.dequant_samples is not None and f.dequant_samples < 1:
    raise UserError(f"--dequant_samples={f.dequant_samples} must be >= 1 (uniform dequantization "
                    "draws per image)")
  if f.batch is not None and f.batch < 1:
    raise UserError(f"--batch={f.batch} must be >= 1")
  say = common.say(f)
  workdir, model_dir = f.workdir or None, f.model or None

  from farmer_jax.config.schema import EvalConfig
  from farmer_jax.data import sources
  from farmer_jax.eval import evaluate
  config, mcfg, params, source = evaluate.load_params(workdir, model_dir, say=say)
  e = EvalConfig.from_section(config.eval)
  split = f.split or e.split
  path = f.out or evaluate.result_path(workdir or model_dir, split)
  common.check_json_out(path)
  data = evaluate.eval_data(config, f.data_dir)
  sources.require_dataset(data, model_dir or workdir)
  sources.require_split(data, split, f"--split={split}", "pass one of them")

  res, gb = evaluate.evaluate_split(config, mcfg, params, data, split,
                                    f.dequant_samples or e.dequant_samples,
                                    f.batch or e.batch_size, seed=f.seed, progress=not f.quiet,
                                    say=say)
  result = evaluate.bpd_result(res, source, data, mcfg, split, f.seed, gb, time.time() - t0)
  evaluate.write_result(path, result)
  if workdir is not None and source.get("step") is not None:   # TensorBoard, at its step
    from farmer_jax.eval.likelihood import eval_scalars
    from farmer_jax.artifacts.metrics import MetricWriter
    w = MetricWriter(workdir, jsonl=False)
    try:
      w.write(int(source["step"]), eval_scalars(res), prefix=f"eval_{split}")
    finally:
      w.close()
  say(evaluate.format_result(result))
  say(f"-> {path}")
