"""FARMER's design choices, measured at the quickstart's budget: the variants of the paper's Table 3
(and its dimension-reduction ablation), the AR order, the redundant token's candidate pool and
resampling vs naive CFG, trained on MNIST-5k and scored by test bits/dim, MNIST-FID and class
consistency.

  python benchmarks/ablation.py [--out runs/ablation] [--runs farmer@0,1 tarflow ...] [--quick]

Every variant is ``quickstart`` (same data, steps, batch, AF) with the overrides in
VARIANTS, trained by ``farmer_jax train`` in its own workdir ``OUT/<variant>/seed<S>``; a run whose
summary.json exists is read back, not retrained (so an interrupted benchmark continues where it
stopped), and a workdir trained with other overrides is refused. Each run is then scored
(``eval.mnist_quality``'s digit CNN; 100 samples per class) under the sampler settings of
``settings()``: plain sampling (cfg 0) and the quickstart's resampling CFG; the FARMER run also
with JetFormer's naive CFG at the same strength and temperatures and with each redundant pool. A
standard_normal prior (TARFlow) has no GMM to guide and is scored with TARFlow's guided inverse
instead. Scores are cached next to each run (``ablation_scores.json``).

Printed and written to ``OUT/ablation.md`` (and ``.json``): one row per variant (the mean over its
seeds, each seed's value in the JSON), then the redundant-pool comparison with the effective sample
sizes and the distinct redundant tokens per image.

``--quick`` (the slow test tier, tests/test_ablation.py): every variant once, on
``quickstart:tiny`` for 30 steps, scored on 5 samples per class; the numbers mean
nothing, the table and every variant's code path are checked.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

# name -> (what it is, the paper's row it stands for, config overrides of quickstart)
VARIANTS = {
    "farmer": ("FARMER: AF + GMM AR + dimension reduction (d_I = 4 of 16)",
               "Table 3, last rows", {}),
    "tarflow": ("AF + N(0, I) prior (TARFlow)", "TARFlow baseline",
                {"model.prior": "standard_normal", "sample.guidance": "none", "sample.cfg": 0.0}),
    "k1": ("AF + AR with one Gaussian per token (K = 1)", "Fig. 6a (mixtures)",
           {"model.mixtures_informative": 1, "model.mixtures_redundant": 1}),
    "no_dimred": ("AF + GMM AR without dimension reduction (d_I = d = 16)",
                  "Table 3 row 1 (no DR)", {"model.dimred": "none"}),
    "jetformer": ("JetFormer's factor-out: z^R ~ N(0, I) (d_I = 4)", "DR-method ablation",
                  {"model.dimred": "jetformer"}),
    "repeat1": ("FARMER with the class embedding once (M = 1, not 8)",
                "Table 3 'condition repeat'", {"model.class_repeats": 1}),
    "same_order": ("FARMER with the AR prior in the last AF block's order",
                   "Table 3 'final permute' (one reading)", {"model.ar_order": "same"}),
}
DEFAULT_RUNS = ("farmer@0,1", "same_order@0,1", "tarflow", "k1", "no_dimred", "jetformer",
                "repeat1")
SCORES = "ablation_scores.json"


def parse_runs(tokens, seeds):
  """['farmer@0,1', 'k1'] -> [(variant, seed)]; a bare name takes ``seeds``."""
  out = []
  for t in tokens:
    name, _, s = t.partition("@")
    if name not in VARIANTS:
      sys.exit(f"ablation.py: unknown variant {name!r}. Fix: use one of {', '.join(VARIANTS)}")
    out += [(name, int(x)) for x in (s.split(",") if s else seeds)]
  return out


def overrides(name, seed, quick):
  over = {"eval.mnist_quality": False, "train.seed": seed, **VARIANTS[name][2]}
  if quick:
    over["train.steps"] = 30
  return over


def train(workdir, config, over, log):
  """Trains one run (a ``farmer_jax train`` process), or reads back a finished one: its summary."""
  from farmer_jax.artifacts import runs
  summary = os.path.join(workdir, runs.SUMMARY)
  if not os.path.exists(summary):
    os.makedirs(workdir, exist_ok=True)
    cmd = [sys.executable, "-m", "farmer_jax", "train", f"--config={config}",
           f"--workdir={workdir}", "--quiet"] + [f"--config.{k}={v}" for k, v in over.items()]
    with open(log, "w") as f:
      rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc:
      sys.exit(f"ablation.py: training failed (exit {rc}): {' '.join(cmd)}; its log: {log}")
  saved = runs.read_saved_config(workdir)
  for key, want in over.items():
    part, _, field = key.partition(".")
    if part in ("model", "sample", "train") and saved[part][field] != want:
      sys.exit(f"ablation.py: {workdir} was trained with {key}={saved[part][field]!r}, not "
               f"{want!r}. Fix: remove it or pass another --out")
  with open(summary) as f:
    return json.load(f)


def name_of(mcfg, s):
  """A sampler setting's name in the tables: its guidance and strength, and for a resampling CFG
  of FARMER's redundant GMM its pool (e.g. 'resampling_cfg3_shared64')."""
  if s.af_guidance:
    return f"af_guidance{s.af_guidance:g}"
  if s.guidance == "none":
    return "cfg0"
  name = f"{s.guidance}_cfg{s.cfg.w:g}"
  if s.guidance == "resampling" and mcfg.dimred == "farmer":
    name += f"_{s.redundant_pool}{s.redundant_candidates}"
  return name


def settings(mcfg, base, guidance_ablation):
  """The sampler settings a run is scored under; ``base`` = the quickstart's own sampler. With
  ``guidance_ablation`` (the FARMER run) also JetFormer's naive CFG at the same strength and
  temperatures, and the redundant GMM resampled both ways: one shared pool of N candidates per group
  (the paper presets' rule, Algorithm 1) and a fresh pool of 16 per group per token."""
  from farmer_jax.config.schema import ResamplingCFG, SamplerConfig
  out = [SamplerConfig(guidance="none", cfg=ResamplingCFG())]
  if mcfg.prior == "standard_normal":   # TARFlow's guidance: the guided reverse of the AF
    return out + ([SamplerConfig(af_guidance=base.cfg.w)] if mcfg.flow_class_conditional else [])
  out.append(base)
  if not guidance_ablation:
    return out
  if mcfg.dimred == "farmer":
    out += [s for s in (base._replace(redundant_pool="shared",
                                      redundant_candidates=mcfg.num_tokens),
                        base._replace(redundant_pool="per_token", redundant_candidates=16))
            if s != base]
  return out + [base._replace(guidance="naive")]


def sampler_dict(s):
  """A SamplerConfig as plain JSON data."""
  return s._asdict() | {"cfg": s.cfg._asdict()}


def redundant_stats(mcfg, params, s, per_class, seed):
  """Mean ESS of the informative and redundant draws and distinct redundant tokens per image over
  ``per_class`` samples per class (resampling CFG with dimension reduction only)."""
  import jax
  import jax.numpy as jnp

  from farmer_jax.sampling.sampler import sample_keys, sample_latents
  y = jnp.repeat(jnp.arange(mcfg.num_classes), per_class)
  z, st = jax.jit(lambda p, k, y: sample_latents(mcfg, p, k, y, s, return_stats=True))(
      params, sample_keys(seed, 0, len(y)), y)
  z_r = np.asarray(z)[..., mcfg.d_i:]
  distinct = [len({row.tobytes() for row in img}) for img in z_r]
  return {"ess_informative": float(np.mean(st["ess_informative"])),
          "ess_redundant": float(np.mean(st["ess_redundant"])),
          "redundant_distinct": float(np.mean(distinct)), "tokens": mcfg.num_tokens}


def score(workdir, base, per_class, judge, guidance_ablation):
  """({setting: scores}, {table column: setting}) of one run; the scores are cached in its workdir
  (recomputed when a setting changed)."""
  from farmer_jax.eval.evaluate import load_params
  from farmer_jax.eval.mnist_quality import score_model
  path = os.path.join(workdir, SCORES)
  cache = {}
  if os.path.exists(path):
    with open(path) as f:
      cache = json.load(f)
  _, mcfg, params, _ = load_params(workdir=workdir, say=lambda _: None)
  todo, out = settings(mcfg, base, guidance_ablation), {}
  for s in todo:
    name = name_of(mcfg, s)
    sig = {"sampler": sampler_dict(s), "per_class": per_class}
    if cache.get(name, {}).get("signature") != sig:
      t0 = time.time()
      r = score_model(mcfg, params, None, per_class, named=[(name, s)], judge=judge)[name]
      r = {k: r[k] for k in ("mnist_fid", "class_consistency")}
      if s.guidance == "resampling" and mcfg.dimred == "farmer":
        r.update(redundant_stats(mcfg, params, s, min(per_class, 10), seed=0))
      cache[name] = {"signature": sig, "seconds": time.time() - t0, **r}
      with open(path, "w") as f:
        json.dump(cache, f, indent=1)
    out[name] = cache[name]
  # the main table's columns: plain, the quickstart's own resampling CFG (TARFlow: its guided
  # inverse), naive CFG
  guided = name_of(mcfg, todo[1]) if len(todo) > 1 else None
  columns = {"cfg0": "cfg0", "resampling": guided, "naive": f"naive_cfg{base.cfg.w:g}"}
  return out, columns


def mean(values):
  v = [x for x in values if x is not None]
  return float(np.mean(v)) if v else None


def fmt(x, digits):
  return "—" if x is None else f"{x:.{digits}f}"


def table(results, base):
  """The markdown tables of ``results`` {variant: [per-seed record]}."""
  w = f"{base.cfg.w:g}"
  cols = [("cfg0", "cfg 0"), ("resampling", f"resampling CFG w={w}"),
          ("naive", f"naive CFG w={w}")]
  head = ("| variant | seeds | test bpd cond. | test bpd uncond. | "
          + " | ".join(f"{t} FID | {t} class cons." for _, t in cols) + " | train min |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for name, recs in results.items():
    row = [name, ",".join(str(r["seed"]) for r in recs),
           fmt(mean(r["test_bpd"] for r in recs), 4),
           fmt(mean(r["test_bpd_uncond"] for r in recs), 4)]
    for key, _ in cols:
      got = [r["scores"].get(r["columns"].get(key)) for r in recs]
      row += [fmt(mean(g and g["mnist_fid"] for g in got), 2),
              fmt(mean(g and g["class_consistency"] for g in got), 3)]
    row.append(fmt(mean(r["train_seconds"] / 60 for r in recs), 1))
    lines.append("| " + " | ".join(row) + " |")
  pools = [(k, v) for r in results.get("farmer", []) for k, v in r["scores"].items()
           if "ess_redundant" in v]
  if pools:
    lines += ["", f"Redundant pool (FARMER, resampling CFG w={w}; the informative tokens' pools "
                  f"are {base.informative_pool}; ESS and distinct tokens over 10 samples per "
                  "class, mean over seeds):", "",
              "| setting | MNIST-FID | class cons. | ESS informative | ESS redundant | "
              "distinct z^R per image |", "|---|---|---|---|---|---|"]
    for key in dict(pools):
      got = [v for k, v in pools if k == key]
      lines.append(f"| {key} | {fmt(mean(g['mnist_fid'] for g in got), 2)} | "
                   f"{fmt(mean(g['class_consistency'] for g in got), 3)} | "
                   f"{fmt(mean(g['ess_informative'] for g in got), 2)} | "
                   f"{fmt(mean(g['ess_redundant'] for g in got), 2)} | "
                   f"{fmt(mean(g['redundant_distinct'] for g in got), 1)} of {got[0]['tokens']} |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="runs/ablation")
  ap.add_argument("--runs", nargs="+", default=None,
                  help="variant[@seed,seed] (a bare variant takes --seeds); variants: "
                  + ", ".join(VARIANTS) + f"; default: {' '.join(DEFAULT_RUNS)} (--quick: every "
                  "variant once)")
  ap.add_argument("--seeds", default="0")
  ap.add_argument("--per_class", type=int, default=100)
  ap.add_argument("--quick", action="store_true")
  a = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from farmer_jax import configlib
  from farmer_jax.config.schema import SamplerConfig
  from farmer_jax.eval.mnist_quality import make_judge

  config = "quickstart" + (":tiny" if a.quick else "")
  per_class = 5 if a.quick else a.per_class
  base = SamplerConfig.from_config(configlib.load("quickstart").sample)
  runs = a.runs or (list(VARIANTS) if a.quick else list(DEFAULT_RUNS))
  todo = parse_runs(runs, a.seeds.split(","))
  judge, results, t_all = None, {}, time.time()
  for i, (name, seed) in enumerate(todo):
    workdir = os.path.join(a.out, name, f"seed{seed}")
    t0 = time.time()
    print(f"[{i + 1}/{len(todo)}] {name} seed {seed}: {VARIANTS[name][0]}", flush=True)
    summary = train(workdir, config, overrides(name, seed, a.quick),
                    os.path.join(a.out, f"{name}.seed{seed}.log"))
    judge = judge or make_judge()
    scores, columns = score(workdir, base, per_class, judge, guidance_ablation=name == "farmer")
    results.setdefault(name, []).append(
        {"seed": seed, "columns": columns, "test_bpd": summary["test_bpd"],
         "test_bpd_uncond": summary.get("test_bpd_uncond"),
         "train_seconds": summary["train_seconds"], "scores": scores})
    print(f"  test bpd {summary['test_bpd']:.4f}; " + "; ".join(
        f"{k}: FID {v['mnist_fid']:.2f}, class cons. {v['class_consistency']:.3f}"
        for k, v in scores.items()) + f" ({time.time() - t0:.0f} s)", flush=True)
  md = table(results, base)
  with open(os.path.join(a.out, "ablation.md"), "w") as f:
    f.write(md + "\n")
  with open(os.path.join(a.out, "ablation.json"), "w") as f:
    json.dump({"config": config, "samples_per_class": per_class,
               "sampler": sampler_dict(base),
               "variants": {k: v[:2] for k, v in VARIANTS.items()}, "results": results}, f,
              indent=1)
  print(md)
  print(f"{len(todo)} runs, {(time.time() - t_all) / 60:.1f} min; {a.out}/ablation.md")


if __name__ == "__main__":
  main()
