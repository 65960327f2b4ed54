"""Host CPUs: keep a virtual machine's idle CPUs running while JAX computes on them.

XLA:CPU runs a step as hundreds of small ops handed between its threads (``vs_torch``'s AF train
step at 32x32: about 1,000 per step). A thread with no work sleeps at once, and when every thread
of a CPU sleeps, a virtual machine's CPU halts and the hypervisor may hand the physical core to
someone else; waking it for the next op then costs a round trip through the hypervisor. PyTorch
does not pay this: its OpenMP threads spin for a while after each parallel region before they
sleep. On the project's 2-core Intel Xeon VM the 32x32 step took 1,030 ms on 2 cores, 628 ms on 1
(taskset), and 415 ms on 2 cores with every idle CPU kept running (docs/performance.md).

``spin`` keeps them running: one process per usable CPU, pinned to it, at Linux's ``SCHED_IDLE``
priority, which runs only when nothing else on that CPU wants to, so it takes no time from this
process or any other (a waking thread preempts it at once); it spins on ``getppid()`` and exits
as soon as this process is gone, however it ends. The costs: the CPUs show as busy, use power,
and on a shared host take cycles the hypervisor would otherwise give other guests; a core's
hyperthread sibling shares its execution units with the spinner.

Modes (the ``FARMER_JAX_CPU_SPIN`` environment variable; ``configure``):
  * ``auto`` (default): ``spin`` when JAX will run on the CPU (``host_memory.runs_on_cpu``),
    the CPU reports a hypervisor (the ``hypervisor`` flag of /proc/cpuinfo: a virtual machine),
    and at least 2 CPUs are usable; else ``off``. Measured on virtual machines only;
  * ``spin``: on Linux with at least 2 usable CPUs;
  * ``off``.
The ``farmer_jax`` command applies it at start (``cli.start_process``), as the benchmarks' JAX
workers do. Applied once per process.
"""

import atexit
import os
import subprocess
import sys

from farmer_jax.errors import UserError
from farmer_jax.host_memory import runs_on_cpu

ENV = "FARMER_JAX_CPU_SPIN"
MODES = ("auto", "spin", "off")
# the spinner: pinned to one CPU, idle priority, until its parent is gone
_SPINNER = ("import os\n"
            "os.sched_setaffinity(0, {%d})\n"
            "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
            "parent = %d\n"
            "while os.getppid() == parent:\n"
            "  pass\n")
_spinners = []


def virtual_machine(cpuinfo="/proc/cpuinfo") -> bool:
  """Whether the CPU reports a hypervisor (x86's ``hypervisor`` flag); False when unreadable."""
  try:
    with open(cpuinfo) as f:
      for line in f:
        if line.startswith("flags"):
          return "hypervisor" in line.split(":", 1)[1].split()
  except OSError:
    pass
  return False


def usable_cpus():
  return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def resolve(mode=None, environ=None, vm=None, cpus=None, accelerator=None) -> str:
  """The mode that applies, 'spin' or 'off': ``mode``, else ``$FARMER_JAX_CPU_SPIN``, else
  'auto' (see the module docstring; ``vm``, ``cpus``, ``accelerator``: the machine's answers,
  read here when None). A value not in MODES raises UserError."""
  environ = os.environ if environ is None else environ
  given = mode if mode is not None else environ.get(ENV, "auto")
  value = str(given).strip().lower() or "auto"
  if value not in MODES:
    source = "mode" if mode is not None else f"${ENV}"
    raise UserError(f"{source}={given!r} is not one of {', '.join(MODES)}; unset it or use "
                    f"'auto' (the default), 'spin' or 'off'")
  cpus = usable_cpus() if cpus is None else cpus
  if value == "off" or len(cpus) < 2 or not sys.platform.startswith("linux"):
    return "off"
  if value == "spin":
    return "spin"
  vm = virtual_machine() if vm is None else vm
  return "spin" if vm and runs_on_cpu(environ, accelerator) else "off"


def configure(mode=None) -> str:
  """Apply the mode (see the module docstring): start the spinners, once per process. Returns
  'spin' or 'off'. Raises UserError on a bad mode."""
  value = resolve(mode)
  if value == "spin" and not _spinners:
    for cpu in usable_cpus():
      _spinners.append(subprocess.Popen(
          [sys.executable, "-S", "-c", _SPINNER % (cpu, os.getpid())],
          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    atexit.register(stop)
  return value


def stop():
  """End the spinners (they also end by themselves when this process does)."""
  while _spinners:
    p = _spinners.pop()
    p.kill()
    p.wait()
