"""XLA's TPU compiler options for overlapping collectives with compute, in one place.

With its defaults the TPU compiler (libtpu 0.0.42.1) leaves the all-gathers of an FSDP train step
synchronous: each waits for its link traffic while the TensorCore idles. ``TPU_OPTIONS`` turns on
XLA's async collective fusion (a fusion starts the collective, the compute fusions that follow run
its steps, a later fusion completes it) and async all-gathers and all-reduces, which the
scheduler places around the matmuls: the set Google's MaxText recipes pass (as LIBTPU_INIT_ARGS)
for v5p and v6e.

The train (and distill) step is jitted with them on a TPU mesh (``for_devices``, from
``train.trainer.Setup.jit_step``), so `farmer_jax train` on a TPU and the AOT check of that step
for a slice (`farmer_jax check --topology`, benchmarks/tpu_programs.py) compile the same program.
``config.train.xla_options`` chooses them: 'tpu' (the default, this set), 'none' (XLA's defaults:
the way out when a libtpu does not know one of these flags and refuses the compile) or
'flag=value,...'. A compile that XLA refuses for one of them (a flag this libtpu does not know, a
value it cannot parse) ends the command with one line naming the flag and that way out
(``refusal``, commands/exits.py). A flag the user names in LIBTPU_INIT_ARGS (which libtpu reads
when it loads) is left to that setting. libtpu 0.0.42.1 (what jax[tpu]==0.10.2 pins) knows them all.
docs/performance.md ("TPU programs") has what they do to the compiled 1.1B/16 step on v5p-64: an
estimate from the compiled program, not a measurement on a TPU.
"""

import os
import re
import sys

TPU_OPTIONS = {
    "xla_tpu_enable_async_collective_fusion": "true",
    "xla_tpu_enable_async_collective_fusion_fuse_all_gather": "true",
    "xla_tpu_enable_async_collective_fusion_fuse_all_reduce": "true",
    "xla_tpu_enable_async_collective_fusion_multiple_steps": "true",
    "xla_tpu_overlap_compute_collective_tc": "true",
    "xla_enable_async_all_gather": "true",
    "xla_enable_async_all_reduce": "true",
    "xla_tpu_enable_data_parallel_all_reduce_opt": "true",
    "xla_tpu_data_parallel_opt_different_sized_ops": "true",
}


def named_in_libtpu_args(environ=os.environ):
  """The flags LIBTPU_INIT_ARGS names (``--flag=value``, ``--flag``, or absl's ``--noflag``)."""
  names = set(re.findall(r"--([\w.]+)", environ.get("LIBTPU_INIT_ARGS", "")))
  return names | {n[2:] for n in names if n.startswith("no")}


def valid(text):
  """Whether ``text`` is a ``config.train.xla_options`` value: 'tpu', 'none' (or ''), or
  'flag=value,...' with XLA flag names."""
  if not isinstance(text, str):
    return False
  return all(re.fullmatch(r"-{0,2}\w+(=[\w.+-]*)?", item.strip())
             for item in text.split(",") if item.strip())


def parse(text):
  """{flag: value} of a valid ``text`` (``valid``): 'tpu': TPU_OPTIONS; 'none' or '': {};
  'flag=value,...' (leading dashes dropped; a bare flag is 'true')."""
  if text.strip() in ("", "none"):
    return {}
  if text.strip() == "tpu":
    return dict(TPU_OPTIONS)
  out = {}
  for item in text.split(","):
    item = item.strip().lstrip("-")
    if item:
      k, _, v = item.partition("=")
      out[k] = v or "true"
  return out


def for_devices(devices, options="tpu", environ=os.environ):
  """The compiler options for a program on ``devices``: ``parse(options)`` on TPU devices (real,
  or a slice's description for an AOT compile), less the flags LIBTPU_INIT_ARGS names; None
  elsewhere (and when none is left)."""
  devices = list(devices)
  if not devices or devices[0].platform != "tpu":
    return None
  mine = named_in_libtpu_args(environ)
  out = {k: v for k, v in parse(options).items() if k not in mine}
  return out or None


# How XLA words its refusal of a compiler option (TPU: libtpu 0.0.42.1; CPU), what to call it, and
# how the rest of XLA's message (e.g. the values a flag accepts) joins that
_REFUSALS = (
    (r"No such compile option: '(?P<flag>[\w.]+)'", "no such option", ": "),
    (r"Failed to parse '(?P<value>[^']*)' into flag (?P<flag>[\w.]+)", "a value it cannot parse",
     ": "),
    (r"While setting option (?P<flag>[\w.]+), '(?P<value>[^']*)' is not a valid", "not a valid",
     " "),
)


def refusal(e):
  """The one-line message for XLA's refusal of a compiler option, which only this module's
  options can cause (``e``: the ``JaxRuntimeError`` of the compile); None for any other error."""
  jax = sys.modules.get("jax")   # never imported: ``e`` cannot be jax's error
  if jax is None or not isinstance(e, jax.errors.JaxRuntimeError):
    return None
  for pattern, reason, joint in _REFUSALS:
    m = re.search(pattern, str(e))
    if m:
      named = m.group("flag") + (f"={m.group('value')}" if "value" in m.groupdict() else "")
      detail = " ".join(str(e)[m.end():].split()).strip(" :.")   # e.g. the values it accepts
      detail = detail if len(detail) <= 200 else detail[:200] + "..."
      return (f"the XLA compiler refused the compile option {named} ({reason}"
              f"{joint + detail if detail else ''}) that config.train.xla_options asked for (its "
              "default 'tpu' is xla_options.TPU_OPTIONS). Fix: --config.train.xla_options=none "
              "(XLA's defaults), or a 'flag=value,...' list without it")
  return None
