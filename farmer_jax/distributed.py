"""Start-up: which platform jax uses where libtpu is installed without a TPU, and joining a
multi-process job (one process per host: TPU VM worker, GPU node; or per local CPU group in
tests)."""

import importlib.util
import os

import jax

from farmer_jax.errors import UserError


def skip_absent_tpu(environ=os.environ):
  """With libtpu installed where no accelerator is attached (the tpu-aot extra on a CPU machine, to
  compile for a slice), jax would start libtpu's TPU backend at its first use and print its
  warnings on stderr before falling back to the CPU: jax is told to use the CPU, unless
  ``environ`` sets JAX_PLATFORMS, jax's config names platforms, or jax already chose its
  backends. ``environ`` gets JAX_PLATFORMS=cpu too (the commands pass os.environ: the processes
  they start inherit it). Compiling for a slice (aot/slices.py) loads libtpu by itself."""
  if (environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
      or importlib.util.find_spec("libtpu") is None):
    return
  try:
    from jax._src import hardware_utils, xla_bridge
    if xla_bridge.backends_are_initialized():
      return
    tpu_chips = hardware_utils.num_available_tpu_chips_and_device_id()[0]
    gpu = hardware_utils.has_visible_nvidia_gpu() or os.path.exists("/dev/kfd")
  except (ImportError, AttributeError, OSError):   # another jax: leave the platforms to it
    return
  if tpu_chips or gpu:
    return
  environ["JAX_PLATFORMS"] = "cpu"
  jax.config.update("jax_platforms", "cpu")


def initialize(mode="off", coordinator_address=None, num_processes=None, process_id=None):
  """Calls ``jax.distributed.initialize`` for multi-process runs; must run before any other JAX
  call.

  mode: 'off' (single process), 'auto' (cluster auto-detection: Cloud TPU, SLURM, ...), or
  'explicit'. On CPU, cross-process collectives use gloo.
  """
  if mode == "off":
    return
  if mode == "explicit":
    missing = [
        n for n, v in (("coordinator_address", coordinator_address),
                       ("num_processes", num_processes), ("process_id", process_id)) if v is None
    ]
    if missing:
      raise UserError(f"--distributed=explicit needs --{', --'.join(missing)}")
  elif mode != "auto":
    raise UserError(f"--distributed={mode!r} must be off, auto or explicit")
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception:  # noqa: BLE001 - option absent on some builds; only matters for CPU runs
    pass
  if mode == "auto":
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
