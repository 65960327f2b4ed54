"""Run by tests/test_eval.py in a subprocess with 8 fake CPU devices (never imported by pytest).

argv: OUT_DIR EXPORT_DIR. Writes OUT_DIR/per_example.npz: the sharded eval loop's per-example
log-densities on a 13-image split (global batch 8 over 8 devices, the last batch padded; K = 2
draws), and OUT_DIR/cli.json: `farmer_jax eval --model=EXPORT --batch=48` on the 500 MNIST test
images through the command's own driver.
"""

import os
import sys

import jax
import numpy as np

from farmer_jax import cli, sharding
from farmer_jax.data.pipeline import padded_batches
from farmer_jax.data.sources import ArraySource
from farmer_jax.eval.likelihood import evaluate_batches
from farmer_jax.model import Farmer

sys.path.insert(0, os.path.dirname(__file__))
from conftest import TINY, init_farmer  # noqa: E402


def main(out_dir, export_dir):
  assert jax.device_count() == 8, jax.devices()
  model, params = init_farmer(TINY)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (13, 8, 8, 1), dtype=np.uint8)
  labels = rng.integers(0, 3, 13).astype(np.int32)
  mesh = sharding.make_mesh((("data", -1),))
  rules = (("batch", "data"),)
  batch_sh = sharding.batch_sharding(mesh, rules)
  batches, steps = padded_batches(ArraySource(images, labels), 8)
  with jax.set_mesh(mesh):
    res = evaluate_batches(Farmer(TINY), jax.device_put(params, sharding.replicated(mesh)),
                           batches, steps, put=lambda b: sharding.global_batch(b, mesh, batch_sh),
                           seed=3, samples=2, out_sharding=sharding.replicated(mesh),
                           per_example=True)
  np.savez(os.path.join(out_dir, "per_example.npz"), bpd=res["bpd"],
           bpd_uncond=res["bpd_uncond"], **res["per_example"])
  fv = cli.flag_values("eval")
  fv(["farmer_jax eval", f"--model={export_dir}", "--batch=48",
      f"--out={os.path.join(out_dir, 'cli.json')}"])
  cli.COMMANDS["eval"].main(fv)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
