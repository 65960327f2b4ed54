"""The ``farmer_jax`` console script: ``farmer_jax <command> --flags``; also
``python -m farmer_jax``.

Commands: train, distill, export, sample, eval, fid, prepare, check, convert.

  farmer_jax train --config=configs/quickstart.py --workdir=/tmp/run [--config.train.steps=500]
  farmer_jax distill --config=configs/quickstart.py:distill=1 --teacher=/tmp/run --workdir=/tmp/s
  farmer_jax export --workdir=/tmp/run --out=/tmp/model [--dtype=bfloat16] [--overwrite]
  farmer_jax sample --model=/tmp/model --classes=0,1,2 --num=8 --cfg=2.0 --seed=0 --out=grid.png \\
      [--npz=s.npz]
  farmer_jax eval --workdir=/tmp/run | --model=/tmp/model [--split=test] [--dequant_samples=4]
  farmer_jax fid --model=/tmp/model --ref=ref.npz --inception=pt_inception.pth --num=50000 \
      [--cfg=2.0] [--out=fid.json]
  farmer_jax prepare --folder=/data/photos --data_dir=/data/tfds --name=photos [--image_size=256]
  farmer_jax check --config=configs/imagenet256.py:1.1B/16 --workdir=gs://b/run --devices=64 \
      --processes=16
  farmer_jax convert --from=tarflow --ckpt=afhq_model_8_768_8_8_0.07.pth --out=/tmp/afhq \
      [--config=configs/tarflow.py:afhq256 --config.data.name=tfds:afhq] [--pixels=tarflow]
  farmer_jax convert --to=tarflow --model=/tmp/afhq --out=afhq.pth

Errors: a bad value (config field, flag, path) is refused before any work or any file is
written. Every expected failure prints ONE line ``farmer_jax <command>: <message>`` as the last
line on stderr and exits 2 (a non-finite training loss exits 1); ``--debug`` also prints the
traceback. A traceback without ``--debug`` means a bug.
"""

import errno
import logging as std_logging
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from farmer_jax.config import (  # config.py does not import jax
    DTYPE_NAMES, GUIDANCE_MODES, INVERSES, SAMPLER_FIELDS, SAMPLER_KEYS, SamplerConfig)
from farmer_jax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (optionally ':arg').",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for logs, checkpoints and samples.")
flags.DEFINE_bool("quiet", False, "No progress bars or console logs.")
flags.DEFINE_bool("verbose", False, "Show library INFO logs (orbax, absl).")
flags.DEFINE_bool(
    "debug", False,
    "On an expected failure, also print the full traceback (tracebacks are otherwise "
    "shown only for bugs).")
flags.DEFINE_bool(
    "config_change_ok", False, "train: allow resuming a workdir whose saved config.json differs in "
    "data/model settings (refused by default: the checkpoint's params would mean something else).")
# multi-process (multi-host) launch
flags.DEFINE_enum(
    "distributed", "off", ["off", "auto", "explicit"],
    "train: 'auto' = jax.distributed.initialize() with cluster auto-detection "
    "(Cloud TPU pods, SLURM); "
    "'explicit' = use --coordinator_address/--num_processes/--process_id.")
flags.DEFINE_string("coordinator_address", None,
                    "train: host:port of process 0 (with --distributed=explicit).")
flags.DEFINE_integer("num_processes", None,
                     "train: number of processes (with --distributed=explicit).")
flags.DEFINE_integer("process_id", None,
                     "train: this process's index (with --distributed=explicit).")
# export
flags.DEFINE_string("out", None, "export: output model directory; sample: output PNG grid (*.png); "
                    "eval/fid: the JSON result (default: next to the model).")
flags.DEFINE_enum("dtype", "float32", list(DTYPE_NAMES), "export: param dtype to store.")
flags.DEFINE_string("student", None,
                    "export: also export the distilled student of this distill --workdir.")
flags.DEFINE_bool("overwrite", False,
                  "export: replace an existing --out directory; prepare: an existing dataset.")
# sample
flags.DEFINE_string("model", None, "sample: an exported model directory (farmer_jax export).")
flags.DEFINE_string("classes", "all",
                    "sample: comma-separated class ids, 'null' for unconditional, or 'all'.")
flags.DEFINE_integer("num", 8, "sample: samples per class; fid: samples in all (default 50000, "
                     "class-balanced).")
flags.DEFINE_float("cfg", None,
                   "sample: guidance scale w (default: the model config's sample.cfg).")
flags.DEFINE_enum("inverse", None, list(INVERSES),
                  "sample: the AF inverse: exact (sequential), jacobi (parallel fixed-point; "
                  "--sampler=jacobi_tol=...,jacobi_max_iters=...) or student (the distilled "
                  "one-step inverse the export carries). Default: the config's.")
flags.DEFINE_enum("guidance", None, list(GUIDANCE_MODES),
                  "sample: guidance method (default: resampling if cfg > 0 else the config's).")
# --sampler takes every sampler setting (SAMPLER_KEYS); the help lists those without their own flag
flags.DEFINE_string("sampler", None, "sample: extra sampler settings 'k=v,...' ("
                    + ", ".join(k for k in SAMPLER_KEYS if k not in ("guidance", "cfg", "inverse"))
                    + ").")
flags.DEFINE_integer("seed", 0, "sample: RNG seed (sample j uses fold_in(seed, j)); eval: the "
                     "dequantization seed.")
flags.DEFINE_integer("batch", 64, "sample: batch size (results do not depend on it); eval: global "
                     "batch (default: config.eval.batch_size).")
flags.DEFINE_string("npz", None,
                    "sample: also write uint8 images + labels to this .npz (for FID tools).")

flags.DEFINE_string("compilation_cache_dir", None,
                    "train/distill: persistent XLA compilation cache (local or gs://), shared by "
                    "restarts.")
# distill
flags.DEFINE_string("teacher", None,
                    "distill: the pretrained model, a training workdir or an export directory.")
# check
flags.DEFINE_integer("devices", None, "check: devices of the target machine(s) (default: these).")
flags.DEFINE_integer("processes", None, "check: processes (hosts) of the target (default: 1).")
# prepare
flags.DEFINE_string("split", None,
                    "eval: the split to evaluate (default: the run's config.eval.split).")
flags.DEFINE_integer("dequant_samples", None,
                     "eval: uniform dequantization draws per image (default: config.eval's).")
flags.DEFINE_enum("features", "inception", ["inception", "mnist"],
                  "fid: the feature network: the FID Inception-v3 (--inception weights, --ref "
                  "statistics) or the MNIST digit CNN (offline; reference: the MNIST-5k test "
                  "split).")
flags.DEFINE_string("inception", None, "fid: the FID Inception weights file (pytorch-fid's "
                    "pt_inception-2015-12-05-6726825d.pth, or the same state_dict as .npz).")
flags.DEFINE_string("ref", None, "fid: reference .npz: mu/sigma (e.g. the ADM reference batch) "
                    "and/or images under 'arr_0'.")
flags.DEFINE_string("dump", None, "fid: the resumable feature dump directory (default: next to "
                    "the JSON result).")
flags.DEFINE_string("folder", None, "prepare: image folder, one subfolder per class.")
flags.DEFINE_string("data_dir", None, "prepare: where the dataset is written (DIR/NAME/1.0.0); "
                    "eval: where the run's tfds dataset is (default: its config.data.data_dir).")
flags.DEFINE_string("name", None, "prepare: dataset name; train with data.name=tfds:NAME.")
flags.DEFINE_integer("image_size", 256, "prepare: side of the square images (ADM center crop).")
flags.DEFINE_float("val_fraction", 0.0,
                   "prepare: fraction of each class in the 'validation' split (by path hash).")
flags.DEFINE_string("val_folder", None,
                    "prepare: a second folder (same class names) for the 'validation' split.")
flags.DEFINE_integer("channels", 3, "prepare: 3 (RGB) or 1 (grayscale).")
flags.DEFINE_enum("encoding", "jpeg", ["jpeg", "png"], "prepare: how images are stored.")
flags.DEFINE_integer("quality", 95, "prepare: JPEG quality.")
flags.DEFINE_integer("workers", None,
                     "prepare: decoding processes (default: the CPU count, at most 16; 0 = none).")

# convert
flags.DEFINE_enum("from", None, ["tarflow"], "convert: the format of --ckpt (a TARFlow "
                  "model.state_dict() .pth/.npz) to convert into an export at --out.")
flags.DEFINE_enum("to", None, ["tarflow"], "convert: write the AF of the export --model as a "
                  "TARFlow state_dict at --out (.pth or .npz).")
flags.DEFINE_string("ckpt", None, "convert: the checkpoint file to convert.")
flags.DEFINE_string("ckpt_key", None, "convert: the entry of a wrapping dict that holds the "
                    "state_dict (e.g. 'model').")
flags.DEFINE_enum("pixels", None, ["tarflow", "farmer"], "convert: the pixel mapping the "
                  "converted model expects: tarflow (2v/255 - 1, what TARFlow trains on; the "
                  "default) or farmer ((v + 0.5)/128 - 1; the default for *_uniform.pth).")
flags.DEFINE_float("noise_std", None, "convert: the Gaussian noise std the TARFlow model was "
                   "trained with (default: from its file name, e.g. ..._0.07.pth); its samples "
                   "are self-denoised with it.")

# OSErrors that describe the user's environment (missing path, permissions, disk full), not a bug
_EXPECTED_ERRNOS = {
    errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST,
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.ENOTEMPTY, errno.EXDEV,
    errno.EFBIG
}

# ----------------------------------------------------------------------------------------- commands


def _train(argv):
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/quickstart.py")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required, e.g. --workdir=/tmp/farmer_quickstart")
  from farmer_jax.distributed import initialize
  initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if FLAGS.compilation_cache_dir:
    import jax
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
  from farmer_jax.config import validate
  validate(FLAGS.config,
           FLAGS.workdir)  # the whole run config + workdir, before anything is written
  from farmer_jax.train.report import format_test_bpd
  from farmer_jax.train.trainer import train_and_report
  summary, _ = train_and_report(FLAGS.config, FLAGS.workdir, quiet=FLAGS.quiet,
                                config_change_ok=FLAGS.config_change_ok,
                                abandon=_preempted_during_startup)
  if _preempted(summary):
    return
  # class-conditional -log p(x|y) and unconditional -log p(x|null)
  print(format_test_bpd(summary))
  if "sample_quality" in summary:   # config.eval.mnist_quality
    from farmer_jax.eval.mnist_quality import format_quality
    print(format_quality(summary["sample_quality"]))


def _distill(argv):
  if FLAGS.config is None or not FLAGS.workdir or not FLAGS.teacher:
    raise app.UsageError("--config, --teacher (a training run or export) and --workdir (the "
                         "student's run) are required")
  from farmer_jax.distributed import initialize
  initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if FLAGS.compilation_cache_dir:
    import jax
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
  from farmer_jax.distill.trainer import distill_and_report
  summary, _ = distill_and_report(FLAGS.config, FLAGS.workdir, FLAGS.teacher, quiet=FLAGS.quiet,
                                  config_change_ok=FLAGS.config_change_ok,
                                  abandon=_preempted_during_startup)
  if _preempted(summary):
    return
  print(f"student reconstruction error (relative MSE): {summary['recon_rel_mse_student']:.4g} "
        f"(undistilled copy: {summary['recon_rel_mse_copy']:.4g})")


def _export(argv):
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError(
        "--workdir (a training run) and --out (the export directory) are required")
  # checks --out before reading any checkpoint
  from farmer_jax.sampling.export import export_model
  meta = export_model(FLAGS.workdir, FLAGS.out, FLAGS.dtype, FLAGS.overwrite,
                      student=FLAGS.student)
  print(f"exported step {meta['step']} ({meta['params']} params, {meta['dtype']}) -> {FLAGS.out}")


def _number(text):
  """'5' -> 5, '2.5' -> 2.5, 'nan' -> nan (validation refuses it with its own message); None if not
  a number."""
  text = text.strip()
  if re.fullmatch(r"[+-]?\d+", text):
    return int(text)
  try:
    return float(text)
  except ValueError:
    return None


def sampler_overrides(cfg_w, guidance, extra, inverse=None):
  """CLI flags -> dict of config.sample overrides. Integers stay integers (so ``s_c=2.5`` is
  refused, ``s_c=5`` accepted by SamplerConfig.from_config); unknown keys and non-numbers are
  refused here. The keys, and which are text (guidance), come from SAMPLER_FIELDS."""
  out = {}
  if cfg_w is not None:
    out["cfg"] = cfg_w
    if guidance is None:
      out["guidance"] = "resampling" if cfg_w > 0 else "none"
  if guidance is not None:
    out["guidance"] = guidance
  if inverse is not None:
    out["inverse"] = inverse
  if extra:
    for item in extra.split(","):
      if "=" not in item:
        raise UserError(
            f"--sampler entry {item!r} must be key=value (keys: {', '.join(SAMPLER_KEYS)})")
      k, v = (p.strip() for p in item.split("=", 1))
      if k not in SAMPLER_KEYS:
        raise UserError(
            f"--sampler={extra}: unknown setting {k!r}; known: {', '.join(SAMPLER_KEYS)}")
      if SAMPLER_FIELDS[k][2] is str:
        out[k] = v
        continue
      num = _number(v)
      if SAMPLER_FIELDS[k][2] is bool:   # true/false/1/0; SamplerConfig refuses anything else
        out[k] = v if num is None else num
        continue
      if num is None:
        raise UserError(f"--sampler={extra}: {k}={v!r} is not a number")
      out[k] = num
  return out


def _sampler_error(e):
  return UserError(
      f"sampler setting {e}. Fix: pass a valid --cfg, --guidance or --sampler value "
      "(the rest come from "
      "the model's config.sample)")


def _sample(argv):
  if not FLAGS.model or not (FLAGS.out or FLAGS.npz):
    raise app.UsageError(
        "--model (an export directory) and --out (PNG) or --npz are required")
  # Everything that does not need the model is checked before it is loaded and before any
  # sampling.
  if FLAGS.num < 1:
    raise UserError(f"--num={FLAGS.num} must be >= 1 (samples per class)")
  if FLAGS.batch < 1:
    raise UserError(f"--batch={FLAGS.batch} must be >= 1")
  from farmer_jax.sampling.generate import check_output_path
  for path, flag in ((FLAGS.out, "--out"), (FLAGS.npz, "--npz")):
    if path:
      check_output_path(path, flag)
  over = sampler_overrides(FLAGS.cfg, FLAGS.guidance, FLAGS.sampler, FLAGS.inverse)
  try:
    # the overrides alone (defaults elsewhere): fail before loading
    SamplerConfig.from_config(over)
  except ValueError as e:
    raise _sampler_error(e) from e
  from farmer_jax.config import check_sampler_for_model
  from farmer_jax.sampling.export import ExportError, load_latent_var, load_model, load_student
  from farmer_jax.sampling.generate import (
      check_output_size, describe_stats, generate, parse_classes, write_outputs)
  mcfg, params, config, meta = load_model(FLAGS.model)
  classes = parse_classes(FLAGS.classes, mcfg.num_classes)
  check_output_size(mcfg, classes, FLAGS.num, bool(FLAGS.out))
  sample = dict(config.get("sample", {}))
  sc = {k: v for k, v in sample.items() if k in SAMPLER_KEYS}   # the model's defaults
  sc.update(over)
  try:
    sampler = SamplerConfig.from_config(sc)
    check_sampler_for_model(sampler, mcfg)
  except ValueError as e:
    raise _sampler_error(e) from e
  student = None
  if sampler.inverse == "student":
    student = load_student(FLAGS.model, mcfg, meta)
    if student is None:
      raise ExportError(f"--inverse=student: {FLAGS.model} carries no distilled student. Fix: "
                        "export with `farmer_jax export --workdir=RUN --student=DISTILL_RUN`, or "
                        "use --inverse=exact|jacobi")
  images, labels, stats = generate(
      mcfg,
      params,
      classes,
      FLAGS.num,
      sampler,
      FLAGS.seed,
      FLAGS.batch,
      progress=not FLAGS.quiet,
      return_stats=True,
      student_params=student,
      latent_var=load_latent_var(FLAGS.model, mcfg, meta))
  write_outputs(images, labels, FLAGS.out, FLAGS.npz, stats)
  line = describe_stats(stats, sampler)
  if line:
    print(line)
  af = f", AF guidance {sampler.af_guidance}" if sampler.af_guidance else ""
  print(f"{images.shape[0] * images.shape[1]} samples ({sampler.guidance}, w={sampler.cfg.w}{af}) "
        f"-> {', '.join(p for p in (FLAGS.out, FLAGS.npz) if p)}")


def _eval(argv):
  if bool(FLAGS.workdir) == bool(FLAGS.model):
    raise app.UsageError("pass exactly one of --workdir (a training run) and --model (an export "
                         "directory)")
  from farmer_jax.distributed import initialize
  initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if FLAGS.compilation_cache_dir:
    import jax
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
  from farmer_jax.eval.evaluate import likelihood_eval
  likelihood_eval(workdir=FLAGS.workdir or None, model_dir=FLAGS.model or None,
                  split=FLAGS.split, dequant_samples=FLAGS.dequant_samples,
                  batch_size=FLAGS.batch if FLAGS["batch"].present else None,
                  data_dir=FLAGS.data_dir, seed=FLAGS.seed, out=FLAGS.out, quiet=FLAGS.quiet,
                  say=(lambda _: None) if FLAGS.quiet else print)


def _fid(argv):
  if not FLAGS.model:
    raise app.UsageError("--model (an export directory) is required, e.g. farmer_jax fid "
                         "--model=models/m --inception=pt_inception.pth --ref=ref.npz --num=50000")
  over = sampler_overrides(FLAGS.cfg, FLAGS.guidance, FLAGS.sampler, FLAGS.inverse)
  try:
    SamplerConfig.from_config(over)
  except ValueError as e:
    raise _sampler_error(e) from e
  if FLAGS.compilation_cache_dir:
    import jax
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
  from farmer_jax.eval.fid import fid_command
  fid_command(FLAGS.model, FLAGS.num if FLAGS["num"].present else 50000, FLAGS.features,
              FLAGS.inception, FLAGS.ref, over, seed=FLAGS.seed, batch=FLAGS.batch,
              out=FLAGS.out, dump=FLAGS.dump, quiet=FLAGS.quiet,
              say=(lambda _: None) if FLAGS.quiet else print)


def _prepare(argv):
  if not FLAGS.folder or not FLAGS.data_dir or not FLAGS.name:
    raise app.UsageError("--folder (one subfolder per class), --data_dir and --name are required")
  from farmer_jax.data.prepare import Options, prepare
  workers = FLAGS.workers if FLAGS.workers is not None else min(16, os.cpu_count() or 1)
  prepare(Options(folder=FLAGS.folder, data_dir=FLAGS.data_dir, name=FLAGS.name,
                  image_size=FLAGS.image_size, val_fraction=FLAGS.val_fraction,
                  channels=FLAGS.channels, encoding=FLAGS.encoding, quality=FLAGS.quality,
                  workers=workers, overwrite=FLAGS.overwrite, val_folder=FLAGS.val_folder or ""),
          say=(lambda _: None) if FLAGS.quiet else print)


def _check(argv):
  """Validates a run config (data included) for a target of --devices / --processes without
  starting anything: what a launcher runs before it pays for machines."""
  if FLAGS.config is None or not FLAGS.workdir:
    raise app.UsageError("--config and --workdir are required")
  for name in ("devices", "processes"):
    v = getattr(FLAGS, name)
    if v is not None and v < 1:
      raise UserError(f"--{name}={v} must be >= 1")
  processes = FLAGS.processes or 1
  if FLAGS.devices is not None and FLAGS.devices % processes:
    raise UserError(f"--devices={FLAGS.devices} is not a multiple of --processes={processes}")
  from farmer_jax.config import DataConfig, TrainConfig, validate
  m = validate(FLAGS.config, FLAGS.workdir, num_devices=FLAGS.devices, num_processes=processes)
  d, t = DataConfig.from_config(FLAGS.config), TrainConfig.from_config(FLAGS.config)
  from farmer_jax import storage
  where = "a bucket" if storage.is_url(FLAGS.workdir) else "a local path"
  print(f"config OK: {m.num_tokens} tokens of d={m.token_dim}, data {d.name}, global batch "
        f"{t.batch_size} on {FLAGS.devices or 'the local'} device(s) / {processes} process(es), "
        f"workdir {FLAGS.workdir} ({where})")
  if processes > 1 and not storage.is_url(FLAGS.workdir):
    print(f"note: {processes} processes with a local --workdir: it must be one filesystem shared "
          "by every host (e.g. NFS), or each host checkpoints to its own disk")


def _convert(argv):
  src, dst = FLAGS["from"].value, FLAGS["to"].value
  if bool(src) == bool(dst) or not FLAGS.out:
    raise app.UsageError("pass --from=tarflow --ckpt=FILE --out=EXPORT_DIR, or --to=tarflow "
                         "--model=EXPORT_DIR --out=FILE.pth")
  unused = ("model", "dtype") if src else ("ckpt", "config", "pixels", "noise_std", "channels",
                                          "ckpt_key")
  given = [f"--{f}" for f in unused if FLAGS[f].present]
  if given:
    one = len(given) == 1
    raise app.UsageError(f"{', '.join(given)} {'does' if one else 'do'} not apply to convert "
                         f"{'--from' if src else '--to'}=tarflow; drop {'it' if one else 'them'}")
  from farmer_jax.interop import convert
  say = (lambda _: None) if FLAGS.quiet else print
  if src:
    if not FLAGS.ckpt:
      raise app.UsageError("--from=tarflow needs --ckpt (the TARFlow checkpoint file)")
    convert.from_tarflow(FLAGS.ckpt, FLAGS.out, config=FLAGS.config,
                         in_channels=FLAGS.channels if FLAGS["channels"].present else None,
                         pixels=FLAGS.pixels, overwrite=FLAGS.overwrite, key=FLAGS.ckpt_key,
                         noise_std=FLAGS.noise_std, say=say)
  else:
    if not FLAGS.model:
      raise app.UsageError("--to=tarflow needs --model (an export directory)")
    convert.to_tarflow(FLAGS.model, FLAGS.out, overwrite=FLAGS.overwrite, say=say)


COMMANDS = {"train": _train, "distill": _distill, "export": _export, "sample": _sample,
            "eval": _eval, "fid": _fid, "prepare": _prepare, "check": _check,
            "convert": _convert}
USAGE = (
    "usage: farmer_jax <command> [--flags]\n"
    f"commands: {', '.join(COMMANDS)}\n"
    "example: farmer_jax train --config=configs/quickstart.py --workdir=/tmp/farmer_quickstart\n"
    "errors: one line on stderr, exit 2 (--debug: with the traceback)")

# --------------------------------------------------------------------------------- failure handling


def one_line(text):
  return " ".join(str(text).split())


def _quiet_libs(verbose):
  """Library INFO/WARNING chatter (orbax logs through absl) off the console unless --verbose; our
  own warnings (Python logging under 'farmer_jax') stay visible."""
  if verbose:
    return
  logging.set_verbosity(logging.WARNING)
  for name in ("absl", "orbax"):
    std_logging.getLogger(name).setLevel(std_logging.ERROR)
  # A failed checkpoint/export write is logged by each of Orbax's writer threads (and by asyncio
  # for their futures), dozens of tracebacks; the failure reaches the command as the exception of
  # the save, which becomes its one line.
  std_logging.getLogger("absl").addFilter(_not_from_orbax)
  std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
  # tensorstore then reports (sys.unraisablehook) an "Event loop is closed" traceback for each of
  # its writes that completes after Orbax closed the failed save's event loop
  sys.unraisablehook = _without_closed_loop_errors(sys.unraisablehook)


def _not_from_orbax(record):
  return f"{os.sep}orbax{os.sep}" not in record.pathname


def _without_closed_loop_errors(hook):
  def unraisablehook(unraisable):
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
      tb = tb.tb_next
    if (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
        and tb is not None and tb.tb_frame.f_code.co_name == "_check_closed"):   # asyncio's
      return
    hook(unraisable)
  return unraisablehook


def _fail(cmd, message, code=2, show_traceback=False, keep_stderr=False):
  """Prints ``farmer_jax <cmd>: <message>`` as ONE line, the last on stderr, and exits with
  ``code``."""
  if show_traceback:
    traceback.print_exc()
  for name in ("absl", "orbax", "jax"):
    std_logging.getLogger(name).setLevel(std_logging.CRITICAL)
  sys.stdout.flush()
  sys.stderr.flush()
  print(f"farmer_jax {cmd}: {one_line(message)}", file=sys.stderr, flush=True)
  if not keep_stderr and sys.stderr is sys.__stderr__:
    # Interpreter shutdown (orbax/asyncio finalisers, atexit hooks) must not print below the
    # message: point fd 2 at /dev/null now that it is written. Not done under --debug/--verbose,
    # nor when stderr is captured (tests).
    try:
      devnull = os.open(os.devnull, os.O_WRONLY)
      os.dup2(devnull, 2)
      os.close(devnull)
    except OSError:
      pass
  sys.exit(code)


def failure(e, cmd="train"):
  """(exit code, one-line message) for an expected failure of ``cmd``, None for a bug (shown as a
  traceback)."""
  if isinstance(e, FloatingPointError):  # non-finite training loss: nothing was saved
    return 1, str(e)
  if isinstance(e, app.UsageError):
    return 2, f"{e} (farmer_jax --help lists the commands)"
  if isinstance(e, UserError):
    return 2, str(e)
  if isinstance(e, OSError) and e.errno in _EXPECTED_ERRNOS:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      resume = "; training resumes from its last complete checkpoint" if cmd == "train" else ""
      return 2, (f"disk full: {e}. Fix: free space (or choose another location) and re-run the "
                 f"same command{resume}")
    if e.errno == errno.EFBIG:
      return 2, f"{e}. Fix: raise the file size limit (ulimit -f) or write elsewhere"
    return 2, f"{e}. Fix: check the path and its permissions"
  return None


def _command_main(cmd):
  def main(argv):
    debug = FLAGS.debug
    keep = FLAGS.debug or FLAGS.verbose
    try:
      if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; flags are written --name=value")
      _quiet_libs(FLAGS.verbose)
      COMMANDS[cmd](argv)
    # sorted into expected failures (one line) and bugs (re-raised)
    except Exception as e:  # noqa: BLE001
      hit = failure(e, cmd)
      if hit is None:
        raise
      _fail(cmd, hit[1], hit[0], show_traceback=debug, keep_stderr=keep)
  return main


def _override_paths(argv):
  """['model.flow_blockz', ...] from --config.<path>=... arguments."""
  out = []
  for a in argv:
    m = re.match(r"^--?(?:no)?config\.([^=]+)", a)
    if m:
      out.append(m.group(1))
  return out


def _config_spec(argv):
  for i, a in enumerate(argv):
    if a.startswith(("--config=", "-config=")):
      return a.split("=", 1)[1]
    if a in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _innermost_text(e):
  """The message of an exception whose args wrap another exception (ml_collections'
  KeyError-in-AttributeError)."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def flag_error_message(e, argv):
  """One line for an error raised while parsing flags (including loading the --config file and its
  overrides)."""
  spec = _config_spec(argv)
  text = str(e)
  if "Error whilst parsing config file" in text:      # get_config raised TypeError/ValueError
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (
        f"--config={spec}: the config file raised {lines[-1]}. Fix: check the file and its ':arg' "
        "(e.g. configs/quickstart.py:tiny)")
  if isinstance(e, flags.Error):
    if re.match(r"flag --config\.", text):
      return f"{text}. Fix: give the field a value of its type (see {spec})"
    return f"{text}. Fix: see farmer_jax {argv[0].split()[-1]} --helpfull for the flags"
  if isinstance(e, (KeyError, AttributeError)):
    inner = _innermost_text(e)
    key = inner.splitlines()[0].strip().strip("'\"") if inner.strip() else ""
    for path in _override_paths(argv):
      parts = path.split(".")
      if key in parts:
        where = ".".join(["config"] + parts[:parts.index(key)])
        hint = " ".join(inner.splitlines()[1:]).strip()
        return (f"--config.{path}: {where} has no field {key!r}. {hint + ' ' if hint else ''}"
                f"Fix: override a field that exists in {spec}")
  return (
      f"--config={spec}: loading the config failed: {type(e).__name__}: {_innermost_text(e)}. "
      "Fix: correct the "
      "config file (--debug shows the traceback)")


def _flags_parser(cmd, debug):
  def parse(argv):
    try:
      rest = FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - flag and config-file errors become one line
      _fail(cmd, flag_error_message(e, argv), 2, show_traceback=debug, keep_stderr=debug)
    if cmd in ("train", "convert") and FLAGS["config"].present:
      config = FLAGS.config
      spec = _config_spec(argv)
      if config is None:
        _fail(
            cmd,
            f"--config={spec}: get_config() returned None. "
            "Fix: return the ConfigDict from get_config",
            keep_stderr=debug)
      try:
        config.keys()  # a config file that failed to load raises here (config_flags defers it)
      except OSError as e:
        detail = [ln.strip() for ln in str(e).splitlines() if ln.strip()][-1]
        _fail(
            cmd,
            f"--config={spec}: cannot load the config file ({detail}). "
            "Fix: pass an existing configs/*.py "
            "file, e.g. --config=configs/quickstart.py",
            show_traceback=debug,
            keep_stderr=debug)
    return rest
  return parse


def _preempted(summary):
  """Whether the run was preempted (SIGTERM), after saying so: exit 0 then, so that a preemptible
  scheduler re-runs the same command."""
  if not summary.get("preempted"):
    return False
  if not summary.get("saved"):
    _preempted_during_startup()
  print(f"preempted at step {summary['steps']}; checkpoint saved; re-run the same command to "
        "resume")
  return True


def _preempted_during_startup(*_):
  """SIGTERM before training: one line, then exit 0 at once, without interpreter shutdown (which
  would free the XLA client under a compilation still running on a thread of XLA's: a segfault).
  Called from a signal handler: the line is written to fd 1 directly, as the interrupted code may
  be inside a print. Nothing but the workdir lock has been written, and the trainer releases it
  before this runs (train/trainer.py install_sigterm)."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError, RuntimeError):   # closed, or a print this signal interrupted
      pass
  os.write(1, b"preempted during start-up; nothing was written; re-run the same command\n")
  os._exit(0)


def _early_sigterm():
  """Until the trainer installs its own handler, a SIGTERM (preemption during imports, config
  parsing or jax start-up) exits cleanly with status 0 and one line, instead of the default kill
  (status 143)."""
  import signal
  import threading
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _preempted_during_startup)


def run(argv=None):
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(USAGE)
    sys.exit(0 if len(argv) >= 2 else 2)
  cmd = argv[1]
  if cmd not in COMMANDS:
    print(
        f"farmer_jax: unknown command {cmd!r}; commands: {', '.join(COMMANDS)} (farmer_jax --help)",
        file=sys.stderr)
    sys.exit(2)
  from farmer_jax import host_memory  # before jax makes threads: see host_memory
  try:
    host_memory.configure()
  except ValueError as e:
    print(f"farmer_jax {cmd}: {e}", file=sys.stderr)
    sys.exit(2)
  if cmd in ("train", "distill"):
    _early_sigterm()
  prog_argv = [f"farmer_jax {cmd}"] + argv[2:]
  sys.argv = prog_argv  # config_flags reads the --config.x.y overrides from sys.argv
  debug = any(
      a in ("--debug", "-debug", "--debug=true", "--debug=True", "--debug=1") for a in prog_argv)
  app.run(_command_main(cmd), argv=prog_argv, flags_parser=_flags_parser(cmd, debug))
