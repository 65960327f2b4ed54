"""How a command ends: every expected failure is ONE line ``farmer_jax <cmd>: <message>``, the last
on stderr, and exit status 2 (a non-finite training loss: 1); a preempted run says so on stdout and
exits 0. Anything else is a bug and keeps its traceback. ``--debug`` adds the traceback to an
expected failure; ``--verbose`` keeps library logs."""

import errno
import logging as std_logging
import os
import re
import sys
import traceback

from absl import app, flags, logging

from farmer_jax import configlib, xla_options
from farmer_jax.errors import UserError

# OSErrors that describe the user's environment (missing path, permissions, disk full), not a bug
_EXPECTED_ERRNOS = {
    errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST,
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.ENOTEMPTY, errno.EXDEV,
    errno.EFBIG
}


def one_line(text):
  return " ".join(str(text).split())


def fail(cmd, message, code=2, show_traceback=False, keep_stderr=False):
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
  refused = xla_options.refusal(e)
  if refused:
    return 2, refused
  if isinstance(e, OSError) and e.errno in _EXPECTED_ERRNOS:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      resume = "; training resumes from its last complete checkpoint" if cmd == "train" else ""
      return 2, (f"disk full: {e}. Fix: free space (or choose another location) and re-run the "
                 f"same command{resume}")
    if e.errno == errno.EFBIG:
      return 2, f"{e}. Fix: raise the file size limit (ulimit -f) or write elsewhere"
    return 2, f"{e}. Fix: check the path and its permissions"
  return None


def quiet_libs(verbose):
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


def run_main(cmd, main, parsed, rest):
  """Runs ``main(parsed)`` under the failure contract: an expected failure becomes its one line
  and exit code; a bug is re-raised with its traceback."""
  debug = parsed.debug
  keep = parsed.debug or parsed.verbose
  try:
    if len(rest) > 1:
      raise app.UsageError(f"unexpected arguments {rest[1:]}; flags are written --name=value")
    quiet_libs(parsed.verbose)
    main(parsed)
  # sorted into expected failures (one line) and bugs (re-raised)
  except Exception as e:  # noqa: BLE001
    hit = failure(e, cmd)
    if hit is None:
      raise
    fail(cmd, hit[1], hit[0], show_traceback=debug, keep_stderr=keep)


# ---------------------------------------------------------------------------------- flag parsing


def parse_flags(cmd, flag_values, argv, debug, owners):
  """Parses ``argv`` (``[prog, --flags...]``) into ``flag_values``; returns the arguments left
  over. A flag error, or a --config file that cannot be loaded, ends the command with its one line.
  ``owners(name)``: the other commands that take flag ``name`` (named in the refusal)."""
  try:
    rest = flag_values(argv)
  except Exception as e:  # noqa: BLE001 - flag and config-file errors become one line
    fail(cmd, flag_error_message(e, argv, owners), 2, show_traceback=debug, keep_stderr=debug)
  if "config" in flag_values and flag_values["config"].present:
    config = flag_values.config
    spec = _config_spec(argv)
    if config is None:
      fail(cmd,
           f"--config={spec}: get_config() returned None. "
           "Fix: return the ConfigDict from get_config",
           keep_stderr=debug)
    try:
      config.keys()  # a config file that failed to load raises here (config_flags defers it)
    except OSError as e:
      detail = [ln.strip() for ln in str(e).splitlines() if ln.strip()][-1]
      fail(cmd,
           f"--config={spec}: cannot load the config file ({detail}). "
           f"Fix: pass a shipped config ({', '.join(configlib.available())}) or an existing "
           ".py config file, e.g. --config=quickstart",
           show_traceback=debug,
           keep_stderr=debug)
  return rest


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


def flag_error_message(e, argv, owners=lambda name: []):
  """One line for an error raised while parsing flags (including loading the --config file and its
  overrides). A flag that only other commands take is named with them (``owners``)."""
  spec = _config_spec(argv)
  text = str(e)
  cmd = argv[0].split()[-1]
  if isinstance(e, flags.UnrecognizedFlagError) and owners(e.flagname):
    return (f"unknown flag --{e.flagname} (a flag of: {', '.join(owners(e.flagname))}). Fix: drop "
            f"it; farmer_jax {cmd} --help lists the flags of {cmd}")
  if "Error whilst parsing config file" in text:      # get_config raised TypeError/ValueError
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (
        f"--config={spec}: the config file raised {lines[-1]}. Fix: check the file and its ':arg' "
        "(e.g. quickstart:tiny)")
  if isinstance(e, flags.Error):
    if re.match(r"flag --config\.", text):
      return f"{text}. Fix: give the field a value of its type (see {spec})"
    return f"{text}. Fix: see farmer_jax {cmd} --helpfull for the flags"
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


# ------------------------------------------------------------------------------------ preemption


def preempted(summary):
  """Whether the run was preempted (SIGTERM), after saying so: exit 0 then, so that a preemptible
  scheduler re-runs the same command."""
  if not summary.get("preempted"):
    return False
  if not summary.get("saved"):
    preempted_during_startup()
  print(f"preempted at step {summary['steps']}; checkpoint saved; re-run the same command to "
        "resume")
  return True


def preempted_during_startup(*_):
  """SIGTERM before training: one line, then exit 0 at once, without interpreter shutdown (which
  would free the XLA client under a compilation still running on a thread of XLA's: a segfault).
  Called from a signal handler: the line is written to fd 1 directly, as the interrupted code may
  be inside a print. Nothing but the workdir lock has been written, and the trainer releases it
  before this runs (train/preemption.py)."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError, RuntimeError):   # closed, or a print this signal interrupted
      pass
  os.write(1, b"preempted during start-up; nothing was written; re-run the same command\n")
  os._exit(0)


def early_sigterm():
  """Until the trainer installs its own handler, a SIGTERM (preemption during imports, config
  parsing or jax start-up) exits cleanly with status 0 and one line, instead of the default kill
  (status 143)."""
  from farmer_jax.train.preemption import exit_on_sigterm
  exit_on_sigterm(preempted_during_startup)
