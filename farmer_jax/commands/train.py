"""`farmer_jax train`: pretrains a model from a run config into --workdir, resuming the run found
there; prints the test bits/dim (and the MNIST sample quality when the config asks for it)."""

from absl import app

from farmer_jax.commands import common, exits

PURPOSE = "train a model from a config file into --workdir (resumes the run found there)"
EXAMPLE = ("farmer_jax train --config=quickstart --workdir=/tmp/run "
           "[--config.train.steps=500]")


def define_flags(fv):
  common.define_run(fv, "Directory for logs, checkpoints and samples.")


def main(f):
  if f.config is None:
    raise app.UsageError("--config is required, e.g. --config=quickstart")
  if not f.workdir:
    raise app.UsageError("--workdir is required, e.g. --workdir=/tmp/farmer_quickstart")
  common.start_jax(f)
  from farmer_jax.config.parse import parse
  run = parse(f.config, f.workdir)  # the whole run config + workdir, before anything is written

  from farmer_jax.train.report import format_test_bpd
  from farmer_jax.train.trainer import train_and_report
  summary, _ = train_and_report(run, f.workdir, quiet=f.quiet,
                                config_change_ok=f.config_change_ok,
                                abandon=exits.preempted_during_startup)
  if exits.preempted(summary):
    return
  # class-conditional -log p(x|y) and unconditional -log p(x|null)
  print(format_test_bpd(summary))
  if "sample_quality" in summary:   # config.eval.mnist_quality
    from farmer_jax.eval.mnist_quality import format_quality
    print(format_quality(summary["sample_quality"]))
