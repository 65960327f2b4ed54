"""Cloud TPU slices by the names users write (``v4-32``, ``v5litepod-16``, ``v5p-128``, ``v6e-64``),
and their devices without the hardware: ``jax.experimental.topologies.get_topology_desc`` through
libtpu (the ``farmer_jax[tpu-aot]`` extra), what a program compiled ahead of time for the slice
needs. No TPU, network or credentials are involved.

Per chip: the HBM that libtpu's compiler lets a program use (probed here: the number its
out-of-memory error states), the peak dense bf16 FLOP/s and the on-demand list price per
chip-hour (Google Cloud's TPU pricing page, us-central regions; ``--price`` overrides it), and for
the roofline estimate (aot/anatomy.py) the HBM bandwidth and the inter-chip (ICI) bandwidth, one
way, over all of a chip's links: Cloud TPU's system architecture pages (v5e: 819 GB/s HBM, 1,600
Gbps ICI = 400 GB/s bidirectional; v5p: 2,765 GB/s, 4,800 Gbps = 1,200 GB/s bidirectional; v6e:
1,638 GB/s, 3,200 Gbps = 800 GB/s bidirectional; v4: 1,200 GB/s HBM, its page states no ICI
figure per chip: 2,400 Gbps is assumed, unverified).
"""

import dataclasses
import functools
import importlib.util
import os
import re

from farmer_jax.errors import UserError, brief

GIB = 2 ** 30

# the libtpu that jax[tpu]==0.10.2 pins (pyproject.toml's tpu-aot extra)
INSTALL = "pip install 'farmer_jax[tpu-aot]' (or: pip install 'libtpu==0.0.42.*')"


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation: how libtpu names its topologies, what a slice name counts (TensorCores,
  2 per chip, for v4 and v5p; chips for v5e and v6e), the usable HBM, peak and price per chip, and
  the 2D/3D shapes (chips -> topology) Cloud TPU offers."""
  name: str
  prefixes: tuple          # how users write the generation before '-N'
  topology_prefix: str     # libtpu's name in topology_name, e.g. 'v5e' in 'v5e:4x4'
  chip_config: str
  cores_per_chip: int      # what the N in 'v4-N' counts per chip
  hbm_bytes: int
  peak_flops: float        # dense bf16 FLOP/s per chip
  price_per_chip_hour: float
  shapes: dict
  hbm_bandwidth: float = 0.0   # bytes/s per chip
  ici_bandwidth: float = 0.0   # bytes/s per chip, one way, all links


_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
       256: "4x8x8"}
_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}

CHIPS = (
    Chip("v4", ("v4",), "v4", "megacore", 2, int(30.75 * GIB), 275e12, 3.22, _3D,
         1200e9, 2400e9 / 8),
    Chip("v5e", ("v5litepod", "v5e"), "v5e", "default", 1, int(15.75 * GIB), 197e12, 1.20, _2D,
         819e9, 1600e9 / 8),
    Chip("v5p", ("v5p",), "v5", "megacore", 2, int(95.74 * GIB), 459e12, 4.20, _3D,
         2765e9, 4800e9 / 8),
    Chip("v6e", ("v6e",), "v6e", "default", 1, int(31.25 * GIB), 918e12, 2.70, _2D,
         1638e9, 3200e9 / 8),
)


@dataclasses.dataclass(frozen=True)
class Slice:
  """A (multi-)slice: ``num_slices`` slices of ``chips`` chips of ``chip``, named ``name``."""
  name: str
  chip: Chip
  chips: int
  num_slices: int = 1

  @property
  def topology(self):
    return f"{self.chip.topology_prefix}:{self.chip.shapes[self.chips]}"

  @property
  def devices_total(self):
    return self.chips * self.num_slices

  @property
  def label(self):
    """'v5p-64', or 'v5p-64 x 2 slices'."""
    return self.name if self.num_slices == 1 else f"{self.name} x {self.num_slices} slices"

  def describe(self):
    return (f"{self.label}: {self.devices_total} TPU {self.chip.name} chips "
            f"({self.topology}), {self.chip.hbm_bytes / GIB:.2f} GiB HBM per chip")


def known_names():
  """Every slice name this module knows, for messages."""
  out = []
  for chip in CHIPS:
    out += [f"{chip.prefixes[0]}-{n * chip.cores_per_chip}" for n in chip.shapes]
  return out


def parse_slice(name, num_slices=1):
  """'v5p-64' -> Slice; UserError naming the bad value and the names that exist."""
  fix = f"Fix: use one of {', '.join(known_names())}"
  if num_slices < 1:
    raise UserError(f"--num_slices={num_slices} must be >= 1")
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", str(name).strip().lower())
  chip = next((c for c in CHIPS if m and m.group(1) in c.prefixes), None)
  if chip is None:
    raise UserError(f"--topology={name}: unknown TPU slice name. {fix}")
  n = int(m.group(2))
  if n % chip.cores_per_chip or n // chip.cores_per_chip not in chip.shapes:
    what = "TensorCores (2 per chip)" if chip.cores_per_chip == 2 else "chips"
    raise UserError(f"--topology={name}: {chip.name} slices count {what}, and Cloud TPU offers "
                    f"no {chip.name} slice of {n}. {fix}")
  return Slice(f"{m.group(1)}-{n}", chip, n // chip.cores_per_chip, num_slices)


def libtpu_missing():
  """None if libtpu can be imported, else the one-line reason with what to install."""
  if importlib.util.find_spec("libtpu") is None:
    return (f"compiling for a TPU slice needs libtpu, which is not installed. Fix: {INSTALL} "
            "(a ~210 MB wheel; no TPU, network access at run time or credentials are needed)")
  return None


def slice_devices(s: Slice):
  """The devices of ``s`` (they exist only to compile for: nothing runs on them)."""
  why = libtpu_missing()
  if why:
    raise UserError(why)
  import jax
  # compile-only devices: no chip is opened, so several processes (a check beside a test run)
  # need not queue on libtpu's one-process lock file
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    return _devices(s.topology, s.chip.chip_config, s.num_slices)
  except jax.errors.JaxRuntimeError as e:
    raise UserError(f"libtpu cannot describe {s.topology} x {s.num_slices}: {brief(e)}. Fix: "
                    f"check that libtpu matches jax ({INSTALL})") from None


@functools.lru_cache(maxsize=None)
def _devices(topology, chip_config, num_slices):
  from jax.experimental.topologies import get_topology_desc
  topo = get_topology_desc(platform="tpu", topology_name=topology, chip_config_name=chip_config,
                           chips_per_host_bounds=(2, 2, 1), num_slices=num_slices)
  return tuple(topo.devices)


def processes(devices):
  """How many hosts (processes) the devices of a slice belong to."""
  return len({d.process_index for d in devices})
