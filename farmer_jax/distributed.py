"""Multi-process start-up: one process per host (TPU VM worker, GPU node) or per local CPU group in
tests."""

import jax

from farmer_jax.errors import UserError


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
