"""The ``farmer_jax`` console script: ``farmer_jax <command> --flags``; also ``python -m farmer_jax``.

Commands (this release): train, export, sample. Later: eval, distill, prepare, convert, fid.

  farmer_jax train --config=configs/quickstart.py --workdir=/tmp/run [--config.train.steps=500]
  farmer_jax export --workdir=/tmp/run --out=/tmp/model [--dtype=bfloat16] [--overwrite]
  farmer_jax sample --model=/tmp/model --classes=0,1,2 --num=8 --cfg=2.0 --seed=0 --out=grid.png [--npz=s.npz]
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (optionally ':arg').",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for logs, checkpoints and samples.")
flags.DEFINE_bool("quiet", False, "No progress bars or console logs.")
flags.DEFINE_bool("verbose", False, "Show library INFO logs (orbax, absl).")
# multi-process (multi-host) launch
flags.DEFINE_enum("distributed", "off", ["off", "auto", "explicit"],
                  "train: 'auto' = jax.distributed.initialize() with cluster auto-detection (Cloud TPU pods, SLURM); "
                  "'explicit' = use --coordinator_address/--num_processes/--process_id.")
flags.DEFINE_string("coordinator_address", None, "train: host:port of process 0 (with --distributed=explicit).")
flags.DEFINE_integer("num_processes", None, "train: number of processes (with --distributed=explicit).")
flags.DEFINE_integer("process_id", None, "train: this process's index (with --distributed=explicit).")
# export
flags.DEFINE_string("out", None, "export: output model directory; sample: output PNG grid.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "export: param dtype to store.")
flags.DEFINE_bool("overwrite", False, "export: replace an existing --out directory.")
# sample
flags.DEFINE_string("model", None, "sample: an exported model directory (farmer_jax export).")
flags.DEFINE_string("classes", "all", "sample: comma-separated class ids, 'null' for unconditional, or 'all'.")
flags.DEFINE_integer("num", 8, "sample: samples per class.")
flags.DEFINE_float("cfg", None, "sample: guidance scale w (default: the model config's sample.cfg).")
flags.DEFINE_enum("guidance", None, ["none", "resampling", "naive"],
                  "sample: guidance method (default: resampling if cfg > 0 else the config's).")
flags.DEFINE_string("sampler", None, "sample: extra sampler settings 'k=v,...' (t_pi, t_sigma, t_pi_v, t_sigma_v, "
                    "t_s, s_c, s_u, redundant_candidates, redundant_var_scale, naive_proposals).")
flags.DEFINE_integer("seed", 0, "sample: RNG seed (sample j uses fold_in(seed, j)).")
flags.DEFINE_integer("batch", 64, "sample: batch size (results do not depend on it).")
flags.DEFINE_string("npz", None, "sample: also write uint8 images + labels to this .npz (for FID tools).")


def _train(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/quickstart.py")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required, e.g. --workdir=/tmp/farmer_quickstart")
  _quiet_libs()                                # keep orbax's per-save INFO lines off the console
  from farmer_jax.distributed import initialize
  initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from farmer_jax.config import ConfigError
  from farmer_jax.train.trainer import format_test_bpd, train_and_report
  try:
    summary, _ = train_and_report(FLAGS.config, FLAGS.workdir, quiet=FLAGS.quiet)
  except ConfigError as e:
    _fail("train", e)
  except FloatingPointError as e:      # non-finite loss: nothing was saved
    print(f"farmer_jax train: {e}", file=sys.stderr)
    sys.exit(1)
  if summary.get("preempted"):
    print(f"preempted at step {summary['steps']}; checkpoint saved")
    return
  print(format_test_bpd(summary))      # class-conditional -log p(x|y) and unconditional -log p(x|null)


def _quiet_libs():
  if not FLAGS.verbose:
    logging.set_verbosity(logging.WARNING)


def _fail(cmd, e):
  print(f"farmer_jax {cmd}: {e}", file=sys.stderr)
  sys.exit(2)


def _export(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError("--workdir (a training run) and --out (the export directory) are required")
  _quiet_libs()
  from farmer_jax.sampling.export import ExportError, export_model
  try:
    meta = export_model(FLAGS.workdir, FLAGS.out, FLAGS.dtype, FLAGS.overwrite)
  except (ExportError, ValueError) as e:
    _fail("export", e)
  print(f"exported step {meta['step']} ({meta['params']} params, {meta['dtype']}) -> {FLAGS.out}")


def sampler_overrides(cfg_w, guidance, extra):
  """CLI flags -> dict of config.sample overrides."""
  out = {}
  if cfg_w is not None:
    out["cfg"] = cfg_w
    if guidance is None:
      out["guidance"] = "resampling" if cfg_w > 0 else "none"
  if guidance is not None:
    out["guidance"] = guidance
  if extra:
    for item in extra.split(","):
      if "=" not in item:
        raise ValueError(f"--sampler entry {item!r} must be key=value")
      k, v = item.split("=", 1)
      out[k.strip()] = float(v)
  return out


def _sample(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.model or not (FLAGS.out or FLAGS.npz):
    raise app.UsageError("--model (an export directory) and --out (PNG) or --npz are required")
  _quiet_libs()
  from farmer_jax.sampling.export import ExportError, load_model
  from farmer_jax.sampling.generate import describe_stats, generate, parse_classes, write_outputs
  from farmer_jax.sampling.sampler import SAMPLER_KEYS, sampler_from_config
  try:
    mcfg, params, config, _ = load_model(FLAGS.model)
    classes = parse_classes(FLAGS.classes, mcfg.num_classes)
    allowed = set(SAMPLER_KEYS)
    over = sampler_overrides(FLAGS.cfg, FLAGS.guidance, FLAGS.sampler)
    unknown = sorted(set(over) - allowed)
    if unknown:
      raise ValueError(f"unknown --sampler setting(s) {unknown}; known: {sorted(allowed)}")
    sc = {k: v for k, v in dict(config.get("sample", {})).items() if k in allowed}   # the model's defaults
    sc.update(over)
    sampler = sampler_from_config(sc)
    images, labels, stats = generate(mcfg, params, classes, FLAGS.num, sampler, FLAGS.seed, FLAGS.batch,
                                     progress=not FLAGS.quiet, return_stats=True)
    write_outputs(images, labels, FLAGS.out, FLAGS.npz, stats)
  except (ExportError, ValueError) as e:
    _fail("sample", e)
  line = describe_stats(stats, sampler)
  if line:
    print(line)
  print(f"{images.shape[0] * images.shape[1]} samples ({sampler.guidance}, w={sampler.cfg.w}) -> "
        f"{', '.join(p for p in (FLAGS.out, FLAGS.npz) if p)}")


COMMANDS = {"train": _train, "export": _export, "sample": _sample}
USAGE = ("usage: farmer_jax <command> [--flags]\n"
         f"commands: {', '.join(COMMANDS)}\n"
         "example: farmer_jax train --config=configs/quickstart.py --workdir=/tmp/farmer_quickstart")


def run(argv=None):
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(USAGE)
    sys.exit(0 if len(argv) >= 2 else 2)
  cmd = argv[1]
  if cmd not in COMMANDS:
    print(f"farmer_jax: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    sys.exit(2)
  app.run(COMMANDS[cmd], argv=[f"farmer_jax {cmd}"] + argv[2:])
