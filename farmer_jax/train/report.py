"""What `farmer_jax train` reports once training is done: test bits/dim, the sample grid and
summary.json, from a Trainer (train/trainer.py)."""

import json
import time

import jax
import numpy as np
from tqdm import tqdm

from farmer_jax import runs, sharding, storage
from farmer_jax.config import SampleConfig
from farmer_jax.eval.likelihood import evaluate_batches
from farmer_jax.sampling.generate import generate, parse_classes
from farmer_jax.sampling.images import save_grid


def _progress(tr):
  return not tr.quiet and jax.process_index() == 0


def evaluate(tr):
  """Test bits/dim of the trainer's eval params over every example of ``config.eval.split``
  (see ``eval.likelihood.evaluate_batches``), sharded over the training mesh
  (``Trainer.eval_batches``)."""
  batches, steps, n = tr.eval_batches()
  bar = tqdm(total=n, desc="eval bpd", disable=not _progress(tr), dynamic_ncols=True)
  with tr.mesh_context():
    res = evaluate_batches(tr.model, tr.eval_params(), batches, steps,
                           put=lambda b: sharding.global_batch(b, tr.mesh, tr.batch_sh),
                           seed=tr.t.seed, progress=lambda done: bar.update(done - bar.n))
  bar.close()
  return res


def sample_grid(tr, path):
  """One row per class (``config.sample.per_class`` samples each; one row of the null class for an
  unconditional model) written as a PNG at ``path``; returns the uint8 images (R, K, H, W, c).

  The `farmer_jax sample` engine (``generate`` + ``write_outputs``), run on the training mesh with
  replicated outputs: every process gets the images, process 0 writes them. Non-finite samples
  raise (ValueError from ``generate``) before anything is written.
  """
  s = SampleConfig.from_config(tr.config)
  classes = parse_classes("all", tr.mcfg.num_classes)
  with tr.mesh_context():
    images, labels = generate(tr.mcfg, tr.eval_params(), classes, s.per_class,
                              s.sampler, seed=s.seed,
                              batch_size=len(classes) * s.per_class, progress=_progress(tr),
                              out_sharding=sharding.replicated(tr.mesh))
  if jax.process_index() == 0:
    save_grid(images, path)
  return images


def write_report(tr, history, train_s, t0):
  """Evaluates, samples the grid and writes summary.json; returns the summary dict."""
  res = evaluate(tr)
  if not (np.isfinite(res["bpd"]) and np.isfinite(res["bpd_uncond"])):
    raise FloatingPointError(f"test bits/dim is not finite ({res['bpd']}, unconditional "
                             f"{res['bpd_uncond']}); {runs.SUMMARY} was not written (the "
                             "checkpoint is saved)")
  run = runs.RunDir(tr.workdir)
  grid = run.samples
  sample_grid(tr, grid)
  summary = {"steps": int(tr.state["step"]), "train_seconds": train_s,
             "total_seconds": time.time() - t0,
             "final_train_loss": history[-1]["loss"] if history else None,
             "test_bpd": res["bpd"], "test_bpd_uncond": res["bpd_uncond"],
             "test_nats_per_dim": res["nats_per_dim"],
             "test_nats_per_dim_uncond": res["nats_per_dim_uncond"],
             "test_count": res["count"], "class_conditional": tr.mcfg.num_classes > 0,
             "num_params": tr.num_params, "samples": grid}
  if jax.process_index() == 0:
    storage.write_text(run.summary, json.dumps(summary, indent=2))
  tr.log(f"{format_test_bpd(summary)}; {res['count']} images, uniform dequantization; samples -> "
         f"{grid}; wall {summary['total_seconds']:.0f}s")
  return summary


def format_test_bpd(summary):
  """'test bpd: 2.4200 (class-conditional), 2.5100 (unconditional)' from a train summary."""
  if not summary.get("class_conditional", True):
    return f"test bpd: {summary['test_bpd']:.4f} (unconditional model)"
  return (f"test bpd: {summary['test_bpd']:.4f} (class-conditional), "
          f"{summary['test_bpd_uncond']:.4f} (unconditional)")
