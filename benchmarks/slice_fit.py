"""The fit table of docs/scaling.md: every ImageNet preset compiled for every slice, here.

  python benchmarks/slice_fit.py [--presets 1.1B/16,1.9B/8] [--slices v5litepod-16,v5p-64]
      [--programs train,eval,grid] [--out DIR]

For each preset (imagenet256, its defaults: batch 256, FSDP over the slice) and slice,
`farmer_jax check --topology`'s programs are compiled in this one process (aot/); each result is
written to DIR/<preset>_<slice>.json as the command writes it, and the markdown table (per-device
GiB and FITS / DOES NOT FIT per program, step time and cost at 40% MFU) is printed at the end.
The export's sampler and fid's Inception-v3 run on one chip: they depend on the chip, not the
slice, so they are compiled on the first slice of each chip generation in --slices (the sampler
per preset, the Inception once).
Needs libtpu (pip install 'farmer_jax[tpu-aot]'); no TPU.
"""

import argparse
import json
import os
import time

PRESETS = ("1.1B/16", "1.1B/8", "1.9B/16", "1.9B/8")
SLICES = ("v4-32", "v5litepod-16", "v5litepod-64", "v5litepod-256", "v5p-64", "v5p-128")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--presets", default=",".join(PRESETS))
  ap.add_argument("--slices", default=",".join(SLICES))
  ap.add_argument("--programs", default="train,eval,grid,sampler,fid")
  ap.add_argument("--mfu", type=float, default=0.4)
  ap.add_argument("--out", default="/tmp/slice_fit")
  ap.add_argument("--table", action="store_true",
                  help="only print the table of the JSON results already in --out")
  a = ap.parse_args()
  if a.table:
    print(table(saved(a.out, a.presets.split(","), a.slices.split(","))))
    return
  from farmer_jax import configlib
  from farmer_jax.aot import report, slices
  from farmer_jax.config.parse import parse
  os.makedirs(a.out, exist_ok=True)
  keys = tuple(a.programs.split(","))
  seen = set()
  for name in a.slices.split(","):
    s = slices.parse_slice(name)
    devices = slices.slice_devices(s)
    target = report.Target.of_slice(s, devices)
    for preset in a.presets.split(","):
      run = parse(configlib.load(f"imagenet256:{preset}"), num_devices=len(devices),
                  num_processes=target.processes, read_data=False)
      # one chip: the sampler depends on the preset and the chip, the Inception on the chip
      once = {"sampler": (s.chip.name, preset), "fid": s.chip.name}
      want = tuple(k for k in keys if k not in once or once[k] not in seen)
      seen.update(once[k] for k in want if k in once)
      t0 = time.time()
      print(f"== {preset} on {s.describe()}", flush=True)
      results = report.compile_all(run, target, keys=want,
                                   say=lambda m: print(m, flush=True))
      pr = report.projection(run, results, target, a.mfu)
      print(report.describe_projection(pr, target, target.price_source), flush=True)
      rep = report.as_json(target, results, pr, [], target.price_source)
      path = _path(a.out, preset, s.name)
      with open(path, "w") as f:
        json.dump(rep, f, indent=2)
      print(f"   ({time.time() - t0:.0f} s)", flush=True)
  print(table(saved(a.out, a.presets.split(","), a.slices.split(","))))


def _path(out, preset, slice_name):
  return os.path.join(out, f"{preset.replace('/', '_')}_{slice_name}.json")


def saved(out, presets, slice_names):
  """(preset, Slice, report) of the JSON results in ``out``, in preset-then-slice order. The
  one-chip programs, compiled on the first slice of each chip (the sampler per preset, fid's
  programs once), are copied to the other slices of that chip."""
  from farmer_jax.aot import slices
  rows, one_chip = [], {}
  for preset in presets:
    for name in slice_names:
      path = _path(out, preset, name)
      if not os.path.exists(path):
        continue
      with open(path) as f:
        rep = json.load(f)
      s = slices.parse_slice(name)
      for p in rep["programs"]:
        if p["devices"] == 1:
          sampler = p["program"].startswith("sample")
          one_chip[(s.chip.name, preset if sampler else None, p["program"])] = p
      rows.append((preset, s, rep))
  for preset, s, rep in rows:
    have = {p["program"] for p in rep["programs"]}
    for (chip, of_preset, name), p in one_chip.items():
      if chip == s.chip.name and of_preset in (None, preset) and name not in have:
        rep["programs"].append(p)
  return rows


def _cell(p):
  if p.get("error"):
    return "does not compile"
  gib = p["bytes_needed"] / 2 ** 30
  if p["fits"]:
    return f"{gib:.1f} fits"
  at = f" (fits at batch {p['fits_at_batch']})" if p.get("fits_at_batch") else ""
  return f"{gib:.1f} **DOES NOT FIT**{at}"


def table(rows):
  """Markdown: one row per (preset, slice), one column per program (GiB per chip, fits or not),
  then the projection."""
  names = []
  for _, _, rep in rows:
    for p in rep["programs"]:
      if p["program"] not in names:
        names.append(p["program"])
  short = {"train step": "train step", "distill step": "distill step",
           "eval bits/dim": "eval bits/dim", "sample grid (end of run)": "sample grid",
           "sample / fid sampler (export)": "sample/fid sampler, 1 chip, batch 64",
           "fid Inception-v3 features": "fid Inception-v3, 1 chip",
           "fid image preprocessing": "fid preprocessing"}
  head = ["preset", "slice (chips, HBM GiB)"] + [short.get(n, n) for n in names] + [
      "step at 40% MFU", "320 epochs: days, chip-hours, list price"]
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for preset, s, rep in rows:
    by = {p["program"]: p for p in rep["programs"]}
    pr = rep["projection"]
    cells = [preset, f"{s.name} ({s.devices_total}, {s.chip.hbm_bytes / 2 ** 30:.2f})"]
    cells += [_cell(by[n]) if n in by else "" for n in names]
    cells += [f"{pr['step_seconds']:.2f} s",
              f"{pr['hours'] / 24:.1f} d, {pr['chip_hours']:,.0f}, ${pr['cost']:,.0f}"]
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)


if __name__ == "__main__":
  main()
