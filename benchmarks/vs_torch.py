"""JAX (our AutoregressiveFlow) vs PyTorch eager (a re-implementation of TARFlow's Model,
tests/tarflow_reference.py) on the same CPU, each framework in its own process with the settings
its users get by default: same AF config, batch, data and initial weights.

  python benchmarks/vs_torch.py [--pairs 3] [--rounds 5] [--steps 3] [--quick]
      [--workloads train32,train64,reverse64,reverse256] [--execution cpu|default|both]
      [--tarflow=DIR]

``--tarflow=DIR``: the PyTorch side runs ``transformer_flow.Model`` from a checkout of
apple/ml-tarflow instead of the reference module (same state_dict keys, same weights).

Workloads: (train32, train64) the AF-only train step at 32x32x3 (batch 32) and 64x64x3 (batch 16):
forward + N(0, I) NLL (TARFlow's get_loss: 0.5*mean(z^2) - log-det per dim) + backward + AdamW
(lr 1e-4, betas (0.9, 0.95), eps 1e-8, weight decay 1e-4; optax.adamw under one jitted, donated
step vs torch.optim.AdamW), in images/s; (reverse64, reverse256) sampling, the exact sequential
inverse of all blocks, KV-cached on both sides, at 64 tokens (32x32, batch 32) and 256 tokens
(64x64, batch 16), in ms per image. Patch 4, width 128 (2 heads of 64), 4 blocks x 2 layers,
unconditional, fp32, no final norm (TARFlow's block).

How it is run. Per workload, an ``init`` process builds the torch module (fixed seed, every
parameter non-trivial: tests/tarflow_reference.py's randomize_), draws the batch with a seeded
numpy generator and, for the reverse, the latents z = forward(batch); it saves them in one .npz
that both sides load (the JAX side converts the state_dict with farmer_jax.interop.tarflow). Then
``--pairs`` pairs of worker processes, one per framework, alternate (jax, torch; torch, jax; ...).
Each worker is a fresh ``python benchmarks/vs_torch.py --worker=jax|torch`` that prints one JSON
line: its first two train-step losses (or its reverse output, saved for the parent to compare)
and the median over ``--rounds`` timed rounds (train: ``--steps`` steps per round, after the
first two steps and 2 untimed rounds; reverse: one call per round after a compile call). The
parent reports, per side, the median over pairs and the spread (min..max), and the ratio of the
medians torch time / JAX time (> 1: JAX faster). It checks that both sides' first-step losses
agree to LOSS_TOL (second step: LOSS2_TOL) and the reverse outputs to REVERSE_TOL, and exits 1
when they do not.

What each side gets:
  * torch: nothing set by this script. PyTorch's own threading (its default intra-op thread
    count, printed; OpenMP's default wait policy unless the caller's environment sets one) and
    glibc's malloc defaults.
  * JAX: what the ``farmer_jax`` command applies at start (``cli.start_process``): jax put on
    the CPU where libtpu is installed without a TPU, then the malloc mode (``FARMER_JAX_MALLOC``:
    ``keep`` where jax runs on the CPU), then the idle-CPU mode (``FARMER_JAX_CPU_SPIN``: on a
    virtual machine, idle CPUs kept spinning at idle priority while the worker runs, as PyTorch's
    OpenMP threads spin); XLA:CPU's default thread pool (all visible cores); and the
    CPU execution choices (EXECUTION: unrolled, einsum attention; docs/performance.md) or with
    ``--execution=default`` ModelConfig's defaults (scan, jax.nn.dot_product_attention).
The header prints the CPU model and its ISA flags that matter (avx2, avx512f, avx512_bf16, amx),
both versions, both thread counts, the JAX side's malloc and idle-CPU modes, the load average
(at the start and the end) and, at the end, the share of the CPUs' time a hypervisor gave to other
guests (steal) and left idle during the run. Prints only, asserts nothing beyond the agreement
checks.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# name -> (kind, image side, batch)
WORKLOADS = {"train32": ("train", 32, 32), "train64": ("train", 64, 16),
             "reverse64": ("reverse", 32, 32), "reverse256": ("reverse", 64, 16)}
SEED = 0
WARMUP_ROUNDS = 2       # untimed rounds of train steps after the first two (the heap settles)
LR, BETAS, EPS, WD = 1e-4, (0.9, 0.95), 1e-8, 1e-4
# agreement of the two sides: first-step loss (same weights and batch), second step (after one
# AdamW update from gradients equal to float rounding), reverse outputs (max abs difference)
LOSS_TOL, LOSS2_TOL, REVERSE_TOL = 1e-5, 1e-4, 1e-4
# the CPU execution choices (ModelConfig; same params and function): unrolled AF blocks and layers,
# einsum attention with 64-token causal query chunks. --execution=default: ModelConfig's defaults.
EXECUTION = dict(unroll=True, attention="einsum", flow_attn_chunk=64)
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def hparams(size):
  return dict(in_channels=3, img_size=size, patch_size=4, channels=128, num_blocks=4,
              layers_per_block=2, nvp=True, num_classes=0)


def emit(record):
  print(json.dumps(record), flush=True)


# ---- workers: each runs in its own process, imports one framework only ----

def _reference():
  sys.path.insert(0, os.path.join(HERE, "..", "tests"))
  from tarflow_reference import TARFlowReference, randomize_
  return TARFlowReference, randomize_


def reference_and_batch(name):
  """Workload ``name``'s torch module (seed SEED, every parameter non-trivial: the reference's
  ``randomize_``) and its batch x (NCHW numpy, seeded uniform in [-1, 1])."""
  import numpy as np
  import torch
  TARFlowReference, randomize_ = _reference()
  _, size, batch = WORKLOADS[name]
  torch.manual_seed(SEED)
  ref = randomize_(TARFlowReference(**hparams(size)), seed=SEED, out_scale=0.01)
  x = np.random.default_rng(SEED).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)
  return ref, x


def jax_model(size, state, execution="cpu"):
  """The JAX side's ModelConfig for ``size`` (TARFlow's hyper-parameters; the CPU execution
  choices, or ModelConfig's defaults with execution='default') and its params converted from
  ``state``, a torch state_dict of numpy arrays."""
  import dataclasses

  import jax
  import jax.numpy as jnp

  from farmer_jax.config.schema import ModelConfig
  from farmer_jax.interop.tarflow import config_for_tarflow, tarflow_to_params

  mcfg = dataclasses.replace(ModelConfig(), **config_for_tarflow(**hparams(size)),
                             **(EXECUTION if execution == "cpu" else {}))
  return mcfg, jax.tree.map(jnp.asarray, tarflow_to_params(state, mcfg))


def worker_init(a):
  """Saves the torch module's initial state_dict, the batch x (NCHW) and, for the reverse, the
  latents z = forward(x) (TARFlow's token layout) to ``a.init``."""
  import numpy as np
  import torch
  ref, x = reference_and_batch(a.workload)
  arrays = {f"param/{k}": v.detach().numpy() for k, v in ref.state_dict().items()}
  arrays["x"] = x
  if WORKLOADS[a.workload][0] == "reverse":
    with torch.no_grad():
      arrays["z"] = ref.eval()(torch.from_numpy(x))[0].numpy()
  np.savez(a.init, **arrays)
  emit(dict(side="init", torch=torch.__version__, torch_threads=torch.get_num_threads()))


def _load_init(path):
  import numpy as np
  with np.load(path) as f:
    state = {k[len("param/"):]: f[k] for k in f.files if k.startswith("param/")}
    return state, f["x"], (f["z"] if "z" in f.files else None)


def _tarflow_model(checkout):
  """``transformer_flow.Model`` from a checkout of apple/ml-tarflow, and its forward as
  (z, logdets) (it also returns each block's output)."""
  sys.path.insert(0, os.path.abspath(checkout))
  from transformer_flow import Model
  return Model, lambda model, x: (lambda out: (out[0], out[2]))(model(x))


def torch_train_step(ref, forward, x):
  """One AdamW train step of the torch module ``ref`` on the batch ``x`` (NCHW numpy) per call;
  returns the loss as a float."""
  import torch
  x_t = torch.from_numpy(x)
  opt = torch.optim.AdamW(ref.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)

  def step():
    opt.zero_grad(set_to_none=True)
    zz, logdets = forward(ref, x_t)
    loss = ref.get_loss(zz, logdets)
    loss.backward()
    opt.step()
    return loss.item()

  return step


def jax_train_step(mcfg, params, x):
  """The JAX side's train step for ``mcfg`` from ``params`` on the batch ``x`` (NCHW numpy): a
  function of no arguments that runs one jitted, donated step and returns its loss (a jax
  array, not waited for)."""
  import jax
  import jax.numpy as jnp
  import optax

  from farmer_jax.flow.patchify import patchify
  from farmer_jax.model import make_flow

  flow = make_flow(mcfg)
  tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)
  dims = mcfg.num_tokens * mcfg.token_dim

  def loss_fn(p, xb):
    zz, logdet = flow.apply({"params": p}, patchify(xb, mcfg.patch_size))
    return 0.5 * jnp.mean(zz ** 2) - jnp.mean(logdet) / dims

  def train_step(p, o, xb):
    loss, g = jax.value_and_grad(loss_fn)(p, xb)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  jitted = jax.jit(train_step, donate_argnums=(0, 1))
  x_j = jnp.asarray(x.transpose(0, 2, 3, 1))
  state = [params, tx.init(params)]

  def step():
    state[0], state[1], loss = jitted(state[0], state[1], x_j)
    return loss

  return step


def worker_torch(a):
  import numpy as np
  import torch
  kind, size, batch = WORKLOADS[a.workload]
  state, x, z = _load_init(a.init)
  if a.tarflow:
    Model, forward = _tarflow_model(a.tarflow)
  else:
    Model, forward = _reference()[0], lambda model, xb: model(xb)
  ref = Model(**hparams(size))
  ref.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  out = dict(side="torch", torch=torch.__version__, threads=torch.get_num_threads(),
             module=Model.__module__)
  if kind == "train":
    step = torch_train_step(ref, forward, x)
    out["losses"] = [step(), step()]
    for _ in range(a.warmup * a.steps):
      step()
    times = []
    for _ in range(a.rounds):
      t0 = time.perf_counter()
      for _ in range(a.steps):
        step()
      times.append((time.perf_counter() - t0) / a.steps)
  else:
    ref.eval()
    z_t = torch.from_numpy(z)
    with torch.no_grad():
      x_back = ref.reverse(z_t)                 # first call, untimed like the JAX side's compile
      np.save(a.out, x_back.numpy().transpose(0, 2, 3, 1))
      times = []
      for _ in range(a.rounds):
        t0 = time.perf_counter()
        ref.reverse(z_t)
        times.append(time.perf_counter() - t0)
  out["times"] = times
  emit(out)


def worker_jax(a):
  # what the farmer_jax command applies at start, before jax makes threads
  from farmer_jax.cli import start_process
  malloc, cpu_spin = start_process()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from farmer_jax.flow.autoregressive_flow import AutoregressiveFlow
  from farmer_jax.flow.patchify import unpatchify
  from farmer_jax.interop.tarflow import patch_permutation
  from farmer_jax.model import make_flow

  kind, size, batch = WORKLOADS[a.workload]
  state, x, z = _load_init(a.init)
  mcfg, params = jax_model(size, state, a.execution)
  flow = make_flow(mcfg)
  out = dict(side="jax", jax=jax.__version__, platform=jax.devices()[0].platform, malloc=malloc,
             cpu_spin=cpu_spin,
             cores=len(os.sched_getaffinity(0)))
  if kind == "train":
    step = jax_train_step(mcfg, params, x)
    out["losses"] = [float(step()) for _ in range(2)]           # the first compiles
    jax.block_until_ready([step() for _ in range(a.warmup * a.steps)])
    times = []
    for _ in range(a.rounds):
      t0 = time.perf_counter()
      for _ in range(a.steps):
        loss = step()
      jax.block_until_ready(loss)
      times.append((time.perf_counter() - t0) / a.steps)
  else:
    inverse = jax.jit(lambda p, zz: flow.apply({"params": p}, zz,
                                               method=AutoregressiveFlow.inverse))
    z_j = jnp.asarray(z[..., patch_permutation(mcfg.patch_size, mcfg.channels)])
    x_back = unpatchify(jax.block_until_ready(inverse(params, z_j)), mcfg.patch_size,
                        mcfg.image_size, mcfg.channels)            # compiles
    np.save(a.out, np.asarray(x_back))
    times = []
    for _ in range(a.rounds):
      t0 = time.perf_counter()
      jax.block_until_ready(inverse(params, z_j))
      times.append(time.perf_counter() - t0)
  out["times"] = times
  emit(out)


# ---- the parent: starts the workers, compares and prints ----

def cpu_line():
  model, flags = "unknown CPU", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown CPU":
          model = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  isa = " ".join(f for f in ISA_FLAGS if f in flags) or "none of " + " ".join(ISA_FLAGS)
  return (f"CPU: {model}; {os.cpu_count()} logical CPUs, {len(os.sched_getaffinity(0))} usable; "
          f"ISA: {isa}")


def loadavg():
  try:
    with open("/proc/loadavg") as f:
      return " ".join(f.read().split()[:3])
  except OSError:
    return "unknown"


def cpu_times():
  """This machine's CPU time so far (/proc/stat's first line: user .. steal), or None."""
  try:
    with open("/proc/stat") as f:
      times = [int(v) for v in f.readline().split()[1:9]]
  except (OSError, ValueError):
    return None
  return times if len(times) == 8 else None


def stolen(start, end):
  """The share of the CPUs' time between two ``cpu_times`` that a hypervisor gave to others
  (steal; 0 outside virtual machines), and the share idle, as a phrase."""
  if start is None or end is None or sum(end) <= sum(start):
    return "unknown"
  d = [b - a for a, b in zip(start, end)]
  return f"{100 * d[7] / sum(d):.0f}% stolen by the hypervisor, {100 * d[3] / sum(d):.0f}% idle"


def run_worker(args):
  cmd = [sys.executable, os.path.abspath(__file__)] + args
  proc = subprocess.run(cmd, capture_output=True, text=True)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
  if proc.returncode != 0 or not lines:
    sys.stderr.write(proc.stdout + proc.stderr)
    raise SystemExit(f"vs_torch: worker {' '.join(args)} failed (exit {proc.returncode})")
  return json.loads(lines[-1])


def spread(values, fmt):
  return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}.." \
         f"{fmt.format(max(values))})"


def measure(name, a, init, tmp, execution, pairs):
  """Alternating pairs of worker processes for workload ``name``; returns its table line and
  whether both sides agree."""
  kind, size, batch = WORKLOADS[name]
  common = [f"--workload={name}", f"--init={init}", f"--rounds={a.rounds}",
            f"--steps={a.steps}", f"--warmup={a.warmup}", f"--execution={execution}"]
  if a.tarflow:
    common.append(f"--tarflow={os.path.abspath(a.tarflow)}")
  res = {"jax": [], "torch": []}
  for i in range(pairs):
    for side in (("jax", "torch") if i % 2 == 0 else ("torch", "jax")):
      out = os.path.join(tmp, f"{name}_{side}.npy")
      res[side].append(run_worker([f"--worker={side}", f"--out={out}"] + common))
  # per process: the median over its rounds; per side: the median (spread) over processes
  t = {s: [statistics.median(r["times"]) for r in res[s]] for s in res}
  ratios = [tt / tj for tj, tt in zip(t["jax"], t["torch"])]
  ratio = statistics.median(t["torch"]) / statistics.median(t["jax"])
  head = f"{name:<10} {size:>3}x{size:<3} {(size // 4) ** 2:>6} {batch:>5}"
  if kind == "train":
    rate = {s: [batch / v for v in t[s]] for s in t}
    cols = f"{spread(rate['jax'], '{:.1f}'):>22} {spread(rate['torch'], '{:.1f}'):>22}"
    lj, lt = res["jax"][0]["losses"], res["torch"][0]["losses"]
    d1, d2 = abs(lj[0] - lt[0]), abs(lj[1] - lt[1])
    ok = d1 <= LOSS_TOL and d2 <= LOSS2_TOL
    check = (f"loss {lj[0]:.6f} / {lt[0]:.6f} (|diff| {d1:.1e}); second step {lj[1]:.6f} / "
             f"{lt[1]:.6f} (|diff| {d2:.1e})")
  else:
    import numpy as np
    ms = {s: [1e3 * v / batch for v in t[s]] for s in t}
    cols = f"{spread(ms['jax'], '{:.2f}'):>22} {spread(ms['torch'], '{:.2f}'):>22}"
    err = float(np.abs(np.load(os.path.join(tmp, f"{name}_jax.npy")) -
                       np.load(os.path.join(tmp, f"{name}_torch.npy"))).max())
    ok = err <= REVERSE_TOL
    check = f"max |x_jax - x_torch| {err:.1e}"
  line = (f"{head} {cols} {ratio:>6.2f} ({min(ratios):.2f}..{max(ratios):.2f})   {check}"
          + ("" if ok else "   DISAGREE"))
  return line, ok, res


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--pairs", type=int, default=3,
                  help="alternating pairs of processes (jax, torch; torch, jax; ...) per workload")
  ap.add_argument("--rounds", type=int, default=5, help="timed rounds per process (median)")
  ap.add_argument("--steps", type=int, default=3, help="train steps per round")
  ap.add_argument("--warmup", type=int, default=WARMUP_ROUNDS,
                  help="untimed rounds of train steps after the first two")
  ap.add_argument("--quick", action="store_true",
                  help="a smoke run: 1 pair, 2 rounds of 1 step, no warm-up rounds")
  ap.add_argument("--workloads", default=",".join(WORKLOADS),
                  help=f"comma-separated, of {', '.join(WORKLOADS)}")
  ap.add_argument("--execution", default="cpu", choices=("cpu", "default", "both"),
                  help="JAX side: the CPU choices (EXECUTION), ModelConfig's defaults (scan, "
                  "dot_product_attention), or both (before/after in one run)")
  ap.add_argument("--tarflow", metavar="DIR",
                  help="PyTorch side: transformer_flow.Model from this checkout of "
                  "apple/ml-tarflow instead of tests/tarflow_reference.py (same weights)")
  # worker mode (internal: the parent starts these)
  ap.add_argument("--worker", choices=("init", "jax", "torch"), help=argparse.SUPPRESS)
  ap.add_argument("--workload", choices=tuple(WORKLOADS), help=argparse.SUPPRESS)
  ap.add_argument("--init", help=argparse.SUPPRESS)
  ap.add_argument("--out", help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.worker:
    {"init": worker_init, "jax": worker_jax, "torch": worker_torch}[a.worker](a)
    return
  names = [w.strip() for w in a.workloads.split(",") if w.strip()]
  unknown = [w for w in names if w not in WORKLOADS]
  if unknown or not names:
    ap.error(f"--workloads: unknown {unknown}; choose from {', '.join(WORKLOADS)}")
  if min(a.pairs, a.rounds, a.steps) < 1 or a.warmup < 0:
    ap.error("--pairs, --rounds and --steps must be >= 1, --warmup >= 0")
  if a.tarflow and not os.path.isfile(os.path.join(a.tarflow, "transformer_flow.py")):
    ap.error(f"--tarflow={a.tarflow}: no transformer_flow.py there; point it at a checkout of "
             "apple/ml-tarflow")
  pairs = a.pairs
  if a.quick:
    pairs, a.rounds, a.steps, a.warmup = 1, 2, 1, 0
  executions = {"cpu": ["cpu"], "default": ["default"], "both": ["default", "cpu"]}[a.execution]
  t_start, cpu_start = time.perf_counter(), cpu_times()
  print(cpu_line())
  print(f"load average at start: {loadavg()}; python {sys.version.split()[0]}", flush=True)
  all_ok = True
  with tempfile.TemporaryDirectory(prefix="vs_torch_") as tmp:
    inits, info = {}, None
    for name in names:
      inits[name] = os.path.join(tmp, f"{name}_init.npz")
      info = run_worker(["--worker=init", f"--workload={name}", f"--init={inits[name]}"])
    print(f"torch {info['torch']}: {info['torch_threads']} threads (its default), its own "
          f"OpenMP and malloc settings; OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print("PyTorch module: " + (f"transformer_flow.Model of {os.path.abspath(a.tarflow)}"
                                if a.tarflow else "tests/tarflow_reference.py TARFlowReference"))
    print("AF: 3 channels, patch 4, width 128 (2 heads), 4 blocks x 2 layers, unconditional, "
          "fp32, same weights and batch on both sides")
    print(f"each side in its own processes: {pairs} alternating pair(s) per workload; per "
          f"process, train: 2 + {a.warmup} x {a.steps} untimed steps, {a.rounds} timed rounds x "
          f"{a.steps} steps; reverse: 1 untimed call, {a.rounds} timed; the median of its rounds")
    print("per side: the median over its processes (min..max); ratio: torch time / JAX time "
          "of those medians (min..max over pairs)")
    for execution in executions:
      ex = EXECUTION if execution == "cpu" else "(ModelConfig defaults)"
      print(f"\n== JAX execution: {execution} {ex}")
      print(f"{'workload':<10} {'image':>7} {'tokens':>6} {'batch':>5} {'jax':>22} "
            f"{'torch':>22} {'torch/jax (pairs)':>19}   agreement")
      print("   (train: images/s; reverse: ms per image; ratio > 1 = JAX faster)")
      jax_info = None
      for name in names:
        line, ok, res = measure(name, a, inits[name], tmp, execution, pairs)
        jax_info = res["jax"][0]
        all_ok &= ok
        print(line, flush=True)
      print(f"jax {jax_info['jax']} on {jax_info['platform']}: XLA:CPU's default thread pool "
            f"({jax_info['cores']} cores), malloc {jax_info['malloc']}, idle CPUs "
            f"{jax_info['cpu_spin']} (farmer_jax's start-up)")
  print(f"\nload average at end: {loadavg()}; CPU time during the run: "
        f"{stolen(cpu_start, cpu_times())}; {time.perf_counter() - t_start:.0f} s in all")
  if not all_ok:
    print(f"the two sides disagree beyond the tolerances (first-step loss {LOSS_TOL}, second "
          f"{LOSS2_TOL}, reverse {REVERSE_TOL})", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
