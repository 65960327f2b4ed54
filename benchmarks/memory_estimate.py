"""Per-device train-state memory for the paper presets on a given mesh, from jax.eval_shape (nothing
allocated).

  python benchmarks/memory_estimate.py                       # the table in docs/scaling.md
  python benchmarks/memory_estimate.py --preset=1.9B/8 --devices=64 --fsdp=64

Counts params (fp32), AdamW moments (2x fp32, sharded like the params) and optionally EMA params,
sharded with the project's own rules (logical rules + FSDP on the largest divisible dim of
params >= config.fsdp.min_params). Activations are not included: they depend on batch, remat policy
and the compiler; measure them with ``jax.jit(step).lower(...).compile().memory_analysis()`` on the
target device.
"""

import argparse

import jax
import numpy as np

from farmer_jax import configlib
from farmer_jax.config.parse import parse_model
from farmer_jax.model import abstract_params
from farmer_jax.sharding import fsdp_spec

GIB = 2 ** 30
# v5p-64: `dp=8`, the mesh docs/performance.md's reading of the compiled 1.1B/16 step recommends
SETUPS = [("8xH100", 8, 8), ("v5p-64 (32 chips), `dp=8`", 32, 4),
          ("v4-64 or v5p-64, the presets' default (pure FSDP)", 32, 32)]


def state_bytes_per_device(preset, fsdp, ema=False):
  c = configlib.load("imagenet256:" + preset)
  # The config's logical rules map only activations (batch); params are sharded by the FSDP pass
  # alone.
  shapes = abstract_params(parse_model(c))
  total = per_dev = 0
  for a in jax.tree.leaves(shapes):
    n = int(np.prod(a.shape))
    spec = fsdp_spec(a.shape, jax.sharding.PartitionSpec(*[None] * len(a.shape)), "fsdp", fsdp,
                     c.fsdp.min_params)
    shards = fsdp if "fsdp" in [e for e in spec if e] else 1
    total += n
    per_dev += n / shards
  copies = 3 + (1 if ema else 0)             # params + Adam mu + nu (+ EMA), all fp32
  return total, per_dev * 4 * copies


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default=None)
  ap.add_argument("--devices", type=int, default=None)
  ap.add_argument("--fsdp", type=int, default=None)
  ap.add_argument("--ema", action="store_true")
  a = ap.parse_args()
  presets = [a.preset] if a.preset else ["1.1B/16", "1.1B/8", "1.9B/16", "1.9B/8"]
  setups = [(f"{a.devices} devices", a.devices, a.fsdp or a.devices)] if a.devices else SETUPS
  print("| preset | params | setup | mesh | state/device (params+Adam" + ("+EMA" if a.ema else "") +
        ", fp32) |")
  print("|---|---|---|---|---|")
  for p in presets:
    for name, ndev, fsdp in setups:
      total, b = state_bytes_per_device(p, fsdp, a.ema)
      print(
          f"| {p} | {total / 1e9:.3f}B | {name} | data={ndev // fsdp} x fsdp={fsdp} | "
          f"{b / GIB:.2f} GiB |"
      )
    _, rep = state_bytes_per_device(p, 1, a.ema)
    print(f"| {p} | | replicated (no FSDP) | data=N | {rep / GIB:.2f} GiB |")


if __name__ == "__main__":
  main()
