"""`farmer_jax distill`: trains the one-step student inverse of a pretrained model's AF (a
training workdir or an export) into its own --workdir; prints its reconstruction error."""

from absl import app, flags

from farmer_jax.commands import common, exits

PURPOSE = "distill a pretrained model's AF inverse into a one-step student"
EXAMPLE = ("farmer_jax distill --config=configs/quickstart.py:distill=1 --teacher=/tmp/run "
           "--workdir=/tmp/s")


def define_flags(fv):
  common.define_config(fv)
  flags.DEFINE_string("teacher", None,
                      "The pretrained model, a training workdir or an export directory.",
                      flag_values=fv)
  flags.DEFINE_string("workdir", None, "The student's run directory (logs, checkpoints).",
                      flag_values=fv)
  common.define_config_change_ok(fv)
  common.define_launch(fv)
  common.define_output(fv)


def main(f):
  if f.config is None or not f.workdir or not f.teacher:
    raise app.UsageError("--config, --teacher (a training run or export) and --workdir (the "
                         "student's run) are required")
  common.start_jax(f)

  from farmer_jax.distill.trainer import distill_and_report
  summary, _ = distill_and_report(f.config, f.workdir, f.teacher, quiet=f.quiet,
                                  config_change_ok=f.config_change_ok,
                                  abandon=exits.preempted_during_startup)
  if exits.preempted(summary):
    return
  print(f"student reconstruction error (relative MSE): {summary['recon_rel_mse_student']:.4g} "
        f"(undistilled copy: {summary['recon_rel_mse_copy']:.4g})")
