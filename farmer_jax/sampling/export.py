"""Exported models: params only (EMA params if the run kept them) + the resolved config, in Orbax's standard format.

Layout of an export directory:
  DIR/export.json   format version, source run + step, which params (ema/raw), param dtype
  DIR/config.json   the run's resolved config (the model is rebuilt from it; no training code involved)
  DIR/params/       Orbax StandardCheckpointer pytree of the params

The export is written to a temporary sibling directory and renamed into place, so a partially written export
never looks valid; an existing DIR is refused unless ``overwrite`` is set.
"""

import json
import os
import shutil
import uuid

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from farmer_jax.config import ConfigError, upgrade_saved_config, validate

FORMAT_VERSION = 1
PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ExportError(ValueError):
  """A model directory is missing, incomplete or corrupt, or an export target is not usable."""


def load_run_config(workdir):
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ExportError(f"{workdir} has no config.json; is it a farmer_jax training workdir?")
  with open(path) as f:
    return upgrade_saved_config(ml_collections.ConfigDict(json.load(f)))


def latest_run_params(workdir):
  """(params, step, used_ema) from the latest checkpoint of a training workdir (EMA params if present)."""
  ckpt = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(ckpt):
    raise ExportError(f"{workdir} has no checkpoints/ directory; train first (farmer_jax train ...)")
  with ocp.CheckpointManager(ckpt, item_names=("state", "meta")) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise ExportError(f"{ckpt} holds no finished checkpoint")
    # No target: the params subtree is plain dicts, restored as-is (host arrays); no optimizer code needed.
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  use_ema = "ema" in state
  return state["ema" if use_ema else "params"], step, use_ema


def export_model(workdir, out, dtype="float32", overwrite=False):
  """Writes an export of the run in ``workdir`` to ``out``. Returns the metadata dict."""
  if dtype not in PARAM_DTYPES:
    raise ExportError(f"--dtype={dtype!r} is not supported; use one of {sorted(PARAM_DTYPES)}")
  out = os.path.abspath(out)
  if os.path.exists(out) and not overwrite:
    raise ExportError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
  config = load_run_config(workdir)
  validate(config)
  params, step, used_ema = latest_run_params(workdir)
  params = jax.tree.map(lambda a: jnp.asarray(a, PARAM_DTYPES[dtype]), params)
  meta = {"format_version": FORMAT_VERSION, "source_workdir": os.path.abspath(workdir), "step": int(step),
          "params": "ema" if used_ema else "raw", "dtype": dtype}
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    os.makedirs(tmp)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, "params"), params)
      ckptr.wait_until_finished()
    with open(os.path.join(tmp, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(tmp, "export.json"), "w") as f:   # written last: marks the export complete
      json.dump(meta, f, indent=2)
    if os.path.exists(out):
      shutil.rmtree(out)
    os.rename(tmp, out)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return meta


def load_model(model_dir):
  """Loads an export: returns (ModelConfig, params, run config, metadata). Needs no optimizer state."""
  from farmer_jax.model import abstract_params
  model_dir = os.path.abspath(model_dir)
  if not os.path.isdir(model_dir):
    raise ExportError(f"model directory {model_dir} does not exist; create one with `farmer_jax export`")
  for name in ("export.json", "config.json", "params"):
    if not os.path.exists(os.path.join(model_dir, name)):
      raise ExportError(f"{model_dir} is not a complete export (missing {name}); re-run `farmer_jax export`")
  try:
    with open(os.path.join(model_dir, "export.json")) as f:
      meta = json.load(f)
    with open(os.path.join(model_dir, "config.json")) as f:
      config = upgrade_saved_config(ml_collections.ConfigDict(json.load(f)))
  except (json.JSONDecodeError, OSError) as e:
    raise ExportError(f"{model_dir}: corrupt metadata ({e}); re-run `farmer_jax export`") from e
  if meta.get("format_version") != FORMAT_VERSION:
    raise ExportError(f"{model_dir}: export format {meta.get('format_version')} is not {FORMAT_VERSION}")
  try:
    mcfg = validate(config)
  except ConfigError as e:
    raise ExportError(f"{model_dir}: its config.json is invalid: {e}") from e
  dt = PARAM_DTYPES[meta["dtype"]]
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dt), abstract_params(mcfg))
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(os.path.join(model_dir, "params"), abstract)
  except Exception as e:
    raise ExportError(f"{model_dir}: params could not be restored ({type(e).__name__}: {e}); "
                      "the export is corrupt or from another config") from e
  return mcfg, params, config, meta
