"""farmer_jax.host_cpu: the idle-CPU mode's resolution, and its spinners: one per usable CPU,
pinned to it, at SCHED_IDLE priority, gone when the process that started them is gone (even
killed), and the CLI's refusal of a bad value."""

import os
import signal
import subprocess
import sys
import time

import pytest

from farmer_jax import host_cpu
from farmer_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux")


@linux
@pytest.mark.parametrize("mode,environ,vm,cpus,accel,want", [
    (None, {}, True, [0, 1], False, "spin"),                   # a VM, JAX on its CPUs
    (None, {}, False, [0, 1], False, "off"),                   # not measured off VMs
    (None, {}, True, [0], False, "off"),                       # one CPU: nothing to keep awake
    (None, {}, True, [0, 1], True, "off"),                     # a GPU/TPU plugin is installed
    (None, {"JAX_PLATFORMS": "cpu"}, True, [0, 1], True, "spin"),   # ... but JAX is on the CPU
    (None, {"FARMER_JAX_CPU_SPIN": " Spin "}, False, [0, 1], True, "spin"),
    (None, {"FARMER_JAX_CPU_SPIN": "off"}, True, [0, 1], False, "off"),
    (None, {"FARMER_JAX_CPU_SPIN": ""}, True, [0, 1], False, "spin"),   # empty = auto
    ("off", {"FARMER_JAX_CPU_SPIN": "spin"}, True, [0, 1], False, "off"),   # the argument wins
    ("spin", {}, False, [3], False, "off"),                    # spin needs 2 CPUs
])
def test_resolve(mode, environ, vm, cpus, accel, want):
  assert host_cpu.resolve(mode, environ, vm, cpus, accel, quota=False) == want


@linux
def test_auto_stays_off_under_a_cpu_quota(tmp_path):
  assert host_cpu.resolve(None, {}, True, [0, 1], False, quota=True) == "off"
  assert host_cpu.resolve("spin", {}, True, [0, 1], False, quota=True) == "spin"
  (tmp_path / "cpu.max").write_text("200000 100000\n")           # cgroup v2: 2 CPUs' worth
  assert host_cpu.cpu_quota(str(tmp_path))
  (tmp_path / "cpu.max").write_text("max 100000\n")
  assert not host_cpu.cpu_quota(str(tmp_path))
  v1 = tmp_path / "v1"
  (v1 / "cpu").mkdir(parents=True)
  (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")            # cgroup v1: no quota
  assert not host_cpu.cpu_quota(str(v1))
  (v1 / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
  assert host_cpu.cpu_quota(str(v1))
  assert not host_cpu.cpu_quota(str(tmp_path / "absent"))


def test_resolve_refuses_a_bad_value():
  with pytest.raises(UserError, match=r"\$FARMER_JAX_CPU_SPIN='on' is not one of auto, spin, "
                     r"off. Fix: unset it, or set auto \(the default\), spin or off"):
    host_cpu.resolve(None, {"FARMER_JAX_CPU_SPIN": "on"}, True, [0, 1], False)


def test_virtual_machine_reads_the_hypervisor_flag(tmp_path):
  f = tmp_path / "cpuinfo"
  f.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 hypervisor\n")
  assert host_cpu.virtual_machine(str(f))
  f.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
  assert not host_cpu.virtual_machine(str(f))
  assert not host_cpu.virtual_machine(str(tmp_path / "absent"))


def children(pid):
  """The pids of ``pid``'s running child processes that run the spinner."""
  out = []
  for d in os.listdir("/proc"):
    if not d.isdigit():
      continue
    try:
      with open(f"/proc/{d}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      with open(f"/proc/{d}/cmdline") as f:
        cmd = f.read()
    except OSError:
      continue
    if int(fields[1]) == pid and "SCHED_IDLE" in cmd and fields[0] != "Z":
      out.append(int(d))
  return out


@linux
@pytest.mark.skipif(len(host_cpu.usable_cpus()) < 2, reason="needs 2 usable CPUs")
def test_spinners_are_pinned_idle_and_end_with_their_process():
  code = ("from farmer_jax import host_cpu\n"
          "print(host_cpu.configure('spin'), host_cpu.configure('spin'), flush=True)\n"
          "import time\ntime.sleep(60)\n")
  p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
  try:
    assert p.stdout.readline().split() == ["spin", "spin"]
    spinners = []
    for _ in range(100):                       # they set their affinity and priority first
      spinners = children(p.pid)
      if len(spinners) == len(os.sched_getaffinity(0)) and all(
          os.sched_getscheduler(s) == os.SCHED_IDLE for s in spinners):
        break
      time.sleep(0.05)
    assert len(spinners) == len(os.sched_getaffinity(0))      # one per CPU, once per process
    assert sorted(next(iter(os.sched_getaffinity(s))) for s in spinners) == sorted(
        os.sched_getaffinity(0))
    assert all(len(os.sched_getaffinity(s)) == 1 for s in spinners)
    assert all(os.sched_getscheduler(s) == os.SCHED_IDLE for s in spinners)
  finally:
    p.send_signal(signal.SIGKILL)              # no atexit: the spinners notice by themselves
    p.wait()
  deadline = time.time() + 10
  while time.time() < deadline and any(os.path.exists(f"/proc/{s}") and
                                       _state(s) != "Z" for s in spinners):
    time.sleep(0.05)
  assert not [s for s in spinners if os.path.exists(f"/proc/{s}") and _state(s) != "Z"]


def _state(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0]
  except OSError:
    return "Z"


def test_the_command_refuses_a_bad_value():
  env = dict(os.environ, FARMER_JAX_CPU_SPIN="fast")
  r = subprocess.run([sys.executable, "-m", "farmer_jax", "check", "--config=quickstart"],
                     capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      "farmer_jax check: $FARMER_JAX_CPU_SPIN='fast' is not one of auto, spin, off. Fix: unset "
      "it, or set auto (the default), spin or off"]
