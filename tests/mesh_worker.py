"""Run by tests/test_sharding.py in a subprocess with 8 fake CPU devices (never imported by pytest
directly).

For each mesh it builds the real Trainer on the reduced quickstart, takes ONE train step on the same
global batch, and prints a JSON report: loss, grad norm, params (as npz path), param shardings and
compiled memory.
"""

import json
import os
import sys

import jax
import numpy as np

from farmer_jax import configlib  # noqa: E402
from farmer_jax.config.parse import parse  # noqa: E402
from farmer_jax.train.trainer import start  # noqa: E402

MESHES = {
    "single": ((("data", 1), ("fsdp", 1)), 1),
    "data8": ((("data", 8), ("fsdp", 1)), 8),
    "data4_fsdp2": ((("data", 4), ("fsdp", 2)), 8),
    "fsdp8": ((("data", 1), ("fsdp", 8)), 8),
}


def run(name, out_dir, min_params):
  spec, ndev = MESHES[name]
  c = configlib.load("quickstart:tiny")
  c.mesh = spec
  c.fsdp.min_params = min_params
  c.train.update(batch_size=16, warmup_steps=0)
  workdir = os.path.join(out_dir, "unused_workdir")
  tr = start(parse(c, workdir, num_devices=ndev), workdir, quiet=True, devices=jax.devices()[:ndev])
  batch = next(tr.input)   # global batch 0, already a global array on the mesh
  with tr.mesh_context():
    compiled = tr.train_step.lower(tr.state, batch, tr.rng).compile()
    state, m = tr.train_step(tr.state, batch, tr.rng)
  mem = compiled.memory_analysis()
  params = jax.device_get(state["params"])
  flat = {
      jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)
  }
  np.savez(os.path.join(out_dir, f"{name}.npz"), **flat)
  shard = {jax.tree_util.keystr(k): [str(a.sharding.spec), list(a.addressable_shards[0].data.shape)]
           for k, a in jax.tree_util.tree_leaves_with_path(state["params"])}
  return {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
          "shardings": shard, "argument_bytes": int(mem.argument_size_in_bytes),
          "output_bytes": int(mem.output_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes)}


if __name__ == "__main__":
  out_dir, min_params = sys.argv[1], int(sys.argv[2])
  assert jax.device_count() == 8, jax.devices()
  report = {name: run(name, out_dir, min_params) for name in MESHES}
  print("REPORT " + json.dumps(report))
