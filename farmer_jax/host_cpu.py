"""Host CPUs: keep a virtual machine's idle CPUs running while JAX computes on them.

XLA:CPU runs a step as hundreds of small ops handed between its threads (``vs_torch``'s AF train
step at 32x32: about 1,000 per step). A thread with no work sleeps at once, and when every thread
of a CPU sleeps, a virtual machine's CPU halts and the hypervisor may hand the physical core to
someone else; waking it for the next op then costs a round trip through the hypervisor. PyTorch
does not pay this: its OpenMP threads spin for a while after each parallel region before they
sleep. On the project's 2-core Intel Xeon VM, timed by hand while the host was busy, the 32x32
step took 1,030 ms on 2 cores, 628 ms on 1 (taskset), and 415 ms on 2 cores with every idle CPU
kept running (docs/performance.md).

``spin`` keeps them running: one process per usable CPU, pinned to it, at Linux's ``SCHED_IDLE``
priority, which runs only when nothing else in its control group wants that CPU (a waking thread
of this process preempts it at once); it spins on ``getppid()`` and exits as soon as this process
is gone, however it ends. The costs: the CPUs show as busy and use power; on a shared host they
take cycles the hypervisor would otherwise give other guests; a burstable VM (cloud "shared-core"
or credit-based types) spends its CPU credits; ``SCHED_IDLE`` ranks a task only within its own
control group, so a spinner competes at its group's full weight with busy tasks of other groups
(other users' slices or containers) on the same CPU; and a core's hyperthread sibling shares its
execution units with the spinner. Under a CPU quota (a container's ``--cpus``, a Kubernetes limit)
the spinners would use up the quota and pause the real work with them, so 'auto' stays off there.

Modes (the ``FARMER_JAX_CPU_SPIN`` environment variable; ``configure``):
  * ``auto`` (default): ``spin`` when JAX will run on the CPU (``host_memory.runs_on_cpu``),
    the CPU reports a hypervisor (the ``hypervisor`` flag of /proc/cpuinfo: a virtual machine),
    at least 2 CPUs are usable and no CPU quota applies (``cpu_quota``); else ``off``. Measured
    on virtual machines only;
  * ``spin``: on Linux with at least 2 usable CPUs (also under a quota: not advised);
  * ``off``.
Spinners that cannot be started (a process limit, no usable Python executable) leave the mode
``off``: a speed-up never stops a command.
The ``farmer_jax`` command applies it at start (``cli.start_process``), as the benchmarks' JAX
workers do. Applied once per process.
"""

import atexit
import os
import subprocess
import sys

from farmer_jax.host_memory import read_mode, runs_on_cpu

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


def cpu_quota(root="/sys/fs/cgroup") -> bool:
  """Whether this process's control group caps its CPU time (cgroup v2 ``cpu.max`` other than
  'max', or v1 ``cpu.cfs_quota_us`` > 0); False when neither is readable."""
  try:
    with open(os.path.join(root, "cpu.max")) as f:
      return f.read().split()[0] != "max"
  except (OSError, IndexError):
    pass
  try:
    with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
      return int(f.read().strip()) > 0
  except (OSError, ValueError):
    return False


def resolve(mode=None, environ=None, vm=None, cpus=None, accelerator=None, quota=None) -> str:
  """The mode that applies, 'spin' or 'off': ``mode``, else ``$FARMER_JAX_CPU_SPIN``, else
  'auto' (see the module docstring; ``vm``, ``cpus``, ``accelerator``, ``quota``: the machine's
  answers, read here when None). A value not in MODES raises UserError."""
  environ = os.environ if environ is None else environ
  value = read_mode(ENV, MODES, mode, environ)
  cpus = usable_cpus() if cpus is None else cpus
  if value == "off" or len(cpus) < 2 or not sys.platform.startswith("linux"):
    return "off"
  if value == "spin":
    return "spin"
  vm = virtual_machine() if vm is None else vm
  quota = cpu_quota() if quota is None else quota
  return "spin" if vm and not quota and runs_on_cpu(environ, accelerator) else "off"


def configure(mode=None) -> str:
  """Apply the mode (see the module docstring): start the spinners, once per process. Returns
  'spin' or 'off'. Raises UserError on a bad mode."""
  value = resolve(mode)
  if value != "spin" or _spinners:
    return value
  if not sys.executable:
    return "off"
  atexit.register(stop)
  try:
    for cpu in usable_cpus():
      _spinners.append(subprocess.Popen(
          [sys.executable, "-I", "-S", "-c", _SPINNER % (cpu, os.getpid())],
          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
  except (OSError, ValueError):           # a process limit, an unusable executable
    stop()
    return "off"
  return value


if hasattr(os, "register_at_fork"):    # a forked child has no spinners of its own
  os.register_at_fork(after_in_child=_spinners.clear)


def stop():
  """End the spinners (they also end by themselves when this process does)."""
  while _spinners:
    p = _spinners.pop()
    p.kill()
    p.wait()
