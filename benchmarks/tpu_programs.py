"""The train step of each ImageNet preset compiled for a TPU slice and read from its compiled form
(docs/performance.md, "TPU programs, read from their compiled form").

  python benchmarks/tpu_programs.py [--presets 1.1B/16,1.9B/8] [--slice v5p-64] [--batch 256]
      [--data 1] [--remat_policy nothing_saveable] [--xla_options none|flag=value,...] [--out DIR]

For each preset (imagenet256 with its defaults, or the batch / mesh / remat policy given), the
train step `farmer_jax train` runs is compiled for the slice's devices (aot/programs.py, libtpu,
no TPU), and its optimized HLO is read (aot/anatomy.py): the collectives per step (kind, count,
GiB, async and overlapped or not), the fusions and their matmul FLOPs, the HBM bytes of the
top-level ops next to XLA's ``bytes accessed`` (which counts each loop body once), and the
roofline estimate of the step time and MFU with its parts. ``--data N`` makes the mesh
(('data', N), ('fsdp', -1)): FSDP inside groups of chips, data parallel across them. The step
compiles with the XLA options `farmer_jax train` gives it on TPU (xla_options.TPU_OPTIONS: async
collectives); ``--xla_options`` replaces them ('none': XLA's defaults). Each result
is written to DIR/<preset>_<slice>_<variant>.json with the HLO text beside it.
An estimate from the compiled program, not a measurement on a TPU.
Needs libtpu (pip install 'farmer_jax[tpu-aot]'); no TPU.
"""

import argparse
import hashlib
import json
import os
import time

PRESETS = ("1.1B/16", "1.1B/8", "1.9B/16", "1.9B/8")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--presets", default=",".join(PRESETS))
  ap.add_argument("--slice", default="v5p-64")
  ap.add_argument("--batch", type=int, default=None, help="global batch (default: the preset's)")
  ap.add_argument("--data", type=int, default=1,
                  help="size of the mesh's data axis (the preset's dp=N)")
  ap.add_argument("--remat_policy", default=None)
  ap.add_argument("--xla_options", default=None,
                  help="config.train.xla_options: the train step's XLA compiler options on TPU "
                  "(default: the config's, 'tpu'); 'flag=value,...', or 'none' (XLA's defaults)")
  ap.add_argument("--out", default="/tmp/tpu_programs")
  a = ap.parse_args()
  from farmer_jax import configlib, flops, sharding, xla_options
  from farmer_jax.aot import anatomy, compile as aot_compile, programs, slices
  from farmer_jax.config.parse import parse
  os.makedirs(a.out, exist_ok=True)
  s = slices.parse_slice(a.slice)
  devices = slices.slice_devices(s)
  chip = s.chip
  for preset in a.presets.split(","):
    c = configlib.load(f"imagenet256:{preset},dp={a.data}"
                       + (f",batch={a.batch}" if a.batch else ""))
    if a.remat_policy:
      c.model.remat_policy = a.remat_policy
    if a.xla_options is not None:
      c.train.xla_options = a.xla_options
    run = parse(c, num_devices=len(devices), num_processes=slices.processes(devices),
                read_data=False)
    mesh = sharding.make_mesh(run.mesh, devices)
    options = xla_options.for_devices(devices, run.train.xla_options) or {}
    step = programs.train_programs(run, mesh, slices.processes(devices))[0]
    variant = (f"batch{run.train.batch_size}_data{a.data}_"
               f"{run.model.remat_policy if run.model.remat else 'noremat'}"
               + ("" if run.train.xla_options == "tpu" else "_xla-" + (
                   "none" if not options else
                   hashlib.sha1(run.train.xla_options.encode()).hexdigest()[:8])))
    print(f"== {preset} on {s.describe()}: global batch {run.train.batch_size} "
          f"({run.train.batch_size / len(devices):g} per chip), mesh {dict(mesh.shape)}, "
          f"remat {run.model.remat} ({run.model.remat_policy}), remat_blocks "
          f"{run.model.remat_blocks}; XLA options {options or 'defaults'}", flush=True)
    t0 = time.time()
    try:
      compiled = aot_compile.compiled_of(step)
    except Exception as e:   # noqa: BLE001 -- an out-of-memory compile is a result here
      print(f"   does not compile: {str(e).splitlines()[0][:300]}", flush=True)
      continue
    memory = aot_compile.Memory.of(compiled)
    text = compiled.as_text()
    name = f"{preset.replace('/', '_')}_{s.name}_{variant}"
    # written first, so the HLO survives a failure to read it
    with open(os.path.join(a.out, name + ".hlo.txt"), "w") as f:
      f.write(text)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    prog = anatomy.analyze(text)
    analytic = flops.train_step_flops(run.model, run.train.batch_size) / len(devices)
    r = anatomy.roofline(prog, chip.peak_flops, chip.hbm_bandwidth, chip.ici_bandwidth, analytic)
    print(f"   compiled in {time.time() - t0:.0f} s; {aot_compile.size(memory.total)} per chip "
          f"of {aot_compile.size(chip.hbm_bytes)}", flush=True)
    print(anatomy.describe(prog, cost.get("bytes accessed"), chip), flush=True)
    print("  matmuls with the most FLOPs per step (module, pass: TFLOPs per chip, fusions run):")
    for tail, pas, f, n in anatomy.top_matmuls(prog, 10):
      print(f"    {tail}, {pas}: {f / 1e12:.2f}, {n}")
    print("  " + r.describe(), flush=True)
    rep = {"preset": preset, "slice": s.name, "chips": len(devices),
           "batch": run.train.batch_size, "mesh": dict(mesh.shape),
           "remat": run.model.remat, "remat_policy": run.model.remat_policy,
           "remat_blocks": run.model.remat_blocks, "xla_options": options,
           "bytes_per_chip": memory.total,
           "xla_bytes_accessed": cost.get("bytes accessed"),
           "anatomy": anatomy.as_json(prog, r), "assumptions": list(anatomy.ASSUMPTIONS)}
    with open(os.path.join(a.out, name + ".json"), "w") as f:
      json.dump(rep, f, indent=1)


if __name__ == "__main__":
  main()
