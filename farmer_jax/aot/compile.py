"""Compiles each program of a run (aot/programs.py) for its devices and judges it: per-device
memory from XLA's own plan against the chip's HBM (FITS / DOES NOT FIT, by how much), XLA's FLOP
count next to the analytic one, and for the train step a time and cost projection of the whole
schedule at a stated MFU.

Memory: a program needs ``arguments + outputs - aliased + temporaries`` bytes per device
(``compiled.memory_analysis()``; donated state is aliased to the new state, so it is counted
once). A program that cannot fit does not compile for a TPU: libtpu raises RESOURCE_EXHAUSTED
stating the temporaries it needs and the HBM it has, and that is the verdict then.

FLOPs: XLA counts a ``while`` body once whatever its trip count, and the model's AF blocks, their
layers and the AR layers run under ``scan``; so XLA's number is set against the analytic count
with each of those loops run once (flops.py on a 1-block, 1-layer model), per device. The time
projection uses the analytic count of the whole step (matmul FLOPs, MFU's convention).
"""

import dataclasses
import re
import time
from typing import Optional

from farmer_jax import xla_options
from farmer_jax.aot.slices import GIB
from farmer_jax.errors import brief

# libtpu: "... the total memory required for HLO temporaries (116.18G) exceeds available HBM
# (15.75G)"
_OOM = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\).*?available HBM "
                  r"\(([\d.]+)([KMGT]?)\)", re.S)
_UNIT = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def size(n):
  """Bytes as GiB (MiB below 0.1 GiB)."""
  return f"{n / GIB:.2f} GiB" if n >= 0.1 * GIB else f"{n / 2 ** 20:.1f} MiB"


@dataclasses.dataclass(frozen=True)
class Memory:
  """Per-device bytes of a compiled program (``memory_analysis()``)."""
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int = 0

  @property
  def total(self):
    return self.arguments + self.outputs - self.aliased + self.temporaries

  @classmethod
  def of(cls, compiled):
    m = compiled.memory_analysis()
    return cls(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
               int(m.alias_size_in_bytes), int(m.temp_size_in_bytes),
               int(m.generated_code_size_in_bytes))


@dataclasses.dataclass(frozen=True)
class Verdict:
  """Whether a program fits: ``needed`` bytes per device of ``available`` (None: the device's
  memory is unknown, e.g. a CPU)."""
  fits: Optional[bool]
  needed: int
  available: Optional[int]

  @property
  def margin(self):
    """Bytes left (>= 0) or missing (< 0); None when the memory is unknown."""
    return None if self.available is None else self.available - self.needed

  def describe(self):
    if self.available is None:
      return f"needs {size(self.needed)} per device (device memory unknown)"
    word = "FITS" if self.fits else "DOES NOT FIT"
    side = "left" if self.fits else "over"
    return (f"{word}: {size(self.needed)} of {size(self.available)} per device "
            f"({size(abs(self.margin))} {side})")


def verdict(memory: Memory, available):
  """The verdict of a compiled program's memory against ``available`` bytes (None: unknown)."""
  if available is None:
    return Verdict(None, memory.total, None)
  return Verdict(memory.total <= available, memory.total, int(available))


def parse_oom(message):
  """(bytes needed, bytes available) from libtpu's out-of-memory compile error, or None."""
  m = _OOM.search(str(message))
  if not m:
    return None
  return (int(float(m.group(1)) * _UNIT[m.group(2)]), int(float(m.group(3)) * _UNIT[m.group(4)]))


@dataclasses.dataclass
class Compiled:
  """What compiling one program gave: its memory (None if it did not compile), verdict, XLA's
  FLOPs per device, compile seconds, the error when it failed for another reason, and for a
  program whose batch is the user's (``Program.at_batch``) the largest power-of-two fraction of
  it that fits when it does not (``compile_fitting``)."""
  program: object
  memory: Optional[Memory]
  verdict: Optional[Verdict]
  xla_flops: Optional[float]
  seconds: float
  error: Optional[str] = None
  fits_at: Optional[int] = None   # a batch that fits, for a program that does not

  @property
  def ok(self):
    return self.error is None and self.verdict is not None and self.verdict.fits is not False


def compiled_of(p):
  """jax's Compiled of program ``p`` (aot/programs.py ``Program``): lowered under its mesh
  context and compiled for its devices; raises as compiling does."""
  with p.context():
    return p.fn.lower(*p.args).compile()


def compile_program(p, available):
  """Lowers and compiles program ``p`` (aot/programs.py ``Program``) and judges it against
  ``available`` bytes per device. An out-of-memory compile is a DOES NOT FIT verdict; any other
  compile failure is recorded as ``error`` (the run would fail the same way), except XLA's refusal
  of config.train.xla_options (``xla_options.refusal``), which is raised."""
  import jax
  t0 = time.perf_counter()
  try:
    compiled = compiled_of(p)
  except jax.errors.JaxRuntimeError as e:
    if xla_options.refusal(e):   # the config's, not the program's: the command's one line
      raise
    oom = parse_oom(e)
    if oom is None:
      return Compiled(p, None, None, None, time.perf_counter() - t0, brief(e, 400))
    return Compiled(p, None, Verdict(False, oom[0], oom[1] if available is None else available),
                    None, time.perf_counter() - t0)
  memory = Memory.of(compiled)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost["flops"]) if cost and "flops" in cost else None
  return Compiled(p, memory, verdict(memory, available), flops, time.perf_counter() - t0)


@dataclasses.dataclass(frozen=True)
class Projection:
  """The time of ``step`` (a train or distill step) at ``mfu`` of ``chips`` chips' peak, and the
  whole schedule's, at ``price`` per chip-hour (None: no cost)."""
  step: str
  mfu: float
  step_seconds: float
  steps: int
  hours: float
  chip_hours: float
  price: Optional[float]
  cost: Optional[float]


def project(step_flops, steps, chips, peak_flops, mfu, price_per_chip_hour=None,
            step="train step"):
  """The projection of ``steps`` steps named ``step`` of ``step_flops`` (analytic, the global
  batch) on ``chips`` chips of ``peak_flops`` each at ``mfu``; cost at ``price_per_chip_hour``
  (None: no cost)."""
  seconds = step_flops / (chips * peak_flops * mfu)
  hours = seconds * steps / 3600
  chip_hours = hours * chips
  cost = None if price_per_chip_hour is None else chip_hours * price_per_chip_hour
  return Projection(step, mfu, seconds, int(steps), hours, chip_hours, price_per_chip_hour, cost)


def compile_fitting(p, available):
  """``compile_program``; when ``p`` does not fit and its batch is the user's to choose, also the
  largest batch ``p.batch / 2^k`` that does (``Compiled.fits_at``; None when not even 1 does)."""
  c = compile_program(p, available)
  if c.verdict is None or c.verdict.fits is not False or p.at_batch is None:
    return c
  b = p.batch // 2
  while b >= 1:
    if compile_program(p.at_batch(b), available).ok:
      c.fits_at = b
      break
    b //= 2
  return c
