"""`farmer_jax check`: validates a train command line (run config, data, workdir) for a target of
--devices / --processes without starting anything: what a launcher runs before it pays for
machines. It takes every `train` flag, so a launcher passes train's arguments unchanged.

With --compile (implied by --topology) it also compiles every program the run will execute for
the target's devices (a Cloud TPU slice that need not exist, through libtpu; or this machine's),
says per program whether it fits the device memory, and projects the train step's time and cost
(aot/). Exit 2 when a program does not fit or does not compile."""

import json

from absl import app

from farmer_jax.commands import common, train
from farmer_jax.commands.common import Flag
from farmer_jax.errors import UserError

PURPOSE = ("check a train command line for a target machine count, or compile every program of "
           "the run for a TPU slice, starting nothing")
EXAMPLE = ("farmer_jax check --config=imagenet256:1.9B/8 --topology=v5p-64 "
           "[--out=fit.json]   (or --workdir=gs://b/run --devices=64 --processes=16)")

FLAGS = (
    Flag("devices", None, "Devices of the target machine(s) (default: these).", int),
    Flag("processes", None, "Processes (hosts) of the target (default: 1).", int),
    Flag("compile", False, "Compile every program the run executes (train or distill step, "
         "eval, sample grid; an export's sampler and FID features) for the target and check "
         "each fits its device memory. The data is not read."),
    Flag("topology", None, "Compile for this Cloud TPU slice, which need not exist: v4-N, "
         "v5litepod-N (or v5e-N), v5p-N, v6e-N as Cloud TPU names them, e.g. v5p-64. Implies "
         "--compile; needs libtpu (pip install 'farmer_jax[tpu-aot]'); no TPU or credentials."),
    Flag("num_slices", 1, "Slices of --topology (multi-slice over DCN)."),
    Flag("programs", "train,eval,grid,sampler,fid",
         "Which programs --compile compiles (comma-separated): the train (or distill) step, the "
         "eval (or reconstruction error) step, the end-of-run sample grid, an export's sampler "
         "(sample/fid), fid's Inception-v3 features."),
    Flag("distill", False, "The run is `farmer_jax distill` (its step and reconstruction error), "
         "with the config's model as the teacher's."),
    Flag("mfu", 0.4, "Model FLOPs utilisation the time projection assumes (0-1]."),
    Flag("price", None, "USD per chip-hour of the cost projection (default: the slice's "
         "on-demand list price).", float),
    Flag("out", None, "Write the compile report as JSON here."),
    Flag("read_records", 0, "Also read this many records of the train split and of the eval "
         "split from config.data.data_dir (spread over each split, through the pipeline's "
         "per-record checks) and print the time per record: whether this machine can read the "
         "data, e.g. a bucket (launch/tpu_vm.sh smoke runs it on every worker). Not with "
         "--compile."),
)


def define_flags(fv):
  common.define(fv, FLAGS)
  train.define_flags(fv)


def main(f):
  compiling = bool(f.compile or f.topology)
  if f.config is None or not (f.workdir or compiling):
    raise app.UsageError("--config and --workdir are required (--workdir is optional with "
                         "--compile or --topology)")
  for name in ("devices", "processes"):
    v = f[name].value
    if v is not None and v < 1:
      raise UserError(f"--{name}={v} must be >= 1")
  processes = f.processes or 1
  if f.devices is not None and f.devices % processes:
    raise UserError(f"--devices={f.devices} is not a multiple of --processes={processes}")
  if not compiling:
    given = [n for n in ("num_slices", "programs", "distill", "mfu", "price", "out")
             if f[n].present]
    if given:
      raise UserError(f"--{given[0]} applies to what --compile compiles. Fix: add --compile or "
                      "--topology=SLICE, or drop it")
  if f.read_records < 0:
    raise UserError(f"--read_records={f.read_records} must be >= 0")
  if f.read_records and compiling:
    raise UserError("--read_records reads the data, which --compile does not. Fix: check the "
                    "data in a second run, without --compile/--topology")
  if not 0 < f.mfu <= 1:
    raise UserError(f"--mfu={f.mfu} must be in (0, 1], e.g. --mfu=0.4")
  if f.price is not None and f.price < 0:
    raise UserError(f"--price={f.price} must be >= 0 (USD per chip-hour)")
  if f.out:
    common.check_json_out(f.out)
  from farmer_jax.aot.programs import KEYS
  keys = tuple(k.strip() for k in f.programs.split(",") if k.strip())
  unknown = [k for k in keys if k not in KEYS]
  if unknown or not keys:
    raise UserError(f"--programs={f.programs}: unknown program(s) {unknown}. Fix: a "
                    f"comma-separated subset of {','.join(KEYS)}")

  target = None
  if f.topology:
    if f.devices is not None or f.processes is not None:
      raise UserError(f"--topology={f.topology} sets the devices and processes. Fix: drop "
                      "--devices and --processes")
    target = _slice_target(f.topology, f.num_slices)
  elif compiling:
    if f.devices is not None or f.processes is not None:
      raise UserError("--compile without --topology compiles for this machine's devices. Fix: "
                      "drop --devices/--processes, or name a TPU slice with --topology")
    common.start_jax(f)
    from farmer_jax.aot.report import local_target
    target = local_target()

  from farmer_jax.config.parse import parse
  if target is not None:
    run = parse(f.config, f.workdir or None, num_devices=len(target.devices),
                num_processes=target.processes, read_data=False)
  else:
    run = parse(f.config, f.workdir, num_devices=f.devices, num_processes=processes)
  m, d, t = run.model, run.data, run.train

  from farmer_jax.artifacts import storage
  where = ("" if not f.workdir else
           f", workdir {f.workdir} ({'a bucket' if storage.is_url(f.workdir) else 'a local path'})")
  count = (f"{len(target.devices)} device(s) / {target.processes} process(es)" if target else
           f"{f.devices or 'the local'} device(s) / {processes} process(es)")
  data = f"data {d.name}" + (" (not read)" if target else "")
  print(f"config OK: {m.num_tokens} tokens of d={m.token_dim} (compute {m.dtype}, attention "
        f"{m.attention}), {data}, global batch "
        f"{t.batch_size} on {count}{where}")
  if not target and processes > 1 and f.workdir and not storage.is_url(f.workdir):
    print(f"note: {processes} processes with a local --workdir: it must be one filesystem shared "
          "by every host (e.g. NFS), or each host checkpoints to its own disk")
  if f.read_records:
    _read_records(run, f.read_records)
  if target is not None:
    _compile(f, run, target, keys)


def _read_records(run, n):
  """Reads ``n`` records of the train and eval splits, evenly spread (so several files of a split
  are opened), through the pipeline's per-record map; prints where from and how fast. A record
  that cannot be read (no access to the bucket, a missing file) is a UserError."""
  import time
  from farmer_jax.data import pipeline, sources
  from farmer_jax.errors import brief
  d = run.data
  where = d.data_dir or "its default location"
  prep = pipeline.Preprocess(d)
  for split in dict.fromkeys((d.train_split, run.eval.split)):
    start = time.perf_counter()
    source = sources.open_split(d, split)
    size = len(source)
    picked = sorted({i * size // n for i in range(min(n, size))})
    for i in picked:
      try:
        prep.map(source[i])
      except (OSError, RuntimeError) as e:
        raise UserError(f"--read_records: record {i} of {d.name} split {split!r} in {where} "
                        f"cannot be read ({brief(e)}). Fix: give this machine read access to "
                        "data_dir (on a TPU VM: its service account, e.g. roles/storage."
                        "objectViewer on the bucket) and check the dataset is complete there"
                        ) from None
    took = time.perf_counter() - start
    print(f"data read: {len(picked)} of {size} records of {d.name} split {split!r} from {where} "
          f"in {took:.2f} s ({1000 * took / len(picked):.0f} ms per record, opening included)")


def _slice_target(name, num_slices):
  """The Target of a Cloud TPU slice name (UserError for an unknown one, or without libtpu)."""
  from farmer_jax.aot import slices
  from farmer_jax.aot.report import Target
  s = slices.parse_slice(name, num_slices)
  target = Target.of_slice(s, slices.slice_devices(s))
  print(f"target: {s.describe()}; {target.processes} host(s)")
  return target


def _compile(f, run, target, keys):
  """Compiles and reports every program; UserError (exit 2) when one does not fit or compile."""
  from farmer_jax.aot import programs, report
  results = report.compile_all(run, target, distill=f.distill, keys=keys, say=print)
  price_source = "--price" if f.price is not None else target.price_source
  pr = report.projection(run, results, target, f.mfu, f.price)
  print(report.describe_projection(pr, target, price_source))
  skipped = programs.not_compiled(run)
  for line in skipped:
    print(f"not compiled: {line}")
  if f.out:
    from farmer_jax.artifacts import storage
    storage.write_text(f.out, json.dumps(
        report.as_json(target, results, pr, skipped, price_source), indent=2))
    print(f"-> {f.out}")
  bad = [c for c in results if not c.ok]
  if bad:
    names = "; ".join(f"{c.program.name}: {c.error or c.verdict.describe()}" for c in bad)
    fix = bad[0].program.fix
    if bad[0].fits_at:   # the sampler, per device: their --batch is split over the mesh
      from farmer_jax import sharding
      slots = sharding.batch_slots(sharding.make_mesh(run.mesh, target.devices),
                                   run.sharding_rules)
      fix = (f"pass --batch={bad[0].fits_at * slots} ({bad[0].fits_at} per data-parallel device) "
             "to `farmer_jax sample` / `fid` (it fits), or export with --dtype=bfloat16")
    raise UserError(f"{len(bad)} of {len(results)} programs cannot run on {target.name}: {names}. "
                    f"Fix: {fix}")
  if target.memory is None:
    print(f"every program compiled for {target.name} (its memory is unknown: no fit verdict)")
  else:
    print(f"every program fits {target.name}")
