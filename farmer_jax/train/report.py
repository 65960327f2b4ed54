"""What `farmer_jax train` reports once training is done: test bits/dim, the sample grid, the
training curves and summary.json, from a Trainer (train/trainer.py); the sample grids it draws
along the way."""

import json
import time

import jax
import numpy as np
from tqdm import tqdm

from farmer_jax import sharding
from farmer_jax.artifacts import plots, runs, storage
from farmer_jax.artifacts.metrics import MetricWriter, has_row, read_rows
from farmer_jax.eval.likelihood import eval_scalars, evaluate_batches
from farmer_jax.sampling.generate import generate, parse_classes
from farmer_jax.sampling.images import grid_image, save_grid


def evaluate(tr, leave=True):
  """Test bits/dim of the trainer's eval params over every example of ``config.eval.split``
  with ``config.eval.dequant_samples`` draws per image (see ``eval.likelihood.evaluate_batches``),
  sharded over the training mesh (``Trainer.eval_batches``)."""
  e = tr.run.eval
  batches, steps, n = tr.eval_batches()
  bar = tqdm(total=n, desc="eval bpd", disable=not tr.bars, dynamic_ncols=True,
             leave=leave)
  with tr.mesh_context():
    res = evaluate_batches(tr.model, tr.eval_params(), batches, steps,
                           put=lambda b: sharding.global_batch(b, tr.mesh, tr.batch_sh),
                           seed=tr.t.seed, samples=e.dequant_samples,
                           progress=lambda done: bar.update(done - bar.n),
                           out_sharding=sharding.replicated(tr.mesh))
  bar.close()
  return res


def sample_grid(tr, path, classes=None):
  """One row per class (``config.sample.per_class`` samples each; one row of the null class for an
  unconditional model) written as a PNG at ``path``; returns the uint8 images (R, K, H, W, c).
  ``classes``: the rows' class ids (default: every class).

  The `farmer_jax sample` engine (``generate`` + ``write_outputs``) on the training mesh: batches
  of ``grid_batch_size`` samples split over the mesh's data-parallel slots, each process drawing
  its share (every process gets the images, process 0 writes them). Non-finite samples raise
  (UserError from ``generate``) before anything is written.
  """
  s = tr.run.sample
  if classes is None:
    classes = parse_classes("all", tr.mcfg.num_classes)
  with tr.mesh_context():
    images, labels = generate(tr.mcfg, tr.eval_params(), classes, s.per_class,
                              s.sampler, seed=s.seed,
                              batch_size=grid_batch_size(tr.run, tr.mesh, rows=len(classes)),
                              progress=tr.bars, batch_sharding=tr.batch_sh)
  if jax.process_index() == 0:
    storage.makedirs(storage.parent(path))
    save_grid(images, path)
  return images


def periodic_classes(run):
  """The rows of the grid drawn at every periodic eval: ``config.sample.periodic_classes`` class
  ids spread evenly over the model's (all of them when it has no more; the null class for an
  unconditional model); [] for none."""
  n = run.sample.periodic_classes
  every = parse_classes("all", run.model.num_classes)
  if n == 0:
    return []
  if n >= len(every):
    return every
  return [every[i * len(every) // n] for i in range(n)]


def grid_batch_size(run, mesh, processes=None, rows=None):
  """The global batch of a grid of ``rows`` classes (default: every class) on ``mesh``:
  ``config.sample.batch_size`` (at most the whole grid), rounded up to a multiple of the
  data-parallel slots and of the processes."""
  s = run.sample
  rows = max(run.model.num_classes, 1) if rows is None else rows
  return sharding.padded_batch_size(min(s.batch_size, rows * s.per_class), mesh,
                                    run.sharding_rules, processes)


def log_grid(writer, images, step):
  """A grid's images (R, K, H, W, c; ``sample_grid``) to TensorBoard as ``samples`` at ``step``."""
  writer.image("samples", np.asarray(grid_image(images)), step)


def write_curves(tr):
  """WORKDIR/curves.png from the run's metrics.jsonl (process 0; none while it has no row)."""
  if jax.process_index() == 0:
    run = runs.RunDir(tr.workdir)
    rows = read_rows(run.metrics)
    if rows:
      plots.write_curves(rows, run.curves)


def write_report(tr, history, train_s, t0):
  """Evaluates, samples the grid (samples.png, TensorBoard), draws the curves (curves.png) and
  writes summary.json; returns the summary dict."""
  res = evaluate(tr)
  if not (np.isfinite(res["bpd"]) and np.isfinite(res["bpd_uncond"])):
    raise FloatingPointError(f"test bits/dim is not finite ({res['bpd']}, unconditional "
                             f"{res['bpd_uncond']}); {runs.SUMMARY} was not written (the "
                             "checkpoint is saved)")
  run = runs.RunDir(tr.workdir)
  grid = run.samples
  images = sample_grid(tr, grid)
  step = int(tr.state["step"])
  summary = {"steps": step, "train_seconds": train_s,
             "final_train_loss": history[-1]["loss"] if history else None,
             **res_summary(res), "num_params": tr.num_params, "samples": grid}
  # a re-run of a finished run reports again but logs its final eval once
  logged = jax.process_index() == 0 and has_row(run.metrics, step, "eval")
  scalars = eval_scalars(res)
  e = tr.run.eval
  if e.mnist_quality:
    from farmer_jax.eval.mnist_quality import score_run
    quality = score_run(tr, e, say=tr.log)
    if quality is not None:   # process 0's
      summary["sample_quality"] = quality
      scalars.update(quality_scalars(quality))
  if not logged:
    writer = MetricWriter(tr.workdir)
    try:
      writer.write(step, scalars, prefix="eval")
      log_grid(writer, images, step)
    finally:
      writer.close()
  write_curves(tr)
  summary["total_seconds"] = time.time() - t0
  if jax.process_index() == 0:
    storage.write_text(run.summary, json.dumps(summary, indent=2))
  tr.log(f"{format_test_bpd(summary)}; {res['count']} images, uniform dequantization; samples -> "
         f"{grid}; wall {summary['total_seconds']:.0f}s")
  if "sample_quality" in summary:
    from farmer_jax.eval.mnist_quality import format_quality
    tr.log(format_quality(summary["sample_quality"]))
  return summary


def res_summary(res):
  """A bits/dim result (``evaluate``) as summary.json's ``test_*`` keys."""
  out = {"test_bpd": res["bpd"], "test_bpd_uncond": res["bpd_uncond"],
         "test_bpd_se": res["bpd_se"], "test_bpd_uncond_se": res["bpd_se_uncond"],
         "test_nats_per_dim": res["nats_per_dim"],
         "test_nats_per_dim_uncond": res["nats_per_dim_uncond"],
         "test_terms_bpd": res["terms"], "test_terms_bpd_uncond": res["terms_uncond"],
         "test_count": res["count"], "test_dequant_samples": res["dequant_samples"],
         "class_conditional": res["class_conditional"]}
  if "bpd_iw" in res:
    out.update(test_bpd_iw=res["bpd_iw"], test_bpd_iw_uncond=res["bpd_iw_uncond"])
  return out


def quality_scalars(quality):
  """TensorBoard scalars of the MNIST sample-quality block of summary.json."""
  return {f"{name}_{k}": v for name, block in quality.items() if isinstance(block, dict)
          for k, v in block.items() if isinstance(v, (int, float))}


def format_test_bpd(summary):
  """'test bpd: 2.4200 (class-conditional), 2.5100 (unconditional)' from a train summary."""
  if not summary.get("class_conditional", True):
    return f"test bpd: {summary['test_bpd']:.4f} (unconditional model)"
  return (f"test bpd: {summary['test_bpd']:.4f} (class-conditional), "
          f"{summary['test_bpd_uncond']:.4f} (unconditional)")
