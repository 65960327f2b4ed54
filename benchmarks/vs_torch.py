"""JAX (our AutoregressiveFlow) vs PyTorch eager (a re-implementation of TARFlow's Model,
tests/tarflow_reference.py) on the same CPU: same AF config, batch, data and initial weights (the
torch module's, converted with farmer_jax.interop.tarflow), run alternately in one process.

  python benchmarks/vs_torch.py [--rounds 5] [--steps 3] [--quick] [--execution cpu|default|both]

(a) AF-only train step: forward + N(0, I) NLL (TARFlow's get_loss: 0.5*mean(z^2) - log-det per
    dim) + backward + AdamW (lr 1e-4, betas (0.9, 0.95), eps 1e-8, weight decay 1e-4; optax.adamw
    under one jitted, donated step vs torch.optim.AdamW), in images/s;
(b) reverse (sampling: the exact sequential inverse of all blocks, KV-cached on both sides), in
    seconds per image.
At 32x32x3 (patch 4, 64 tokens, batch 32) and 64x64x3 (patch 4, 256 tokens, batch 16); width 128
(2 heads of 64), 4 blocks x 2 layers, unconditional, no final norm (TARFlow's block). Times are
medians over rounds (train steps: after 2 untimed alternating warm-up rounds); the ratio is torch
time / JAX time (> 1: JAX faster). The first two step losses of each side are printed: they must
agree (same weights, data and optimiser). The JAX side runs with the CPU execution choices
(EXECUTION: unrolled, einsum attention; docs/performance.md), ModelConfig's defaults (scan,
jax.nn.dot_product_attention), or both in one run (before/after).
Both sides share the process's malloc mode (farmer_jax/host_memory.py: ``keep`` by default on a
CPU-only install; FARMER_JAX_MALLOC=system for glibc's defaults), printed in the header.
Prints only, asserts nothing.
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time

# torch's OpenMP threads spin-wait by default; on a CPU shared with other processes (or with
# JAX's own thread pool between alternating runs) a spinning thread that gets descheduled stalls
# every parallel region: measured 10-200x slower torch steps on a loaded 2-core machine. Passive
# waiting must be chosen before torch loads OpenMP; set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# keep freed heap memory (farmer_jax/host_memory.py; FARMER_JAX_MALLOC=system for glibc's
# defaults), set before jax or torch start their threads
from farmer_jax import host_memory  # noqa: E402
MALLOC = host_memory.configure()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

from farmer_jax.config.schema import ModelConfig  # noqa: E402
from farmer_jax.flow.autoregressive_flow import AutoregressiveFlow  # noqa: E402
from farmer_jax.flow.patchify import patchify, unpatchify  # noqa: E402
from farmer_jax.interop.tarflow import (config_for_tarflow, patch_permutation,  # noqa: E402
                                        tarflow_to_params)
from farmer_jax.model import make_flow  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from tarflow_reference import TARFlowReference, randomize_  # noqa: E402

THREADS = 2
WARMUP_ROUNDS = 2       # untimed alternating rounds of train steps before the timed ones
LR, BETAS, EPS, WD = 1e-4, (0.9, 0.95), 1e-8, 1e-4
SIZES = ((32, 32), (64, 16))            # (image side, batch)
# the CPU execution choices (ModelConfig; same params and function): unrolled AF blocks and layers,
# einsum attention with 64-token causal query chunks. --execution=default measures the defaults
# (scan, jax.nn.dot_product_attention).
EXECUTION = dict(unroll=True, attention="einsum", flow_attn_chunk=64)


def hparams(size):
  return dict(in_channels=3, img_size=size, patch_size=4, channels=128, num_blocks=4,
              layers_per_block=2, nvp=True, num_classes=0)


def setup(size, batch, seed=0, execution=None):
  """(torch module, torch optimiser, mcfg, jax params, x NCHW torch, x NHWC jax); ``execution``:
  ModelConfig execution fields (default EXECUTION)."""
  hp = hparams(size)
  torch.manual_seed(seed)
  ref = randomize_(TARFlowReference(**hp), seed=seed, out_scale=0.01)
  mcfg = dataclasses.replace(ModelConfig(), **config_for_tarflow(**hp),
                             **(EXECUTION if execution is None else execution))
  params = jax.tree.map(jnp.asarray, tarflow_to_params(
      {k: v.detach().numpy() for k, v in ref.state_dict().items()}, mcfg))
  opt = torch.optim.AdamW(ref.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)
  return ref, opt, mcfg, params, torch.from_numpy(x), jnp.asarray(x.transpose(0, 2, 3, 1))


def jax_train_step(mcfg):
  flow = make_flow(mcfg)
  tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)
  dims = mcfg.num_tokens * mcfg.token_dim

  def loss_fn(p, x):
    z, logdet = flow.apply({"params": p}, patchify(x, mcfg.patch_size))
    return 0.5 * jnp.mean(z ** 2) - jnp.mean(logdet) / dims

  def step(p, o, x):
    loss, g = jax.value_and_grad(loss_fn)(p, x)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  return tx, jax.jit(step, donate_argnums=(0, 1))


def torch_train_step(ref, opt, x):
  opt.zero_grad(set_to_none=True)
  z, logdets = ref(x)
  loss = ref.get_loss(z, logdets)
  loss.backward()
  opt.step()
  return loss.item()


def bench_train(size, batch, rounds, steps, execution=None):
  ref, opt, mcfg, params, x_t, x_j = setup(size, batch, execution=execution)
  tx, step = jax_train_step(mcfg)
  opt_state = tx.init(params)
  losses_j, losses_t = [], []
  for _ in range(2):          # compile / warm up; these are the first two steps of each side
    params, opt_state, loss = step(params, opt_state, x_j)
    losses_j.append(float(loss))
    losses_t.append(torch_train_step(ref, opt, x_t))
  for _ in range(WARMUP_ROUNDS):  # untimed: the heap grows to its steady size over the first steps
    for _ in range(steps):
      params, opt_state, loss = step(params, opt_state, x_j)
    jax.block_until_ready(loss)
    for _ in range(steps):
      torch_train_step(ref, opt, x_t)
  t_j, t_t = [], []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(steps):
      params, opt_state, loss = step(params, opt_state, x_j)
    jax.block_until_ready(loss)
    t_j.append((time.perf_counter() - t0) / steps)
    t0 = time.perf_counter()
    for _ in range(steps):
      torch_train_step(ref, opt, x_t)
    t_t.append((time.perf_counter() - t0) / steps)
  return statistics.median(t_j), statistics.median(t_t), losses_j, losses_t


def bench_reverse(size, batch, rounds, execution=None):
  ref, _, mcfg, params, x_t, _ = setup(size, batch, execution=execution)
  ref.eval()
  flow = make_flow(mcfg)
  inverse = jax.jit(lambda p, z: flow.apply({"params": p}, z,
                                            method=AutoregressiveFlow.inverse))
  with torch.no_grad():
    z_t, _ = ref(x_t)
  z_j = jnp.asarray(z_t.numpy()[..., patch_permutation(mcfg.patch_size, mcfg.channels)])
  x_j = unpatchify(jax.block_until_ready(inverse(params, z_j)), mcfg.patch_size,
                   mcfg.image_size, mcfg.channels)                         # compile
  x_back = ref.reverse(z_t)
  err = float(np.abs(np.asarray(x_j) - x_back.numpy().transpose(0, 2, 3, 1)).max())
  t_j, t_t = [], []
  for _ in range(rounds):
    t0 = time.perf_counter()
    jax.block_until_ready(inverse(params, z_j))
    t_j.append((time.perf_counter() - t0) / batch)
    t0 = time.perf_counter()
    ref.reverse(z_t)
    t_t.append((time.perf_counter() - t0) / batch)
  return statistics.median(t_j), statistics.median(t_t), err


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--rounds", type=int, default=5, help="timed rounds per measurement (median)")
  ap.add_argument("--steps", type=int, default=3, help="train steps per round")
  ap.add_argument("--quick", action="store_true", help="2 rounds of 1 step: a smoke run")
  ap.add_argument("--execution", default="cpu", choices=("cpu", "default", "both"),
                  help="JAX side: the CPU choices (EXECUTION), ModelConfig's defaults (scan, "
                  "dot_product_attention), or both (before/after in one run)")
  a = ap.parse_args()
  runs = {"cpu": [("cpu", EXECUTION)], "default": [("default", {})],
          "both": [("default", {}), ("cpu", EXECUTION)]}[a.execution]
  rounds, steps = (2, 1) if a.quick else (a.rounds, a.steps)
  torch.set_num_threads(THREADS)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPU cores "
        f"visible); torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{rounds} rounds x {steps} steps, medians; "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; malloc {MALLOC} (both sides)")
  print("AF: 3 channels, patch 4, width 128 (2 heads), 4 blocks x 2 layers, unconditional, fp32")
  for name, ex in runs:
    print(f"\n== JAX execution: {name} {ex or '(ModelConfig defaults)'}")
    print("(a) train step (forward + NLL + backward + AdamW), images/s; ratio > 1 = JAX faster")
    print(f"{'image':>8} {'tokens':>6} {'batch':>5} {'jax':>9} {'torch':>9} {'ratio':>6}   "
          f"first-step loss jax / torch (second step)")
    for size, batch in SIZES:
      tj, tt, lj, lt = bench_train(size, batch, rounds, steps, ex)
      print(f"{size:>5}x{size:<2} {(size // 4) ** 2:>6} {batch:>5} {batch / tj:>9.1f} "
            f"{batch / tt:>9.1f} {tt / tj:>6.2f}   {lj[0]:.6f} / {lt[0]:.6f} "
            f"(|diff| {abs(lj[0] - lt[0]):.1e}; {lj[1]:.6f} / {lt[1]:.6f})", flush=True)
    print("(b) reverse (exact sequential inverse, KV cache), ms per image; ratio > 1 = JAX faster")
    print(f"{'image':>8} {'tokens':>6} {'batch':>5} {'jax':>9} {'torch':>9} {'ratio':>6}   "
          f"max |x_jax - x_torch|")
    for size, batch in SIZES:
      tj, tt, err = bench_reverse(size, batch, rounds, ex)
      print(f"{size:>5}x{size:<2} {(size // 4) ** 2:>6} {batch:>5} {1e3 * tj:>9.2f} "
            f"{1e3 * tt:>9.2f} {tt / tj:>6.2f}   {err:.1e}", flush=True)


if __name__ == "__main__":
  main()
