"""Flags and steps that several commands share, written once: how a command declares its flags
(``Flag`` rows, ``define``), the output switches every command takes (--quiet/--verbose/--debug),
the --config file, the multi-process launch flags and the jax start-up they configure, and the
check of a JSON result path (eval, fid)."""

import dataclasses
import os
from typing import Any

from absl import flags
from ml_collections import config_flags

from farmer_jax import configlib
from farmer_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Flag:
  """One flag of a command: ``--name`` (``default``; its kind follows the default's type, ``kind``
  says it where the default is None), one of ``choices`` when given, and its help text."""
  name: str
  default: Any
  help: str
  kind: type = str
  choices: tuple = ()


_DEFINE = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           bool: flags.DEFINE_bool}


def define(fv, table):
  """Defines each ``Flag`` of ``table`` on the command's FlagValues ``fv``, in order (the order
  its --help lists them)."""
  for f in table:
    if f.choices:
      flags.DEFINE_enum(f.name, f.default, list(f.choices), f.help, flag_values=fv)
    else:
      kind = f.kind if f.default is None else type(f.default)
      _DEFINE[kind](f.name, f.default, f.help, flag_values=fv)


def define_output(fv):
  """--quiet, --verbose, --debug: every command takes them."""
  flags.DEFINE_bool("quiet", False, "No progress bars or console messages (train and distill "
                    "still print a progress line every train.log_every steps).", flag_values=fv)
  flags.DEFINE_bool("verbose", False, "Show library INFO logs (orbax, absl).", flag_values=fv)
  flags.DEFINE_bool(
      "debug", False,
      "On an expected failure, also print the full traceback (tracebacks are otherwise "
      "shown only for bugs).", flag_values=fv)


def define_config(fv, help_text=None):
  """--config=NAME[:arg] (farmer_jax/configs/NAME.py) or --config=FILE.py[:arg], with
  --config.a.b=value overrides. config_flags reads the overrides from sys.argv when --config is
  parsed (cli.run sets it to the command's arguments)."""
  if help_text is None:
    help_text = (f"A shipped config by name ({', '.join(configlib.available())}) or a path to a "
                 "config .py file, optionally with ':arg' (e.g. quickstart:tiny).")
  config_flags.DEFINE_config_file("config", None, help_text, flag_values=fv, lock_config=True)
  parser = fv["config"].parser   # config_flags' file loader, given a shipped name's file
  load_file = parser.parse
  parser.parse = lambda spec: load_file(configlib.resolve(spec))


def define_run(fv, workdir_help, before_workdir=()):
  """The flags of a command that trains into a workdir (train, distill): --config, the
  ``before_workdir`` Flags, --workdir, --config_change_ok, the launch flags and the output
  switches."""
  define_config(fv)
  define(fv, tuple(before_workdir) + (
      Flag("workdir", None, workdir_help),
      Flag("config_change_ok", False, "Allow resuming a workdir whose saved config.json differs in "
           "data/model settings (refused by default: the checkpoint's params would mean "
           "something else)."),
  ))
  define_launch(fv)
  define_output(fv)


def define_compilation_cache(fv):
  flags.DEFINE_string("compilation_cache_dir", None,
                      "Persistent XLA compilation cache, shared by restarts: a local or shared "
                      "filesystem path, or gs:// on TPUs (not on GPUs).", flag_values=fv)


def define_launch(fv):
  """The multi-process (multi-host) launch flags, and the compilation cache."""
  flags.DEFINE_enum(
      "distributed", "off", ["off", "auto", "explicit"],
      "'auto' = jax.distributed.initialize() with cluster auto-detection (Cloud TPU pods, SLURM); "
      "'explicit' = use --coordinator_address/--num_processes/--process_id.", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 (with --distributed=explicit).", flag_values=fv)
  flags.DEFINE_integer("num_processes", None,
                       "Number of processes (with --distributed=explicit).", flag_values=fv)
  flags.DEFINE_integer("process_id", None,
                       "This process's index (with --distributed=explicit).", flag_values=fv)
  define_compilation_cache(fv)


def check_json_out(path):
  """Refuses, before any work, a JSON result path that cannot be written (local paths)."""
  from farmer_jax.artifacts import storage
  if not str(path).endswith(".json"):
    raise UserError(f"--out={path}: the result is JSON. Fix: name it *.json")
  if storage.is_url(path):
    return
  if os.path.isdir(path):
    raise UserError(f"--out={path} is a directory. Fix: pass a file path ending in .json")


def start_jax(f):
  """Joins the multi-process job (commands with --distributed) and points XLA at the compilation
  cache (``check_compilation_cache``); before any other jax call."""
  if "distributed" in f:
    from farmer_jax.distributed import initialize
    initialize(f.distributed, f.coordinator_address, f.num_processes, f.process_id)
  if f.compilation_cache_dir:
    import jax
    check_compilation_cache(f.compilation_cache_dir, jax.default_backend)
    jax.config.update("jax_compilation_cache_dir", f.compilation_cache_dir)


def check_compilation_cache(path, backend):
  """Refuses a bucket (``scheme://``) compilation cache when ``backend()`` (asked only for a
  bucket: it starts jax's backend) is 'gpu': jax gives XLA's GPU compiler a directory under the
  cache for its autotuning results, and XLA writes it with its own file layer, which has no bucket
  client (the path fails, or becomes a local folder 'gs:'). TPUs and CPUs keep the bucket."""
  from farmer_jax.artifacts import storage
  if storage.is_url(path) and backend() == "gpu":
    raise UserError(f"--compilation_cache_dir={path}: a bucket cannot hold the compilation cache "
                    "on GPUs (XLA itself writes its autotuning cache under it, and cannot write "
                    "a bucket). Fix: a "
                    "directory on a filesystem every host mounts (e.g. NFS or Lustre; one node: a "
                    "local disk), or drop the flag")


def say(f):
  """print, or nothing under --quiet."""
  return (lambda _: None) if f.quiet else print
