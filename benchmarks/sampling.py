"""Sampling cost split as the paper's Table 5: AR decode time vs AF inverse time per image, side by
side.

  python benchmarks/sampling.py                      # quickstart model shape, random weights,
                                                     # batch 64
  python benchmarks/sampling.py --model=/tmp/model   # an exported model (farmer_jax export)
  python benchmarks/sampling.py --guidance=none

Both stages are jit-compiled once, then timed over --repeats runs (median). Weights do not change
the cost.
"""

import argparse
import time

# keep freed heap memory (farmer_jax/host_memory.py; FARMER_JAX_MALLOC=system for glibc's
# defaults), set before jax or torch start their threads
from farmer_jax import host_memory  # noqa: E402
MALLOC = host_memory.configure()

import jax
import jax.numpy as jnp
import numpy as np

from farmer_jax import configlib
from farmer_jax.config.parse import parse
from farmer_jax.config.schema import ResamplingCFG, SamplerConfig
from farmer_jax.model import decode_latents, init_params
from farmer_jax.sampling.sampler import sample_keys, sample_latents


def timed(fn, *args, repeats=3):
  jax.block_until_ready(fn(*args))            # compile
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default=None)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--guidance", default="resampling", choices=["none", "resampling", "naive"])
  ap.add_argument("--cfg", type=float, default=2.0)
  ap.add_argument("--repeats", type=int, default=3)
  a = ap.parse_args()
  if a.model:
    from farmer_jax.artifacts.export import load_model
    mcfg, params, _, _ = load_model(a.model)
  else:
    mcfg = parse(configlib.load("quickstart")).model
    params = jax.jit(lambda rng: init_params(mcfg, rng))(jax.random.key(0))
  s = SamplerConfig(
      guidance=a.guidance, cfg=ResamplingCFG(w=a.cfg if a.guidance != "none" else 0.0))
  y = jnp.arange(a.batch, dtype=jnp.int32) % max(mcfg.num_classes, 1)
  keys = sample_keys(0, 0, a.batch)
  ar = jax.jit(lambda p, k, y: sample_latents(mcfg, p, k, y, s))
  af = jax.jit(lambda p, z, y: decode_latents(mcfg, p, z, y)[0])
  z = ar(params, keys, y)
  t_ar = timed(ar, params, keys, y, repeats=a.repeats) / a.batch
  t_af = timed(af, params, z, y, repeats=a.repeats) / a.batch
  tot = t_ar + t_af
  print(
      f"device: {jax.devices()[0].platform}, batch {a.batch}, N={mcfg.num_tokens} tokens, "
      f"d={mcfg.token_dim}, AF {mcfg.flow_blocks}x{mcfg.flow_layers}x{mcfg.flow_width}, "
      f"AR {mcfg.ar_depth}x{mcfg.ar_width}, guidance={a.guidance}")
  print(f"AR decode   {t_ar * 1e3:8.3f} ms/img ({100 * t_ar / tot:5.1f}%)")
  print(f"AF inverse  {t_af * 1e3:8.3f} ms/img ({100 * t_af / tot:5.1f}%)")
  print(
      f"total       {tot * 1e3:8.3f} ms/img   "
      "(paper Table 5, 1.1B-class on GPU: AR 50.0 ms, AF 168.9 ms)"
  )


if __name__ == "__main__":
  main()
