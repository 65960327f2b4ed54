"""Host memory: keep freed heap memory for reuse instead of handing it back to the kernel.

XLA:CPU allocates an executable's temporaries with ``malloc`` on every call (for the AF train
step of ``benchmarks/vs_torch.py`` at 64x64, batch 16: about 650 MB) and frees them when the call
ends. glibc serves a block that large with a fresh ``mmap`` and unmaps it on ``free``, so every
step faults in and zeroes every page of it again: 160,000 minor page faults and 0.28 s of kernel
time per 0.45 s step on a 2-core CPU. With ``keep`` those blocks come from the heap and stay there
once freed: no faults after the first steps, and the same step takes 0.33 s (docs/performance.md).

``keep`` sets three documented glibc ``mallopt`` parameters: ``M_MMAP_MAX = 0`` (no ``mmap`` for
large blocks), ``M_TRIM_THRESHOLD = -1`` (never return the top of the heap) and ``M_ARENA_MAX =
1`` (one heap for all threads: a thread's own arena would still ``mmap`` any block over 64 MB).
The costs: the process keeps its peak heap (its resident size does not shrink after a large
step), and all threads share one malloc lock.

Modes (the ``FARMER_JAX_MALLOC`` environment variable; ``configure``):
  * ``auto`` (default): ``keep`` when JAX will run on the CPU (``JAX_PLATFORMS`` is ``cpu``, or
    no accelerator plugin -- jax-cuda*/jax-rocm* plugin, libtpu -- is installed); else ``system``;
  * ``keep``: always;
  * ``system``: leave glibc's defaults.
Call it before jax starts its threads (an arena, once made, stays): the benchmarks call it before
importing jax or torch; the ``farmer_jax`` command (``cli.start_process``) right after
``distributed.skip_absent_tpu`` has chosen the CPU where libtpu is installed without a TPU (so that
'auto' sees that choice; importing jax starts no thread, measured), after numpy (whose OpenBLAS
thread exists by then; the 64x64 step still reaches 0 faults from its fourth step on, measured).
On a system other than Linux with glibc it does nothing.
"""

import ctypes
import ctypes.util
import importlib.metadata
import os
import sys

from farmer_jax.errors import UserError

ENV = "FARMER_JAX_MALLOC"
MODES = ("auto", "keep", "system")
# glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
_ACCELERATOR_DISTS = ("libtpu", "libtpu-nightly")
_ACCELERATOR_PREFIXES = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm")


def accelerator_plugin_installed() -> bool:
  """True when a JAX accelerator plugin (jax-cuda*/jax-rocm* plugin or pjrt, libtpu) is
  installed, i.e. JAX may pick a non-CPU backend."""
  for dist in importlib.metadata.distributions():
    name = (dist.metadata["Name"] or "").lower()
    if name in _ACCELERATOR_DISTS or name.startswith(_ACCELERATOR_PREFIXES):
      return True
  return False


def read_mode(env, modes, mode=None, environ=None) -> str:
  """A start-up setting's value: ``mode``, else ``$env``, else 'auto' (``modes[0]``), stripped
  and lower-cased (empty = 'auto'). A value not in ``modes`` raises UserError."""
  environ = os.environ if environ is None else environ
  given = mode if mode is not None else environ.get(env, modes[0])
  value = str(given).strip().lower() or modes[0]
  if value not in modes:
    source = "mode" if mode is not None else f"${env}"
    others = " or ".join(modes[1:])
    raise UserError(f"{source}={given!r} is not one of {', '.join(modes)}. Fix: unset it, or "
                    f"set {modes[0]} (the default), {others}")
  return value


def resolve(mode=None, environ=None, accelerator=None) -> str:
  """The mode that applies: ``mode``, else ``$FARMER_JAX_MALLOC``, else 'auto'; 'auto' becomes
  'keep' or 'system' (see the module docstring). A value not in MODES raises UserError."""
  environ = os.environ if environ is None else environ
  value = read_mode(ENV, MODES, mode, environ)
  if value != "auto":
    return value
  return "keep" if runs_on_cpu(environ, accelerator) else "system"


def runs_on_cpu(environ=None, accelerator=None) -> bool:
  """Whether JAX will run on the CPU: ``JAX_PLATFORMS`` starts with ``cpu``, or it is unset and
  no accelerator plugin is installed (``accelerator``: that check's answer, if known)."""
  environ = os.environ if environ is None else environ
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0] == "cpu"
  if accelerator is None:
    accelerator = accelerator_plugin_installed()
  return not accelerator


def _libc():
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version            # glibc only (musl has no mallopt parameters)
    return libc
  except (OSError, AttributeError):
    return None


def configure(mode=None) -> str:
  """Apply the malloc mode (see the module docstring); returns what was done: 'keep', 'system',
  or 'unsupported' (not glibc: nothing to set). Raises UserError on a bad mode."""
  value = resolve(mode)
  if value == "system":
    return "system"
  libc = _libc()
  if libc is None:
    return "unsupported"
  ok = all(libc.mallopt(param, val) == 1
           for param, val in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_ARENA_MAX, 1)))
  return "keep" if ok else "unsupported"
