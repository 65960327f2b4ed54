"""The three AF inverses side by side: sequential (exact), Jacobi (parallel fixed point) and the
distilled one-step student, plus the end-to-end sampling split of paper Table 5.

  python benchmarks/inverse.py [--batch 16] [--teacher RUN --student DISTILL_RUN --png out.png]

1. Per-image time of each inverse at N = 64 and N = 256 tokens (the quickstart's AF widths and
   depth, d = 16; images 32x32 and 64x64), with the Jacobi iteration counts at tol 1e-3 and 1e-4
   and each inverse's largest error against the exact one. Params: a perturbed random init (the
   timings do not depend on training; the student's error does, so it is reported only for a
   real distilled student, step 3).
2. The sampling split (AR decode, AF inverse, total per image) for each inverse at N = 64.
3. With --teacher (a quickstart run) and --student (its `farmer_jax distill` run): the student's
   and Jacobi's reconstruction error on real samples and a PNG grid, rows exact / student /
   Jacobi, for the same latents.
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

from farmer_jax.config.schema import ModelConfig, SamplerConfig
from farmer_jax.distill.student import student_decode
from farmer_jax.model import Farmer, decode_latents, init_params
from farmer_jax.sampling.sampler import sample_keys, sample_latents


def timed(fn, *args, repeats=3):
  jax.block_until_ready(fn(*args))          # compile
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def perturbed(cfg, seed=0, scale=0.02):
  p = init_params(cfg, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [a + scale * jax.random.normal(k, a.shape)
                                   for a, k in zip(leaves, keys)])


def config(image_size):
  return ModelConfig(image_size=image_size, channels=1, patch_size=4, num_classes=10,
                     flow_blocks=4, flow_layers=1, flow_width=64, flow_heads=2, ar_width=64,
                     ar_depth=2, ar_heads=2, class_repeats=4, d_informative=4,
                     mixtures_informative=16, mixtures_redundant=16)


def inverses(cfg, params, z, y, batch):
  """{name: (seconds per image, images, Jacobi iterations or None)}."""
  out = {}
  exact = jax.jit(lambda p, z, y: decode_latents(cfg, p, z, y)[0])
  out["sequential (exact)"] = (timed(exact, params, z, y) / batch, exact(params, z, y), None)
  for tol in (1e-3, 1e-4):
    jac = jax.jit(lambda p, z, y, tol=tol: decode_latents(cfg, p, z, y, "jacobi", tol, 0))
    x, iters = jac(params, z, y)
    out[f"Jacobi tol {tol:g}"] = (timed(jac, params, z, y) / batch, x, np.asarray(iters))
  stu = jax.jit(lambda sp, z, y: student_decode(cfg, sp, z, y))
  out["student (one pass per block)"] = (timed(stu, params["flow"], z, y) / batch,
                                         stu(params["flow"], z, y), None)
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--teacher")
  ap.add_argument("--student")
  ap.add_argument("--png", default="inverse_grid.png")
  a = ap.parse_args()
  b = a.batch
  print(f"device: {jax.devices()[0].device_kind}; batch {b}; times are per image (best of 3)")
  for size in (32, 64):
    cfg = config(size)
    params = perturbed(cfg)
    x = jax.random.uniform(jax.random.key(2), (b, size, size, 1), minval=-1, maxval=1)
    y = jnp.arange(b, dtype=jnp.int32) % 10
    z, _ = Farmer(cfg).apply({"params": params}, x, y, method=Farmer.encode)
    res = inverses(cfg, params, z, y, b)
    base, ref = res["sequential (exact)"][:2]
    print(f"\nN = {cfg.num_tokens} tokens ({size}x{size}, d = {cfg.token_dim}, "
          f"{cfg.flow_blocks} blocks of width {cfg.flow_width})")
    for name, (t, xr, iters) in res.items():
      err = float(jnp.max(jnp.abs(xr - ref)))
      extra = f", iterations per block {iters.tolist()} of {cfg.num_tokens - 1}" \
          if iters is not None else ""
      note = " (undistilled copy: error not meaningful)" if name.startswith("student") else ""
      print(f"  {name:30s} {1e3 * t:8.2f} ms/img  {base / t:6.1f}x  max |x - exact| "
            f"{err:.2e}{note}{extra}")
    if size == 32:   # the sampling split, paper Table 5 style
      keys = sample_keys(0, 0, b)
      ar = jax.jit(lambda p, k, y: sample_latents(cfg, p, k, y, SamplerConfig()))
      t_ar = timed(ar, params, keys, y) / b
      print(f"  sampling split at N = {cfg.num_tokens}: AR decode {1e3 * t_ar:.2f} ms/img")
      for name, (t, _, _) in res.items():
        print(f"    + {name:28s} AF {1e3 * t:7.2f} ms = total {1e3 * (t_ar + t):7.2f} ms/img "
              f"(AF {100 * t / (t_ar + t):.0f}%)")
  if a.teacher and a.student:
    real_models(a)


def real_models(a):
  from farmer_jax.config.parse import parse_model
  from farmer_jax.artifacts.runs import read_saved_config
  from farmer_jax.artifacts.export import latest_run_params
  from farmer_jax.sampling.images import save_grid
  cfg = parse_model(read_saved_config(a.teacher))
  params, _, _ = latest_run_params(a.teacher, say=lambda _: None)
  student, step, _ = latest_run_params(a.student, say=lambda _: None)
  y = jnp.repeat(jnp.arange(10, dtype=jnp.int32), 2)
  z = jax.jit(lambda p, k, y: sample_latents(cfg, p, k, y, SamplerConfig()))(
      params, sample_keys(0, 0, 20), y)
  exact = decode_latents(cfg, params, z, y)[0]
  stu = student_decode(cfg, student, z, y)
  copy = student_decode(cfg, params["flow"], z, y)
  jac, iters = decode_latents(cfg, params, z, y, "jacobi", 1e-3, 0)
  rel = lambda x: float(jnp.sum((x - exact) ** 2) / jnp.sum(exact ** 2))  # noqa: E731
  print(f"\nreal models ({a.teacher}, student step {step}), 20 samples: relative squared error "
        f"vs the exact inverse: student {rel(stu):.3g}, undistilled copy {rel(copy):.3g}, "
        f"Jacobi tol 1e-3 {rel(jac):.3g} ({np.asarray(iters).tolist()} iterations per block)")
  save_grid(np.stack([exact, stu, jac]), a.png)
  print(f"grid (rows: exact, student, Jacobi tol 1e-3) -> {a.png}")


if __name__ == "__main__":
  main()
