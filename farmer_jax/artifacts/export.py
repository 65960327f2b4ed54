"""Exported models: params only (EMA params if the run kept them) + the resolved config, in Orbax's
standard format. The layout of an export directory is ``runs.ExportDir``'s.

The export is written to a temporary sibling directory and renamed into place, so a partially
written export never looks valid. An existing DIR is refused unless ``overwrite`` is set, and even
then only a previous export (and never a directory holding the source run, a file, or anything
else) is replaced.
"""

import errno
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from farmer_jax import untrusted
from farmer_jax.artifacts import runs, storage
from farmer_jax.artifacts.checkpoint import Checkpointer, UnreadableCheckpoints, os_error_in
from farmer_jax.config.parse import parse_model
from farmer_jax.config.schema import DTYPE_NAMES, jnp_dtype
from farmer_jax.errors import ConfigError, UserError, brief

FORMAT_VERSION = 1
# the export.json marker: only a directory carrying it is ever replaced
EXPORT_KIND = "farmer_jax_export"
PARAM_DTYPES = {name: jnp_dtype(name) for name in DTYPE_NAMES}


class ExportError(UserError):
  """A model directory is missing, incomplete or corrupt, or an export target is not usable."""


def load_run_config(workdir):
  config = runs.read_saved_config(workdir)
  if config is None:
    raise ExportError(f"{workdir} has no {runs.CONFIG}; is it a farmer_jax training workdir?")
  return config


def latest_run_params(workdir, say=print, step=None):
  """(params, step, used_ema) from the newest readable checkpoint of a training workdir (EMA params
  if present), or from checkpoint ``step`` exactly.

  The run's checkpoints are opened read-only: an unreadable (truncated/corrupt) newer checkpoint
  is reported through ``say`` and skipped, never moved or changed. If no checkpoint can be read (or
  ``step`` is not kept, or cannot be read), raises ExportError.
  """
  ckpt = Checkpointer(runs.RunDir(workdir).checkpoints, read_only=True)
  if not storage.isdir(ckpt.directory):
    raise ExportError(f"{workdir} has no {runs.CHECKPOINTS}/ directory; train first "
                      "(farmer_jax train ...)")
  try:
    steps = ckpt.steps()
    if step is not None:
      state = _restore_step(ckpt, workdir, step, steps)
    else:
      # No target: the params subtree is plain dicts, restored as saved; no optimizer code needed.
      restored = ckpt.restore_latest(say=say)
      if restored is None:
        raise ExportError(f"{ckpt.directory} holds no finished checkpoint; train first "
                          "(farmer_jax train ...)")
      state, _, step = restored
      skipped = [s for s in steps if s > step]
      if skipped:
        say(f"exporting checkpoint step {step}, the newest readable one (skipped {len(skipped)} "
            "unreadable newer one(s); the run was not modified)")
  except UnreadableCheckpoints as e:
    raise ExportError(f"no checkpoint in {e.directory} could be read (all {len(e.errors)} are "
                      "truncated or corrupt): " + " | ".join(e.errors)) from None
  finally:
    ckpt.close()
  key = "ema" if "ema" in state else "params"
  return state[key], step, key == "ema"


def _restore_step(ckpt, workdir, step, steps):
  """The state of checkpoint ``step`` of a run whose kept steps are ``steps``; ExportError if it is
  not kept or cannot be read."""
  if step not in steps:
    kept = ", ".join(map(str, steps)) if steps else "none"
    raise ExportError(f"{workdir} keeps no checkpoint of step {step} (kept: {kept}). Fix: pass "
                      "one of the kept steps, or leave --step out for the newest")
  try:
    return ckpt.restore(step)[0]
  except Exception as e:  # noqa: BLE001 - any failure to read is a corrupt checkpoint
    raise ExportError(f"checkpoint step {step} of {workdir} could not be read ({brief(e)}). Fix: "
                      "pass another kept step, or leave --step out for the newest readable "
                      "one") from None


def _non_finite_report(params):
  """'' if every value is finite, else 'N NaN and M inf values in K param(s): path (n), ...'."""
  bad, nan, inf = [], 0, 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    a = np.asarray(jax.device_get(leaf)).astype(np.float32)
    n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    if n_nan or n_inf:
      nan, inf = nan + n_nan, inf + n_inf
      bad.append(
          f"{jax.tree_util.keystr(path, simple=True, separator='/')} ({n_nan} NaN, {n_inf} inf)")
  if not bad:
    return ""
  shown = ", ".join(bad[:10]) + (f", ... ({len(bad) - 10} more)" if len(bad) > 10 else "")
  return f"{nan} NaN and {inf} inf values in {len(bad)} param(s): {shown}"


def is_export_dir(path):
  """True if ``path`` (local or a bucket URL) is a directory written by export_model: its
  export.json carries our marker, or (format 1, before the marker existed) format_version 1 with
  config.json and params/ beside it."""
  d = runs.ExportDir(path)
  try:
    meta = json.loads(storage.read_text(d.meta))
  except (OSError, ValueError):
    return False
  if not isinstance(meta, dict):
    return False
  if meta.get("kind") == EXPORT_KIND:
    return True
  return (meta.get("format_version") == 1 and storage.exists(d.config)
          and storage.isdir(d.params))


def check_export_target(workdir, out, overwrite):
  """Refuses an --out that export must not write or replace, before any checkpoint is read. Returns
  ``out`` made absolute (a bucket URL is kept as given). ``workdir``: what the export is made from
  (a run, a checkpoint file; None: nothing to protect), which --overwrite must never delete. Either
  may be local or in a bucket (gs://...)."""
  if storage.is_url(out):
    out = out.rstrip("/")
    if not storage.exists(out):
      return out
  else:
    out = os.path.abspath(out)
    if os.path.lexists(out) and not os.path.isdir(out):
      raise ExportError(
          f"--out={out} exists and is not a directory; export writes a directory, so choose "
          "another --out (--overwrite only replaces a previous export directory)")
    if not os.path.exists(out):
      if os.path.lexists(out):
        raise ExportError(
            f"--out={out} is a broken symbolic link; remove it or choose another --out")
      up = storage.nearest_existing(os.path.dirname(out))
      if not os.path.isdir(up):
        raise ExportError(f"--out={out} cannot be created: {up} is a file, not a directory; "
                          "choose another --out")
      return out
  if not overwrite:
    raise ExportError(
        f"{out} already exists. Fix: pass --overwrite to replace it (only a previous export can "
        "be replaced) or choose another --out")
  if os.path.islink(out):
    raise ExportError(
        f"--out={out} is a symbolic link; --overwrite does not replace links: pass the "
        f"directory it points to ({os.path.realpath(out)}) or choose another --out")
  real_out = _real(out)
  real_run = None if workdir is None else _real(workdir)
  if real_run is not None and storage.within(real_run, real_out):
    what = ("is the training run itself" if real_run == real_out
            else f"contains {real_run}, which it is exported from")
    raise ExportError(
        f"--out={out} {what}; --overwrite would delete it. Leave it as it is and choose "
        "another --out outside the run (e.g. a sibling directory)")
  entries = set(storage.listdir(out))
  if not (is_export_dir(out) or _unfinished_in_bucket(out, entries)):
    raise ExportError(f"--out={out} is not a farmer_jax export (no valid {runs.EXPORT_META} "
                      "marker), so --overwrite will not replace it. Fix: choose another --out, or "
                      "move that directory away yourself")
  extra = sorted(entries - runs.EXPORT_ENTRIES)
  if extra:
    raise ExportError(
        f"--out={out} is an export but also holds files export did not write "
        f"({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}); --overwrite would delete "
        "them. Fix: move them out or choose another --out")
  return out


def _unfinished_in_bucket(out, entries):
  """True for a bucket folder an interrupted export left: no export.json, and nothing but what an
  export writes (an object store has no rename, so an export there is written in place)."""
  return (storage.is_url(out) and runs.EXPORT_META not in entries
          and bool(entries) and entries <= runs.EXPORT_ENTRIES)


def _real(path):
  """A local path resolved (links followed); a URL without its trailing slashes."""
  path = os.fspath(path)
  return path.rstrip("/") if storage.is_url(path) else os.path.realpath(path)


def export_model(workdir, out, dtype="float32", overwrite=False, say=print, student=None,
                 step=None):
  """Writes an export of the run in ``workdir`` to ``out`` (local, or a bucket URL: see
  ``write_export``). Returns the metadata dict. ``step``: the checkpoint to export (one the run
  keeps); None: the newest readable one.

  ``student``: a ``farmer_jax distill`` run of this model; its newest readable student params
  are exported too (``OUT/student/``, for ``sample --inverse=student``).

  Every refusal (unusable target, missing or unreadable run, non-finite params) happens before
  anything is written. With ``overwrite``, only a previous export is replaced: the new one is built
  in a temporary sibling, the old one is renamed aside, the new one renamed in, and only then is the
  old one deleted; an interruption at any point leaves either the old or the new export at ``out``
  and no temporary directory.
  """
  if dtype not in PARAM_DTYPES:
    raise ExportError(f"--dtype={dtype!r} is not supported; use one of {sorted(PARAM_DTYPES)}")
  out = check_export_target(workdir, out, overwrite)
  config = load_run_config(workdir)
  parse_model(config)
  params, step, used_ema = latest_run_params(workdir, say=say, step=step)
  report = _non_finite_report(params)
  if report:
    raise ExportError(
        f"checkpoint step {step} of {workdir} is not finite: {report}; nothing was exported. "
        "Fix: export an earlier checkpoint (--step=N, one the run keeps) or retrain with a "
        "lower lr")
  student_params, student_meta = None, None
  if student is not None:
    student_params, student_meta = _student_of(student, config, say)
    student_params = jax.tree.map(lambda a: jnp.asarray(a, PARAM_DTYPES[dtype]), student_params)
  params = jax.tree.map(lambda a: jnp.asarray(a, PARAM_DTYPES[dtype]), params)
  report = _non_finite_report(params) or _non_finite_report(student_params or {})
  if report:
    raise ExportError(
        f"casting checkpoint step {step} to {dtype} overflows: {report}; export with "
        "--dtype=float32"
    )
  meta = {
      "kind": EXPORT_KIND,
      "format_version": FORMAT_VERSION,
      "source_workdir": storage.absolute(workdir),
      "step": int(step),
      "params": "ema" if used_ema else "raw",
      "dtype": dtype
  }
  if student_meta is not None:
    meta["student"] = student_meta
  write_export(out, params, config, meta, overwrite, workdir, student_params)
  return meta


def write_export(out, params, config, meta, overwrite=False, source=None, student_params=None,
                 latent_var=None):
  """Writes an export directory: params (and the student's) with Orbax, config.json,
  ``latent_var.npy`` if given (N, d) float32, then export.json (``meta``, written last: it marks
  the export complete). ``source``: the path the export is made from (a run directory or checkpoint
  file), which ``check_export_target`` never lets ``out`` delete.

  A local ``out`` is built in a temporary sibling and renamed into place; with ``overwrite`` a
  previous export there is replaced only after the new one is complete (see ``export_model``). A
  bucket has no rename: a previous export at a URL ``out`` loses its export.json first (from then
  on nothing reads it as an export), is deleted, and the new one is written in place, export.json
  last. A failure deletes what was written; a kill leaves an unfinished export without
  export.json, which nothing reads as complete and which --overwrite replaces."""
  def fill(directory):
    new = runs.ExportDir(directory)
    try:
      with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(new.params, params)
        if student_params is not None:
          ckptr.save(new.student, student_params)
        ckptr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - a filesystem failure (ENOSPC, ...) is the user's
      err = os_error_in(e)
      if err is None:
        raise
      fix = {errno.ENOSPC: "free space on its filesystem", errno.EDQUOT: "free space on its "
             "filesystem", errno.EFBIG: "raise the file size limit (ulimit -f)"}.get(
                 err.errno, "check that its folder is writable")
      raise ExportError(f"--out={out}: writing the params failed: [Errno {err.errno}] "
                        f"{err.strerror}; nothing was exported. Fix: {fix}, or choose another "
                        "--out") from e
    runs.write_saved_config(directory, config)
    if latent_var is not None:
      buf = io.BytesIO()
      np.save(buf, np.asarray(latent_var, np.float32))
      storage.write_bytes(new.latent_var, buf.getvalue())
    storage.write_text(new.meta, json.dumps(meta, indent=2))   # last: marks the export complete

  if not storage.is_url(out):
    with storage.staged_dir(out, lambda o: check_export_target(source, o, overwrite)) as tmp:
      fill(tmp)
    return
  out = check_export_target(source, out, overwrite)   # again: it may have changed meanwhile
  if storage.exists(out):
    storage.remove(runs.ExportDir(out).meta)
    storage.rmtree(out)
  try:
    fill(out)
  except BaseException:
    try:
      storage.rmtree(out)   # what was written, so that a failed export leaves nothing behind
    except Exception:  # noqa: BLE001 - best effort; the failure that matters is re-raised
      pass
    raise


def _student_of(student_run, config, say):
  """(student params, metadata) of a distill run, refused unless it distilled this model."""
  from farmer_jax.config.resume import config_changes
  student_config = runs.read_saved_config(student_run)
  if student_config is None:
    raise ExportError(f"--student={student_run} is not a `farmer_jax distill` run (no "
                      f"{runs.CONFIG}); pass the distill --workdir")
  diff = [d for d in config_changes(config, student_config) if d.startswith("model.")]
  if diff:
    raise ExportError(f"--student={student_run} distilled another model ({'; '.join(diff)}); "
                      "pass the distill run of this model")
  params, step, ema = latest_run_params(student_run, say=say)
  report = _non_finite_report(params)
  if report:
    raise ExportError(f"the student of {student_run} is not finite at step {step}: {report}")
  return params, {"source_workdir": storage.absolute(student_run), "step": int(step),
                  "params": "ema" if ema else "raw"}


def load_student(model_dir, mcfg, meta):
  """The distilled student's params of an export, or None if it carries none."""
  from farmer_jax.model import abstract_params
  if "student" not in meta:
    return None
  dt = PARAM_DTYPES[meta["dtype"]]
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dt), abstract_params(mcfg))
  return _restore_checked(runs.ExportDir(storage.absolute(model_dir)).student, abstract["flow"],
                          f"{model_dir}: the student's params",
                          "re-run `farmer_jax export --student=...`")


def _restore_checked(path, abstract, what, fix):
  """Restores the Orbax pytree at ``path`` as ``abstract`` after checking that its stored tree and
  shapes are exactly those (Orbax itself restores the stored shapes whatever it is asked for).

  Each process of a multi-process job reads the whole tree by itself, onto its first local device,
  with no cross-process barrier (an export is read, never written, here)."""
  me = jax.process_index()
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local),
                          abstract)
  alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
  try:
    with ocp.StandardCheckpointer(multiprocessing_options=alone) as ckptr:
      item = ckptr.metadata(path).item_metadata
      stored = dict(_shapes(getattr(item, "tree", item))) if item is not None else {}
      if not stored:
        raise ExportError(f"{what} could not be restored ({path} holds no Orbax checkpoint). "
                          f"Fix: {fix}")
      want = dict(_shapes(abstract))
      bad = [f"{k}: stored {stored[k]}, the config gives {want[k]}"
             for k in want if k in stored and stored[k] != want[k]]
      bad += [f"{k} missing" for k in want if k not in stored]
      bad += [f"{k} not in the model" for k in stored if k not in want]
      if bad:
        raise ExportError(
            f"{what} do not match its {runs.CONFIG} ({len(bad)} param(s): "
            f"{'; '.join(bad[:3])}{'; ...' if len(bad) > 3 else ''}); the export is corrupt or "
            f"its {runs.CONFIG} was changed. Fix: {fix}")
      return ckptr.restore(path, abstract)
  except ExportError:
    raise
  except Exception as e:  # noqa: BLE001 - any failure to read is a corrupt export
    raise ExportError(f"{what} could not be restored ({brief(e)}). Fix: {fix}") from e


def _shapes(tree):
  """[('a/b/c', shape tuple)] of a pytree of arrays, ShapeDtypeStructs or Orbax metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return [(jax.tree_util.keystr(p, simple=True, separator="/"), tuple(getattr(x, "shape", ())))
          for p, x in leaves]


def _read_meta(model_dir):
  """export.json, checked: a JSON object of our format with a known dtype."""
  path = runs.ExportDir(model_dir).meta
  try:
    meta = json.loads(storage.read_text(path))
  except (OSError, ValueError) as e:
    raise ExportError(f"{path}: unreadable ({brief(e)}). Fix: re-run `farmer_jax export`") from None
  if not isinstance(meta, dict):
    raise ExportError(f"{path}: holds a JSON {type(meta).__name__}, not an object. Fix: re-run "
                      "`farmer_jax export`")
  version = meta.get("format_version")
  if isinstance(version, bool) or version != FORMAT_VERSION:
    raise ExportError(f"{path}: export format {str(meta.get('format_version'))[:40]!r} is not "
                      f"{FORMAT_VERSION}. Fix: re-run `farmer_jax export` with this version")
  if "kind" in meta and meta["kind"] != EXPORT_KIND:
    raise ExportError(f"{path}: kind {str(meta['kind'])[:40]!r} is not {EXPORT_KIND!r}; this is "
                      "not a farmer_jax export")
  if not isinstance(meta.get("dtype"), str) or meta["dtype"] not in PARAM_DTYPES:
    raise ExportError(f"{path}: dtype {str(meta.get('dtype'))[:40]!r} is not one of "
                      f"{sorted(PARAM_DTYPES)}. Fix: re-run `farmer_jax export`")
  if "student" in meta and not isinstance(meta["student"], dict):
    raise ExportError(f"{path}: 'student' is not an object. Fix: re-run `farmer_jax export`")
  return meta


def load_latent_var(model_dir, mcfg, meta):
  """The latent variance (N, d) an export carries (a converted TARFlow VP model's ``var``: its
  sampler draws z * sqrt(var)), or None."""
  if not meta.get("latent_var"):
    return None
  path = runs.ExportDir(storage.absolute(model_dir)).latent_var
  want = (mcfg.num_tokens, mcfg.token_dim)
  try:
    var = untrusted.load_npy(path)
  except (OSError, ValueError) as e:
    raise ExportError(f"{model_dir}: {os.path.basename(path)} could not be read ({e}); convert "
                      "the model again") from e
  if var.dtype.kind != "f":
    raise ExportError(f"{model_dir}: {os.path.basename(path)} holds {var.dtype} values, not "
                      "floats; convert the model again")
  if var.shape != want or not np.all(np.isfinite(var)) or np.any(var < 0):
    raise ExportError(f"{model_dir}: {os.path.basename(path)} has shape {var.shape} (want {want}) "
                      "or non-finite/negative values; convert the model again")
  return var


def load_model(model_dir):
  """Loads an export, local or in a bucket (gs://...): returns (ModelConfig, params, run config,
  metadata). Needs no optimizer state."""
  from farmer_jax.model import abstract_params
  model_dir = storage.absolute(model_dir)
  if not storage.isdir(model_dir):
    raise ExportError(
        f"model directory {model_dir} does not exist; create one with `farmer_jax export`")
  d = runs.ExportDir(model_dir)
  for name in (runs.EXPORT_META, runs.CONFIG, runs.EXPORT_PARAMS):
    if not storage.exists(storage.join(model_dir, name)):
      raise ExportError(f"{model_dir} is not a complete export (missing {name}); re-run "
                        "`farmer_jax export`")
  meta = _read_meta(model_dir)
  try:
    config = runs.read_saved_config(model_dir)
  except (ValueError, TypeError, AttributeError, OSError) as e:   # not JSON, or not an object
    raise ExportError(
        f"{d.config}: unreadable ({brief(e)}). Fix: re-run `farmer_jax export`") from None
  try:
    mcfg = parse_model(config)
  except ConfigError as e:
    raise ExportError(f"{model_dir}: its {runs.CONFIG} is invalid: {e}") from e
  dt = PARAM_DTYPES[meta["dtype"]]
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dt), abstract_params(mcfg))
  params = _restore_checked(d.params, abstract, f"{model_dir}: the params",
                            "re-run `farmer_jax export` from the training run")
  return mcfg, params, config, meta
