"""The ``farmer_jax`` console script: ``farmer_jax <command> --flags``; also
``python -m farmer_jax``. Each command (farmer_jax/commands/) owns its flags; ``farmer_jax
<command> --help`` lists them, and a flag the command does not take is refused.

  farmer_jax train --config=quickstart --workdir=/tmp/run [--config.train.steps=500]
  farmer_jax distill --config=quickstart:distill=1 --teacher=/tmp/run --workdir=/tmp/s
  farmer_jax export --workdir=/tmp/run --out=/tmp/model [--step=N] [--dtype=bfloat16] [--overwrite]
  farmer_jax sample --model=/tmp/model --classes=0,1,2 --num=8 --cfg=2.0 --seed=0 --out=grid.png \\
      [--npz=s.npz]
  farmer_jax eval --workdir=/tmp/run | --model=/tmp/model [--split=test] [--dequant_samples=4]
  farmer_jax score --model=/tmp/model --images=digits/ | x.npz | split:test --out=/tmp/scores \\
      [--labels=data]
  farmer_jax fid --model=/tmp/model --ref=ref.npz --inception=pt_inception.pth --num=50000 \\
      [--cfg=2.0] [--out=fid.json]
  farmer_jax prepare --folder=/data/photos --data_dir=/data/tfds --name=photos [--image_size=256]
  farmer_jax check --config=imagenet256:1.1B/16 --workdir=gs://b/run --devices=64 \\
      --processes=16
  farmer_jax convert --from=tarflow --ckpt=afhq_model_8_768_8_8_0.07.pth --out=/tmp/afhq \\
      [--config=tarflow:afhq256 --config.data.name=tfds:afhq] [--pixels=tarflow]
  farmer_jax convert --to=tarflow --model=/tmp/afhq --out=afhq.pth

Errors: a bad value (config field, flag, path) is refused before any work or any file is
written. Every expected failure prints ONE line ``farmer_jax <command>: <message>`` as the last
line on stderr and exits 2 (a non-finite training loss exits 1); ``--debug`` also prints the
traceback. A traceback without ``--debug`` means a bug (commands/exits.py).
"""

import sys
import textwrap

from absl import app, flags

from farmer_jax.commands import (check, convert, distill, evaluate, exits, export, fid, prepare,
                                 sample, score, train)

COMMANDS = {"train": train, "distill": distill, "export": export, "sample": sample,
            "eval": evaluate, "score": score, "fid": fid, "prepare": prepare, "check": check,
            "convert": convert}
USAGE = (
    "usage: farmer_jax <command> [--flags]\n"
    f"commands: {', '.join(COMMANDS)}\n"
    "example: farmer_jax train --config=quickstart --workdir=/tmp/farmer_quickstart\n"
    "flags: farmer_jax <command> --help lists that command's flags\n"
    "errors: one line on stderr, exit 2 (--debug: with the traceback)")
_HELP = ("-h", "-help", "--help", "-helpfull", "--helpfull", "-helpshort", "--helpshort")
_DEBUG = ("--debug", "-debug", "--debug=true", "--debug=True", "--debug=1")


def start_process():
  """What every command does before anything else, in this order: where libtpu is installed
  without a TPU attached, jax is told to use the CPU (``distributed.skip_absent_tpu``; importing
  jax starts no thread); then the malloc mode is applied (``host_memory.configure``, whose 'auto'
  reads that choice), before jax starts its threads; then, on a virtual machine's CPUs, their
  idle time is kept spinning (``host_cpu.configure``). Returns the malloc mode and the CPU mode
  applied; a bad $FARMER_JAX_MALLOC or $FARMER_JAX_CPU_SPIN raises UserError (a ValueError)."""
  from farmer_jax import host_cpu, host_memory
  from farmer_jax.distributed import skip_absent_tpu
  skip_absent_tpu()
  malloc = host_memory.configure()
  return malloc, host_cpu.configure()


def flag_values(cmd):
  """A new FlagValues holding the flags of ``cmd``."""
  fv = flags.FlagValues()
  COMMANDS[cmd].define_flags(fv)
  return fv


def owners(name, cmd=None):
  """The commands other than ``cmd`` that take flag ``name`` (also as --noNAME, or as a
  --config.x override of --config)."""
  name = name.split(".", 1)[0]
  found = []
  for other in COMMANDS:
    fv = flag_values(other)
    if other != cmd and (name in fv or (name.startswith("no") and name[2:] in fv and
                                        fv[name[2:]].boolean)):
      found.append(other)
  return found


def command_help(cmd):
  """What ``farmer_jax <cmd> --help`` prints: its purpose, an example and its flags."""
  module, fv = COMMANDS[cmd], flag_values(cmd)
  lines = [f"farmer_jax {cmd}: {module.PURPOSE}", f"example: {module.EXAMPLE}", "", "flags:"]
  for name in fv:   # in definition order: the command's own flags, then the shared ones
    flag = fv[name]
    head = f"  --[no]{name}" if flag.boolean else f"  --{name}"
    if flag.default is not None and not flag.boolean:
      head += f" (default: {flag.default})"
    lines.append(head)
    lines += textwrap.wrap(flag.help, 100, initial_indent=" " * 6, subsequent_indent=" " * 6)
  return "\n".join(lines)


def run(argv=None):
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(USAGE)
    sys.exit(0 if len(argv) >= 2 else 2)
  cmd = argv[1]
  if cmd not in COMMANDS:
    print(
        f"farmer_jax: unknown command {cmd!r}; commands: {', '.join(COMMANDS)} (farmer_jax --help)",
        file=sys.stderr)
    sys.exit(2)
  if any(a in _HELP for a in argv[2:]):
    print(command_help(cmd))
    sys.exit(0)
  try:
    start_process()
  except ValueError as e:
    print(f"farmer_jax {cmd}: {e}", file=sys.stderr)
    sys.exit(2)
  if cmd in ("train", "distill"):
    exits.early_sigterm()
  prog_argv = [f"farmer_jax {cmd}"] + argv[2:]
  sys.argv = prog_argv  # config_flags reads the --config.x.y overrides from sys.argv
  debug = any(a in _DEBUG for a in prog_argv)
  fv = flag_values(cmd)

  def parse(args):
    flags.FLAGS.mark_as_parsed()  # absl's own flags (its logging) keep their defaults
    return exits.parse_flags(cmd, fv, args, debug, lambda name: owners(name, cmd))

  # app.run: absl's logging handler and faulthandler, then parse, then the command
  app.run(lambda rest: exits.run_main(cmd, COMMANDS[cmd].main, fv, rest), argv=prog_argv,
          flags_parser=parse)
