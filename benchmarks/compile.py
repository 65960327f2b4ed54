"""Train-step compile time vs AF depth: nn.scan over blocks and layers keeps it flat.

  python benchmarks/compile.py [--width 64] [--blocks 4,28]

Prints lower+compile seconds of the full jitted train step (forward, backward, AdamW) at each depth,
measured side by side in one process, and the ratio deepest/shallowest (target <= 1.5).
"""

import argparse
import time

import jax
import jax.numpy as jnp

from farmer_jax import configlib
from farmer_jax.config.parse import parse
from farmer_jax.model import Farmer
from farmer_jax.train.optim import make_optimizer
from farmer_jax.train.state import abstract_state
from farmer_jax.train.step import make_train_step


def compile_seconds(blocks, width, batch):
  c = configlib.load("quickstart")
  c.model.update(flow_blocks=blocks, flow_width=width)
  run = parse(c)
  m, t = run.model, run.train
  tx, lr = make_optimizer(t)
  state = abstract_state(m, tx, ema=t.ema_decay > 0)
  batch_s = {"image": jax.ShapeDtypeStruct((batch, m.image_size, m.image_size, m.channels),
                                           jnp.uint8),
             "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  step = jax.jit(make_train_step(Farmer(m), m, t, tx, lr), donate_argnums=(0,))
  t0 = time.perf_counter()
  step.lower(state, batch_s, jax.random.key(0)).compile()
  return time.perf_counter() - t0


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--width", type=int, default=64)
  ap.add_argument("--blocks", default="4,28")
  ap.add_argument("--batch", type=int, default=8)
  a = ap.parse_args()
  depths = [int(b) for b in a.blocks.split(",")]
  compile_seconds(2, a.width, a.batch)  # warm up jax/XLA once so the first depth is not penalised
  times = {d: compile_seconds(d, a.width, a.batch) for d in depths}
  for d, t in times.items():
    print(f"AF blocks {d:3d}: train-step compile {t:6.2f} s")
  ratio = times[depths[-1]] / times[depths[0]]
  print(
      f"ratio {depths[-1]}/{depths[0]} blocks: {ratio:.2f} (target <= 1.5) -> "
      f"{'OK' if ratio <= 1.5 else 'FAIL'}"
  )


if __name__ == "__main__":
  main()
