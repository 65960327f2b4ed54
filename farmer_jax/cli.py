"""The ``farmer_jax`` console script: ``farmer_jax <command> --flags``; also ``python -m farmer_jax``.

Commands (this release): train. Later: sample, export, eval, distill, prepare, convert, fid.

  farmer_jax train --config=configs/quickstart.py --workdir=/tmp/run [--config.train.steps=500]
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (optionally ':arg').",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for logs, checkpoints and samples.")
flags.DEFINE_bool("quiet", False, "No progress bars or console logs.")
flags.DEFINE_bool("verbose", False, "Show library INFO logs (orbax, absl).")


def _train(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/quickstart.py")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required, e.g. --workdir=/tmp/farmer_quickstart")
  if not FLAGS.verbose:
    logging.set_verbosity(logging.WARNING)     # keep orbax's per-save INFO lines off the console
  from farmer_jax.config import ConfigError
  from farmer_jax.train.trainer import train_and_report
  try:
    summary, _ = train_and_report(FLAGS.config, FLAGS.workdir, quiet=FLAGS.quiet)
  except ConfigError as e:
    print(f"farmer_jax train: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"test bpd: {summary['test_bpd']:.4f}")


COMMANDS = {"train": _train}
USAGE = ("usage: farmer_jax <command> [--flags]\n"
         f"commands: {', '.join(COMMANDS)}\n"
         "example: farmer_jax train --config=configs/quickstart.py --workdir=/tmp/farmer_quickstart")


def run(argv=None):
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(USAGE)
    sys.exit(0 if len(argv) >= 2 else 2)
  cmd = argv[1]
  if cmd not in COMMANDS:
    print(f"farmer_jax: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    sys.exit(2)
  app.run(COMMANDS[cmd], argv=[f"farmer_jax {cmd}"] + argv[2:])
