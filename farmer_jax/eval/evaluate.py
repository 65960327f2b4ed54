"""Exact bits/dim of a training run or an export over a whole split (what `farmer_jax eval` runs).

Every example exactly once (masked padding), sharded over all devices and processes with the run's
own mesh and sharding rules (falling back to a pure data-parallel mesh when that mesh does not fit
the devices at hand), one compiled step, K uniform dequantization draws per image
(eval/likelihood.py). The result is JSON, by default next to the model
(``RUN/eval/bpd_<split>.json`` or ``EXPORT/eval/bpd_<split>.json``).
"""

import dataclasses
import json
import os
import posixpath

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from farmer_jax import sharding
from farmer_jax.artifacts import storage
from farmer_jax.config.parse import parse_model
from farmer_jax.config.schema import DataConfig
from farmer_jax.errors import UserError
from farmer_jax.eval.likelihood import evaluate_batches
from farmer_jax.model import Farmer, abstract_params

EVAL_DIR = "eval"


def load_params(workdir=None, model_dir=None, say=print, step=None):
  """(run config, ModelConfig, host params, source) of a training run (its newest readable
  checkpoint, or checkpoint ``step``; EMA params if kept) or of an export."""
  from farmer_jax.artifacts.export import latest_run_params, load_model, load_run_config
  if (workdir is None) == (model_dir is None):
    raise UserError("pass exactly one of --workdir (a training run) and --model (an export)")
  if workdir is not None:
    config = load_run_config(workdir)
    mcfg = parse_model(config)
    params, step, ema = latest_run_params(workdir, say=say, step=step)
    source = {"workdir": storage.absolute(workdir), "step": int(step),
              "params": "ema" if ema else "raw"}
  else:
    mcfg, params, config, meta = load_model(model_dir)
    source = {"model": storage.absolute(model_dir), "step": meta.get("step"),
              "params": meta.get("params"), "dtype": meta.get("dtype")}
  params = jax.tree.map(_host_array, params)
  want = jax.tree.structure(abstract_params(mcfg))
  if jax.tree.structure(params) != want:
    where = workdir if workdir is not None else model_dir
    raise UserError(f"{where} does not hold a FARMER model's params (e.g. a `farmer_jax distill` "
                    "run holds only the student). Fix: evaluate the teacher's training run or an "
                    "export (farmer_jax export)")
  return config, mcfg, params, source


def _host_array(a):
  """A param as a float32 numpy array on this host. A run's checkpoint restores as it was saved:
  with several processes its arrays span other processes' devices, which only a gather of all
  processes (every one calls it, in the same order) brings to each host."""
  if isinstance(a, jax.Array) and not a.is_fully_addressable:
    a = multihost_utils.process_allgather(a, tiled=True)
  return np.asarray(jax.device_get(a), np.float32)


def params_on_mesh(config, mcfg, params, say=print):
  """Host ``params`` of the model ``mcfg`` on the run ``config``'s mesh (``sharding.fitting_mesh``)
  with its sharding rules and FSDP, as in training: (mesh, logical rules, global params)."""
  mesh = sharding.fitting_mesh(config, say)
  rules = sharding.logical_rules(config.sharding_rules)
  param_sh = sharding.param_shardings(abstract_params(mcfg, boxed=True), mesh, rules,
                                      config.get("fsdp"))
  return mesh, rules, sharding.host_to_global(params, param_sh)


def result_path(base, split):
  """Where the result of evaluating a run or export at ``base`` on ``split`` goes by default."""
  return storage.join(base, EVAL_DIR, f"bpd_{split}.json")


def eval_data(config, data_dir=None):
  """The run config's DataConfig, read from ``data_dir`` when given."""
  data = DataConfig.from_section(config.data)
  if data_dir is not None:
    data = dataclasses.replace(data, data_dir=data_dir)
  return data


def evaluate_split(config, mcfg, params, data, split, samples, batch_size, seed=0,
                   progress=True, say=print):
  """Bits/dim of host ``params`` over every example of ``split`` of ``data`` (``samples``
  dequantization draws each), sharded with the run ``config``'s mesh and rules
  (``params_on_mesh``) at about ``batch_size`` globally. Returns (the result of
  ``evaluate_batches``, the global batch); refuses (FloatingPointError) a non-finite bits/dim."""
  from farmer_jax.data import pipeline
  mesh, rules, dev_params = params_on_mesh(config, mcfg, params, say)
  gb = sharding.padded_batch_size(batch_size, mesh, rules)
  batches, steps, n = pipeline.eval_batches(data, split, gb, jax.process_index(),
                                            jax.process_count())
  batch_sh = sharding.batch_sharding(mesh, rules)
  with sharding.mesh_context(mesh, rules):
    show = progress and jax.process_index() == 0
    say(f"bits/dim of {data.name} split {split!r}: {n} images, {samples} dequantization draw(s) "
        f"each, batch {gb} on mesh {dict(mesh.shape)}, {jax.process_count()} process(es)")
    bar = tqdm(total=n, desc="eval bpd", disable=not show, dynamic_ncols=True)
    res = evaluate_batches(Farmer(mcfg), dev_params, batches, steps,
                           put=lambda b: sharding.global_batch(b, mesh, batch_sh), seed=seed,
                           samples=samples, progress=lambda done: bar.update(done - bar.n),
                           out_sharding=sharding.replicated(mesh))
    bar.close()
  if not (np.isfinite(res["bpd"]) and np.isfinite(res["bpd_uncond"])):
    raise FloatingPointError(f"bits/dim is not finite ({res['bpd']}, unconditional "
                             f"{res['bpd_uncond']}); nothing was written. Fix: check the model "
                             "(a diverged run or a corrupt export)")
  return res, gb


def bpd_result(res, source, data, mcfg, split, seed, batch_size, seconds):
  """The result JSON of an evaluation: ``res`` (``evaluate_split``) with what was evaluated
  (``source``: ``load_params``'), on what, and how."""
  return {"split": split, "dataset": data.name, "prior": mcfg.prior, "seed": int(seed),
          "batch_size": batch_size,
          "devices": jax.device_count(), "processes": jax.process_count(), **source, **res,
          "seconds": seconds}


def write_result(path, result):
  """Writes ``result`` as JSON at ``path`` (local or a bucket; its folder is created), from
  process 0."""
  if jax.process_index() == 0:
    storage.makedirs(posixpath.dirname(path) if storage.is_url(path)
                     else os.path.dirname(os.path.abspath(path)))
    storage.write_text(path, json.dumps(result, indent=2))


def format_result(r):
  """The console lines of a result."""
  def line(suffix):
    iw = f"; importance-weighted bound {r['bpd_iw' + suffix]:.4f}" if "bpd_iw" in r else ""
    se = r["bpd_se" + suffix]
    se = f" +- {se:.4f} (s.e. over images)" if se is not None else " (one image: no s.e.)"
    return f"{r['bpd' + suffix]:.4f}{se}{iw}"

  def terms(suffix):
    t = r["terms" + suffix]
    if r.get("prior") == "standard_normal":
      return (f"-log det (AF) {t['af_logdet']:+.4f}, N(0, I) prior {t['informative']:+.4f}, "
              f"bin width {t['bin_width']:+.4f}")
    return (f"-log det (AF) {t['af_logdet']:+.4f}, Z^I {t['informative']:+.4f}, "
            f"Z^R {t['redundant']:+.4f}, bin width {t['bin_width']:+.4f}")

  head = (f"bits/dim on {r['dataset']} {r['split']} ({r['count']} images, "
          f"{r['dequant_samples']} uniform dequantization draw(s) each, seed {r['seed']})")
  if not r["class_conditional"]:
    return f"{head}\n  unconditional model: {line('')}\n  terms (bits/dim): {terms('')}"
  return (f"{head}\n  class-conditional -log p(x|y): {line('')}\n"
          f"  unconditional -log p(x|null):   {line('_uncond')}\n"
          f"  terms, conditional (bits/dim):   {terms('')}\n"
          f"  terms, unconditional (bits/dim): {terms('_uncond')}")

