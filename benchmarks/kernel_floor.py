"""How much of each side's train step (benchmarks/vs_torch.py's workloads) its GEMMs and its
attention take, each measured alone at the step's shapes, in one process: the step time that a
speed target against PyTorch leaves for everything else.

  python benchmarks/kernel_floor.py [--workloads train32,train64] [--rounds 8] [--threads 1]

Per workload, one process runs these side by side, round by round (on a virtual machine the speed
can move by 1.4x from one process to the next, so nothing here compares two processes):

  * step: vs_torch.py's train step on each side (same weights, batch and AdamW; the JAX side with
    vs_torch's CPU execution choices). Both first-step losses are printed; they must agree to
    vs_torch.LOSS_TOL, else the script exits 1 after its report.
  * GEMMs: every linear layer's three products at the step's shapes, R = batch x tokens rows:
    forward X W, input gradient dY W^T, weight gradient X^T dY; per AF block proj_in (d -> W)
    and proj_out (W -> 2d), per layer qkv (W -> 3W), proj (W -> W), fc1 (W -> 4W) and fc2
    (4W -> W) (block 0's proj_in input gradient, which no step computes, included). JAX: one
    jitted program of these dots, each in the library XLA:CPU picks for it (YNNPACK; Eigen for
    a transposed left operand, the weight gradient's); torch: ``torch.mm`` on the same arrays
    (its BLAS, MKL in the x86 wheels).
  * attention: per layer, causal self-attention over (batch, heads, N, head dim) and its
    gradients. JAX: ``farmer_jax.nn.transformer.attend`` with the step's choices (einsum, query
    chunks of ``flow_attn_chunk``); torch: ``scaled_dot_product_attention`` with the reference
    module's boolean causal mask (its fused CPU kernel), and ``torch.autograd.grad``.
  * rest = step - GEMMs - attention: LayerNorm, GELU, bias and residual adds, the q/k/v split
    and the heads' transposes, the loss, the optimizer, dispatch. It is a difference of medians,
    as noisy as the step.

Then, for ``--target`` (default 1.25: JAX's train step at 1.25x PyTorch eager's speed, the
project's CPU target): the JAX step time it allows (torch step / target), what JAX's GEMMs alone
leave of it for attention and the rest, and the speed-up that no other work at all would give,
with JAX's kernels and at PyTorch's.

The process gets what the ``farmer_jax`` command applies at start (``cli.start_process``): its
malloc mode applies to the whole process, so to PyTorch's side as well (vs_torch.py gives each
side its own defaults). ``--threads N`` (default 1): the process keeps to the first N CPUs it may
use, before jax and torch start their thread pools, and torch uses N threads. With N > 1 both
frameworks' pools share the CPUs in one process, and PyTorch's OpenMP threads spin after each op
while XLA's run, which slows both: one core is the clean comparison (vs_torch.py runs each side
in its own process for the speeds themselves). Prints only.
"""
import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import vs_torch  # noqa: E402  (the workloads, the steps and the CPU header, in one place)


def linear_shapes(hp):
  """(in, out) of every linear layer of the AF for vs_torch's hyper-parameters ``hp``."""
  w, d = hp["channels"], hp["in_channels"] * hp["patch_size"] ** 2
  layer = [(w, 3 * w), (w, w), (w, 4 * w), (4 * w, w)]
  return ([(d, w), (w, 2 * d)] + layer * hp["layers_per_block"]) * hp["num_blocks"]


def build(name):
  """Workload ``name``'s timed functions, {(side, part): fn of no arguments}, and its token rows
  (batch x tokens)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from farmer_jax.nn.transformer import attend

  _, size, batch = vs_torch.WORKLOADS[name]
  hp = vs_torch.hparams(size)
  ref, x = vs_torch.reference_and_batch(name)
  state = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  mcfg, params = vs_torch.jax_model(size, state)
  fns = {("jax", "step"): vs_torch.jax_train_step(mcfg, params, x),
         ("torch", "step"): vs_torch.torch_train_step(ref, lambda m, xb: m(xb), x)}

  rng = np.random.default_rng(vs_torch.SEED)
  f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  rows = batch * mcfg.num_tokens
  shapes = linear_shapes(hp)
  xs = [f32(rows, k) for k, _ in shapes]
  ws = [f32(k, n) for k, n in shapes]
  dys = [f32(rows, n) for _, n in shapes]

  def jax_gemms(xs, ws, dys):             # arguments, not constants: XLA folds no product away
    return [(x_ @ w, dy @ w.T, x_.T @ dy) for x_, w, dy in zip(xs, ws, dys)]

  gemms = jax.jit(jax_gemms)
  jx, jw, jdy = ([jnp.asarray(a) for a in arrays] for arrays in (xs, ws, dys))
  tx, tdy = ([torch.from_numpy(a) for a in arrays] for arrays in (xs, dys))
  tw = [torch.from_numpy(w.T.copy()) for w in ws]            # nn.Linear's (out, in) weight

  def torch_gemms():                       # nn.Linear's forward and its autograd's products
    return [(x_.mm(w.t()), dy.mm(w), dy.t().mm(x_)) for x_, w, dy in zip(tx, tw, tdy)]

  fns[("jax", "gemms")] = lambda: gemms(jx, jw, jdy)
  fns[("torch", "gemms")] = torch_gemms

  heads, n = mcfg.flow_heads, mcfg.num_tokens
  head_dim = mcfg.flow_width // heads
  layers = hp["num_blocks"] * hp["layers_per_block"]
  qkvg = [[f32(batch, heads, n, head_dim) for _ in range(4)] for _ in range(layers)]
  scale = head_dim ** -0.5

  def jax_attention(qkvg):
    out = []
    for q, k, v, g in qkvg:
      o, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, scale, True, mcfg.flow_attn_chunk,
                                              None, mcfg.attention), q, k, v)
      out.append((o, vjp(g)))
    return out

  attention = jax.jit(jax_attention)
  jq = [[jnp.asarray(a) for a in layer] for layer in qkvg]
  tq = [[torch.from_numpy(a).requires_grad_(i < 3) for i, a in enumerate(layer)]
        for layer in qkvg]
  mask = torch.tril(torch.ones(n, n)).bool()

  def torch_attention():
    out = []
    for q, k, v, g in tq:
      o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
      out.append((o, torch.autograd.grad(o, (q, k, v), g)))
    return out

  fns[("jax", "attention")] = lambda: attention(jq)
  fns[("torch", "attention")] = torch_attention
  return fns, rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workloads", default="train32,train64",
                  help="comma-separated, of vs_torch.py's train workloads (train32, train64)")
  ap.add_argument("--rounds", type=int, default=8, help="timed rounds (median), after 3 untimed")
  ap.add_argument("--calls", type=int, default=2, help="calls of each function per round")
  ap.add_argument("--threads", type=int, default=1,
                  help="CPUs the process keeps to, and torch's thread count")
  ap.add_argument("--target", type=float, default=1.25,
                  help="the speed target, JAX's step as a multiple of PyTorch's")
  a = ap.parse_args()
  names = [w.strip() for w in a.workloads.split(",") if w.strip()]
  bad = [w for w in names if vs_torch.WORKLOADS.get(w, ("",))[0] != "train"]
  if bad or not names:
    ap.error(f"--workloads: {bad or names} are not train workloads; choose from train32, train64")
  usable = sorted(os.sched_getaffinity(0))
  if not 1 <= a.threads <= len(usable) or min(a.rounds, a.calls) < 1 or a.target <= 0:
    ap.error(f"--threads={a.threads} --rounds={a.rounds} --calls={a.calls} --target={a.target}: "
             f"--threads must be 1..{len(usable)} (this process may use {len(usable)} CPUs), "
             "--rounds and --calls >= 1, --target > 0")
  os.sched_setaffinity(0, usable[:a.threads])   # before either framework starts its threads
  from farmer_jax.cli import start_process
  malloc, cpu_spin = start_process()
  import jax
  import torch
  torch.set_num_threads(a.threads)
  print(vs_torch.cpu_line())
  print(f"one process on {a.threads} CPU(s) {usable[:a.threads]}: jax {jax.__version__} "
        f"(XLA:CPU, malloc {malloc}, idle CPUs {cpu_spin}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); load average at start {vs_torch.loadavg()}")
  print(f"per round each function runs {a.calls}x in turn; the median of {a.rounds} rounds, "
        "ms per call")

  def timed(fn):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0

  agree = True
  for name in names:
    fns, rows = build(name)
    loss_j, loss_t = float(fns[("jax", "step")]()), fns[("torch", "step")]()   # the first compiles
    agree &= abs(loss_j - loss_t) <= vs_torch.LOSS_TOL
    for _ in range(3):
      for fn in fns.values():
        timed(fn)
    times = {key: [] for key in fns}
    for _ in range(a.rounds):
      for key, fn in fns.items():
        times[key].append(sum(timed(fn) for _ in range(a.calls)) / a.calls * 1e3)
    med = {key: statistics.median(v) for key, v in times.items()}
    _, size, batch = vs_torch.WORKLOADS[name]
    print(f"\n== {name}: {size}x{size}, batch {batch}, {rows} token rows; first-step loss "
          f"{loss_j:.6f} / {loss_t:.6f} (|diff| {abs(loss_j - loss_t):.1e})")
    print(f"{'':<11} {'JAX ms':>14} {'PyTorch ms':>14} {'torch/JAX':>9}")
    for part in ("step", "gemms", "attention"):
      j, t = med[("jax", part)], med[("torch", part)]
      spread = lambda side: f"{min(times[(side, part)]):.0f}..{max(times[(side, part)]):.0f}"
      print(f"{part:<11} {j:>6.1f} {spread('jax'):>7} {t:>6.1f} {spread('torch'):>7} "
            f"{t / j:>9.2f}")
    rest = {s: med[(s, "step")] - med[(s, "gemms")] - med[(s, "attention")]
            for s in ("jax", "torch")}
    print(f"{'rest':<11} {rest['jax']:>6.1f} {'':>7} {rest['torch']:>6.1f}")
    torch_step = med[("torch", "step")]
    goal = torch_step / a.target
    left = goal - med[("jax", "gemms")]
    after = {s: med[(s, "attention")] + rest[s] for s in ("jax", "torch")}
    print(f"{a.target}x PyTorch's speed: a JAX step of {goal:.1f} ms. JAX's GEMMs alone take "
          f"{med[('jax', 'gemms')]:.1f} ms of it ({100 * med[('jax', 'gemms')] / goal:.0f}%), "
          f"leaving {left:.1f} ms for attention and the rest, which take {after['jax']:.1f} ms "
          f"in JAX's step and {after['torch']:.1f} in PyTorch's.")
    kernels = {s: med[(s, "gemms")] + med[(s, "attention")] for s in ("jax", "torch")}
    print(f"With no other work at all: {torch_step / kernels['jax']:.2f}x with JAX's GEMMs and "
          f"attention, {torch_step / kernels['torch']:.2f}x at PyTorch's kernel speeds.",
          flush=True)
  print(f"\nload average at end: {vs_torch.loadavg()}")
  if not agree:
    print(f"the two steps' first losses differ by more than {vs_torch.LOSS_TOL}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
