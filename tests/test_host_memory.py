"""farmer_jax.host_memory: the malloc mode's resolution, its effect (no page faults when a large
block freed by a worker thread is allocated again), and the CLI's refusal of a bad value."""

import os
import subprocess
import sys
import textwrap

import pytest

from farmer_jax import host_memory
from farmer_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("mode,environ,accel,want", [
    (None, {}, False, "keep"),                                  # CPU-only install
    (None, {}, True, "system"),                                 # a GPU/TPU plugin is installed
    (None, {"JAX_PLATFORMS": "cpu"}, True, "keep"),             # ... but JAX is told to use the CPU
    (None, {"JAX_PLATFORMS": "cuda,cpu"}, False, "system"),
    (None, {"FARMER_JAX_MALLOC": "system"}, False, "system"),
    (None, {"FARMER_JAX_MALLOC": " Keep "}, True, "keep"),
    (None, {"FARMER_JAX_MALLOC": ""}, False, "keep"),           # empty = auto
    ("system", {"FARMER_JAX_MALLOC": "keep"}, False, "system"),  # the argument wins
])
def test_resolve(mode, environ, accel, want):
  assert host_memory.resolve(mode, environ, accelerator=accel) == want


def test_resolve_refuses_a_bad_value():
  with pytest.raises(UserError, match=r"\$FARMER_JAX_MALLOC='kept' is not one of auto, keep, "
                     "system"):
    host_memory.resolve(None, {"FARMER_JAX_MALLOC": "kept"}, accelerator=False)
  with pytest.raises(UserError, match="mode=1"):
    host_memory.resolve(1, {}, accelerator=False)


FAULTS = textwrap.dedent("""
    import ctypes, resource, sys, threading
    from farmer_jax import host_memory
    mode = host_memory.configure(sys.argv[1])
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    n = 256 << 20                     # above glibc's largest mmap threshold (32 MB) and 64 MB heaps
    counts = []
    def work():                       # XLA allocates its temporaries on its worker threads
      for _ in range(3):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        libc.free(p)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    t = threading.Thread(target=work); t.start(); t.join()
    print(mode, *counts)
""")


def faults(mode):
  r = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                     cwd=ROOT, timeout=120)
  assert r.returncode == 0, r.stderr
  got, *counts = r.stdout.split()
  return got, [int(c) for c in counts]


@pytest.mark.skipif(host_memory._libc() is None, reason="needs Linux with glibc")
def test_keep_reuses_freed_memory_without_page_faults():
  got, counts = faults("keep")
  pages = (256 << 20) // 4096
  assert got == "keep"
  assert counts[0] > pages // 2          # the first use faults the block in
  assert max(counts[1:]) < pages // 100, counts   # later ones reuse it: no new faults
  got, counts = faults("system")         # glibc's default maps and unmaps it every time
  assert got == "system"
  thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read() if os.path.exists(
      "/sys/kernel/mm/transparent_hugepage/enabled") else ""
  if "[always]" not in thp:              # 2 MB pages would fault 512x less often
    assert min(counts) > pages // 2, counts


def test_cli_refuses_a_bad_mode_before_any_work(tmp_path):
  env = dict(os.environ, FARMER_JAX_MALLOC="fast")
  r = subprocess.run([sys.executable, "-m", "farmer_jax", "train", "--config=quickstart",
                      f"--workdir={tmp_path}/run"], capture_output=True, text=True, cwd=ROOT,
                     env=env, timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == (
      "farmer_jax train: $FARMER_JAX_MALLOC='fast' is not one of auto, keep, system. Fix: unset "
      "it, or set auto (the default), keep or system")
  assert not os.path.exists(tmp_path / "run")


def test_the_command_keeps_freed_memory_where_jax_runs_on_the_cpu():
  """The farmer_jax command's start-up: with libtpu installed and no TPU attached, jax is put on
  the CPU first, so 'auto' applies keep (CPU work), not the accelerator install's 'system'."""
  if not host_memory.accelerator_plugin_installed():
    pytest.skip("no accelerator plugin installed: 'auto' is keep anyway")
  if host_memory._libc() is None:
    pytest.skip("needs Linux with glibc")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", host_memory.ENV)}
  code = ("import jax\nfrom farmer_jax import cli\n"
          "print(cli.start_process()[0], jax.default_backend())")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                     env=env, timeout=120)
  assert r.returncode == 0, r.stderr
  mode, backend = r.stdout.split()
  assert (mode, backend) == ("keep", "cpu") or backend != "cpu", r.stdout
