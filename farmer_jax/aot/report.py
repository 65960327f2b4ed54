"""`farmer_jax check --compile`'s work: every program of a run (aot/programs.py) compiled for the
target's devices (aot/compile.py), one line per program as it is done, the train step's time and
cost projection, and the whole report as a JSON-ready dict."""

import dataclasses
from typing import Optional

from farmer_jax.aot import programs as progs
from farmer_jax.aot.compile import compile_fitting, project, size

# dense bf16 peak per device of the GPUs a local --compile may find (device_kind prefix -> FLOP/s)
GPU_PEAK = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


@dataclasses.dataclass(frozen=True)
class Target:
  """What the programs compile for: ``devices`` (a slice's, or this machine's) on ``processes``
  hosts, ``name``, the usable memory per device (None: unknown), the peak bf16 FLOP/s per device
  and the price per device-hour (None: unknown)."""
  name: str
  devices: tuple
  processes: int
  memory: Optional[int]
  peak_flops: Optional[float]
  price: Optional[float]
  price_source: str = ""

  @classmethod
  def of_slice(cls, s, devices):
    """The Target of slice ``s`` (aot/slices.py) with its ``devices``."""
    from farmer_jax.aot.slices import processes
    return cls(s.label, devices, processes(devices), s.chip.hbm_bytes, s.chip.peak_flops,
               s.chip.price_per_chip_hour, "on-demand list price")


def local_target():
  """This machine's devices: their memory limit where the runtime reports one (GPUs), and a
  GPU's peak from GPU_PEAK."""
  import jax
  devices = tuple(jax.devices())
  try:
    stats = devices[0].memory_stats() or {}
  except (jax.errors.JaxRuntimeError, NotImplementedError):   # none kept: the memory is unknown
    stats = {}
  kind = devices[0].device_kind
  peak = next((v for k, v in GPU_PEAK.items() if kind.startswith(k)), None)
  return Target(f"{len(devices)} x {kind} (this machine)", devices, jax.process_count(),
                stats.get("bytes_limit"), peak, None)


def compile_all(run, target: Target, distill=False, keys=progs.KEYS, say=print):
  """Compiles every program of ``run`` for ``target`` (those of ``keys``, programs.KEYS);
  returns the Compiled results in order, saying one line per program as it is done."""
  from farmer_jax import sharding
  mesh = sharding.make_mesh(run.mesh, target.devices)
  todo = (progs.train_programs(run, mesh, target.processes, distill)
          + ([] if distill else progs.export_programs(run, target.devices[0])))
  todo = [p for p in todo if p.key in keys]
  say(f"compiling {len(todo)} programs for {target.name} (each takes up to a few minutes "
      "here)")
  out = []
  for p in todo:
    c = compile_fitting(p, target.memory)
    out.append(c)
    say(describe(c))
  return out


def describe(c):
  """Lines for one compiled program: its verdict and memory, then its FLOPs."""
  p = c.program
  head = f"  {p.name} ({p.what}): "
  if c.error:
    return head + f"DOES NOT COMPILE: {c.error}"
  fits_at = "" if c.fits_at is None else f"; fits at batch {c.fits_at}"
  lines = [head + c.verdict.describe() + fits_at + f"; compiled in {c.seconds:.0f} s"]
  if c.memory is not None:
    m = c.memory
    lines.append(f"      per device: arguments {size(m.arguments)}, outputs {size(m.outputs)} "
                 f"(aliased {size(m.aliased)}), temporaries {size(m.temporaries)}")
  if c.xla_flops is not None and p.flops_loops_once:
    ours = p.flops_loops_once / p.devices
    lines.append(f"      FLOPs per device, scanned loops counted once: XLA {c.xla_flops:.3g}, "
                 f"analytic {ours:.3g} (ratio {c.xla_flops / ours:.2f}); analytic, whole "
                 f"program: {p.flops / p.devices:.3g}")
  return "\n".join(lines)


def projection(run, results, target: Target, mfu, price=None):
  """The train (or distill) step's projection on ``target`` at ``mfu``; None without that step
  among ``results`` or without the device's peak."""
  step = next((c.program for c in results if c.program.train_step), None)
  if step is None or target.peak_flops is None:
    return None
  price = target.price if price is None else price
  return project(step.flops, run.train.steps, len(target.devices), target.peak_flops, mfu, price,
                 step.name)


def describe_projection(pr, target, price_source):
  if pr is None:
    return ("no time projection: the train (or distill) step was not compiled, or this device's "
            "peak FLOP/s is unknown (compile for a TPU --topology, or a GPU of aot/report.py "
            "GPU_PEAK)")
  days = pr.hours / 24
  cost = ("" if pr.cost is None else
          f", ${pr.cost:,.0f} at ${pr.price:.2f} per chip-hour ({price_source})")
  return (f"{pr.step} at {pr.mfu:.0%} MFU: {pr.step_seconds:.3g} s; {pr.steps:,} steps -> "
          f"{pr.hours:,.1f} h ({days:.1f} days) on {len(target.devices)} chips, "
          f"{pr.chip_hours:,.1f} chip-hours{cost}")


def as_json(target, results, pr, not_compiled, price_source):
  """The report as a JSON-ready dict (``fits``: every program compiled and fits)."""
  rows = []
  for c in results:
    p = c.program
    row = {"program": p.name, "what": p.what, "devices": p.devices,
           "compiled": c.memory is not None, "compile_seconds": round(c.seconds, 1),
           "error": c.error}
    if c.verdict is not None:
      row.update(fits=c.verdict.fits, fits_at_batch=c.fits_at, bytes_needed=c.verdict.needed,
                 bytes_available=c.verdict.available, bytes_margin=c.verdict.margin)
    if c.memory is not None:
      row["memory"] = dataclasses.asdict(c.memory)
    row.update(xla_flops_per_device=c.xla_flops,
               analytic_flops=p.flops, analytic_flops_loops_once=p.flops_loops_once)
    rows.append(row)
  return {"target": {"name": target.name, "devices": len(target.devices),
                     "processes": target.processes, "memory_per_device": target.memory,
                     "peak_flops_per_device": target.peak_flops},
          "programs": rows,
          "projection": None if pr is None else dict(dataclasses.asdict(pr),
                                                      price_source=price_source),
          "not_compiled": list(not_compiled),
          "fits": all(c.ok for c in results)}
