"""`farmer_jax check`: validates a train command line (run config, data, workdir) for a target of
--devices / --processes without starting anything: what a launcher runs before it pays for
machines. It takes every `train` flag, so a launcher passes train's arguments unchanged."""

from absl import app

from farmer_jax.commands import common, train
from farmer_jax.commands.common import Flag
from farmer_jax.errors import UserError

PURPOSE = "check a train command line for a target machine count, starting nothing"
EXAMPLE = ("farmer_jax check --config=configs/imagenet256.py:1.1B/16 --workdir=gs://b/run "
           "--devices=64 --processes=16")

FLAGS = (
    Flag("devices", None, "Devices of the target machine(s) (default: these).", int),
    Flag("processes", None, "Processes (hosts) of the target (default: 1).", int),
)


def define_flags(fv):
  common.define(fv, FLAGS)
  train.define_flags(fv)


def main(f):
  if f.config is None or not f.workdir:
    raise app.UsageError("--config and --workdir are required")
  for name in ("devices", "processes"):
    v = f[name].value
    if v is not None and v < 1:
      raise UserError(f"--{name}={v} must be >= 1")
  processes = f.processes or 1
  if f.devices is not None and f.devices % processes:
    raise UserError(f"--devices={f.devices} is not a multiple of --processes={processes}")

  from farmer_jax.config.parse import parse
  run = parse(f.config, f.workdir, num_devices=f.devices, num_processes=processes)
  m, d, t = run.model, run.data, run.train

  from farmer_jax.artifacts import storage
  where = "a bucket" if storage.is_url(f.workdir) else "a local path"
  print(f"config OK: {m.num_tokens} tokens of d={m.token_dim}, data {d.name}, global batch "
        f"{t.batch_size} on {f.devices or 'the local'} device(s) / {processes} process(es), "
        f"workdir {f.workdir} ({where})")
  if processes > 1 and not storage.is_url(f.workdir):
    print(f"note: {processes} processes with a local --workdir: it must be one filesystem shared "
          "by every host (e.g. NFS), or each host checkpoints to its own disk")
