"""Train-step throughput, achieved FLOP/s and MFU, and compiled memory per remat policy.

  python benchmarks/train_step.py [--configs quickstart,mid256,1.1B/16] [--steps 5] [--batch N]
      [--dtype bfloat16] [--remat none,nothing_saveable,dots_saveable] [--memory_only]

For each config: the real pretraining step (``train.step.make_train_step``: forward, exact NLL,
backward, guarded AdamW update; jitted, state donated) on random uint8 images, timed over
``--steps`` steps after three warm-up steps (the first compiles); FLOPs from the analytic count
(``farmer_jax.flops``, matmuls only, 3x forward) -> FLOP/s -> MFU against the device's peak:

* accelerators: the dense bf16 peak of the chip (``PEAKS``; fp32 matmuls on GPUs run as TF32 at
  half that);
* CPU: the fp32 matmul peak MEASURED in the same run (a jitted 2048^2 matmul, best of several),
  i.e. the fraction of what this CPU's matmul units deliver to XLA.

Then, per remat policy, the compiled step's per-device memory (``compiled.memory_analysis()``:
arguments + temporaries; the state is donated, so outputs alias the arguments). The policies are
``model.remat=False`` ('none') and ``model.remat=True`` with ``model.remat_policy``.

Configs: ``quickstart`` (the quickstart config, batch 32), ``mid256`` (256x256x3, patch 16, N = 256,
d = 768, AF 4 blocks x 2 layers x 512, AR 4 x 512; batch 8), ``1.1B/16`` (imagenet256,
the paper's FARMER-1.1B; batch 1 on CPU, 16 on an accelerator unless --batch). Prints a table;
asserts nothing. The malloc mode (``farmer_jax/host_memory.py``, ``FARMER_JAX_MALLOC``) is set first
and printed.
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time

# keep freed heap memory (farmer_jax/host_memory.py; FARMER_JAX_MALLOC=system for glibc's
# defaults), set before jax or torch start their threads
from farmer_jax import host_memory  # noqa: E402
MALLOC = host_memory.configure()

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from farmer_jax import configlib, flops  # noqa: E402
from farmer_jax.config.schema import REMAT_POLICIES, TrainConfig  # noqa: E402
from farmer_jax.config.parse import parse_model  # noqa: E402
from farmer_jax.model import Farmer  # noqa: E402
from farmer_jax.train.optim import make_optimizer  # noqa: E402
from farmer_jax.train.state import init_state  # noqa: E402
from farmer_jax.train.step import make_train_step  # noqa: E402

# dense bf16 peak FLOP/s per chip (vendor figures, no sparsity)
PEAKS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "A100": 312e12, "H100": 989e12, "H200": 989e12,
}


def device_peak(device):
  """(peak FLOP/s, what it is) of an accelerator from its device_kind, or (None, reason)."""
  kind = device.device_kind
  for name, peak in sorted(PEAKS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return peak, f"{name} dense bf16 peak"
  return None, f"unknown device kind {kind!r}"


def cpu_matmul_peak(n=2048, reps=7):
  """Measured fp32 matmul FLOP/s of this CPU under XLA (best of ``reps``)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def config_for(name, dtype, on_cpu):
  """(run config, default batch)."""
  if name == "quickstart":
    c, batch = configlib.load("quickstart"), 32
  elif name == "mid256":
    c = configlib.load("quickstart")
    c.data.update(image_size=256, channels=3, num_classes=1000)
    c.model.update(patch_size=16, flow_blocks=4, flow_layers=2, flow_width=512, flow_heads=8,
                   ar_depth=4, ar_width=512, ar_heads=8, class_repeats=16, d_informative=128,
                   mixtures_informative=32, mixtures_redundant=64)
    batch = 8
  elif name in ("1.1B/16", "1.1B/8", "1.9B/16", "1.9B/8"):
    c, batch = configlib.load(f"imagenet256:{name}"), (1 if on_cpu else 16)
  else:
    raise SystemExit(f"unknown config {name!r}; use quickstart, mid256, 1.1B/16, ...")
  if dtype:
    c.model.dtype = dtype
  return c, batch


def build(config, batch, remat=None):
  """(jitted step, state, batch, rng) of the config; ``remat``: None (the config's) or a policy
  name ('none' or REMAT_POLICIES)."""
  if remat is not None:
    config.model.remat = remat != "none"
    if remat != "none":
      config.model.remat_policy = remat
  m = parse_model(config)
  t = dataclasses.replace(TrainConfig.from_section(config.train), batch_size=batch)
  tx, lr_fn = make_optimizer(t)
  step = jax.jit(make_train_step(Farmer(m), m, t, tx, lr_fn), donate_argnums=(0,))
  rng = np.random.default_rng(0)
  data = {"image": jnp.asarray(rng.integers(0, 256, (batch, m.image_size, m.image_size,
                                                     m.channels), np.uint8)),
          "label": jnp.asarray(rng.integers(0, max(m.num_classes, 1), (batch,), np.int32))}
  return m, step, (lambda: init_state(m, tx, jax.random.key(0))), data


def time_steps(step, make_state, data, steps):
  state = make_state()
  key = jax.random.key(1)
  t0 = time.perf_counter()
  state, metrics = step(state, data, key)
  jax.block_until_ready(metrics["loss"])
  compile_s = time.perf_counter() - t0
  for _ in range(2):  # steady state: with host_memory's 'keep' the heap grows over the first steps
    state, metrics = step(state, data, key)
  jax.block_until_ready(metrics["loss"])
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = step(state, data, key)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t)
  return statistics.median(times), compile_s, float(metrics["loss"])


def memory(config, batch, remat):
  m, step, make_state, data = build(config, batch, remat)
  state = jax.eval_shape(make_state)
  lowered = step.lower(state, data, jax.random.key(1))
  ma = lowered.compile().memory_analysis()
  if ma is None:
    return None
  return ma.argument_size_in_bytes, ma.temp_size_in_bytes


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--configs", default=None)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--batch", type=int, default=None)
  ap.add_argument("--dtype", default=None, help="model.dtype (default: float32 on CPU, "
                  "bfloat16 on accelerators)")
  ap.add_argument("--remat", default="none," + ",".join(REMAT_POLICIES))
  ap.add_argument("--memory_only", action="store_true")
  a = ap.parse_args()
  dev = jax.devices()[0]
  on_cpu = dev.platform == "cpu"
  dtype = a.dtype or ("float32" if on_cpu else "bfloat16")
  names = (a.configs or ("quickstart,mid256" if on_cpu else "quickstart,mid256,1.1B/16")).split(",")
  if on_cpu:
    peak, peak_what = cpu_matmul_peak(), "measured fp32 matmul peak of this CPU (XLA)"
  else:
    peak, peak_what = device_peak(dev)
  print(f"device: {dev.device_kind} ({dev.platform}), {jax.device_count()} device(s); dtype "
        f"{dtype}; peak {peak / 1e12 if peak else float('nan'):.3f} TFLOP/s ({peak_what}); "
        f"malloc {MALLOC}")
  rows = []
  for name in names:
    config, batch = config_for(name, dtype, on_cpu)
    batch = a.batch or batch
    m = parse_model(config)
    fpi = flops.flops_per_image(m)
    row = dict(config=name, batch=batch, gflop_per_image=fpi / 1e9)
    if not a.memory_only:
      _, step, make_state, data = build(config, batch)
      sec, compile_s, loss = time_steps(step, make_state, data, a.steps)
      achieved = fpi * batch / sec
      row.update(step_s=sec, img_s=batch / sec, tflops=achieved / 1e12,
                 mfu=achieved / peak if peak else float("nan"), compile_s=compile_s, loss=loss)
      print(f"{name:>10} batch {batch:>3}: {sec * 1e3:8.1f} ms/step, {batch / sec:8.2f} img/s, "
            f"{achieved / 1e12:7.3f} TFLOP/s, MFU {row['mfu']:.1%} (compile {compile_s:.1f} s, "
            f"loss {loss:.4f}, {fpi / 1e9:.2f} GFLOP/img)", flush=True)
    for policy in a.remat.split(","):
      mem = memory(config_for(name, dtype, on_cpu)[0], batch, policy)
      if mem is None:
        print(f"{'':>10} remat {policy}: memory_analysis unavailable on this backend")
        continue
      args, temps = mem
      row[f"mem_{policy}"] = (args + temps) / 2 ** 30
      print(f"{'':>10} remat {policy:>17}: arguments {args / 2 ** 30:7.3f} GiB + temporaries "
            f"{temps / 2 ** 30:7.3f} GiB per device", flush=True)
    rows.append(row)
  return rows


if __name__ == "__main__":
  main()
