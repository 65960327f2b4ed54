"""Mesh from config and logical-axis sharding (the same code path on 1 CPU and on a pod).

Logical axis names used on params/activations: batch, seq, embed, mlp, heads, kv, token, head,
classes, layers, blocks. ``config.sharding_rules`` maps them to mesh axes; an unmapped name is
replicated.

FSDP (``config.fsdp``): after the logical rules, every param with at least ``min_params`` elements
is further sharded over the ``axis`` mesh axis on its largest dimension that is still unsharded and
divisible by the axis size (big_vision's strategy). Optimizer moments mirror the params' shardings.
"""

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from farmer_jax.config.rules import FieldError
from farmer_jax.errors import ConfigError


def mesh_shape(mesh_spec, num_devices):
  """``config.mesh`` (a sequence of (name, size); at most one size -1, which takes the remaining
  devices) -> (names, sizes) for ``num_devices`` devices. Raises ConfigError naming config.mesh and
  the fix.

  The one place that decides whether a mesh spec fits a device count (make_mesh and config.parse use
  it).
  """
  bad = lambda why, fix: FieldError("mesh", mesh_spec, why, fix)
  example = "e.g. (('data', -1), ('fsdp', 1))"
  if isinstance(mesh_spec, (str, bytes)) or not hasattr(mesh_spec, "__len__") or not len(mesh_spec):
    raise bad("it must be a non-empty sequence of (axis name, size) pairs",
              f"set config.mesh, {example}")
  names, sizes = [], []
  for entry in mesh_spec:
    if isinstance(entry, (str, bytes)) or not hasattr(entry, "__len__") or len(entry) != 2:
      raise bad(f"entry {entry!r} is not an (axis name, size) pair",
                f"write each axis as (name, size), {example}")
    name, size = entry
    if not isinstance(name, str) or not name:
      raise bad(f"axis name {name!r} is not a non-empty string", f"name each axis, {example}")
    if isinstance(size, bool) or not isinstance(size,
                                                (int, np.integer)) or not (size >= 1 or size == -1):
      raise bad(
          f"axis {name!r} has size {size!r}; a size is an integer >= 1, or -1 for the remaining "
          "devices",
          f"use a positive size or -1, {example}")
    names.append(name)
    sizes.append(int(size))
  if len(set(names)) != len(names):
    raise bad(f"axis names {names} repeat", "give every mesh axis its own name")
  if sizes.count(-1) > 1:
    raise bad("at most one axis may be -1 (the remaining devices)",
              "give all but one axis an explicit size")
  known = int(np.prod([s for s in sizes if s != -1]))
  if num_devices % known:
    raise bad(
        f"its fixed axis sizes multiply to {known}, which does not divide the "
        f"{num_devices} devices",
        f"use axis sizes whose product divides {num_devices}, or -1 on one axis")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != num_devices:
    raise bad(f"it has {int(np.prod(sizes))} slots for {num_devices} devices",
              f"make the sizes multiply to {num_devices}, or set one axis to -1")
  return tuple(names), tuple(sizes)


def make_mesh(mesh_spec, devices=None):
  """``(('data', -1), ('fsdp', 1))`` -> an Auto-typed Mesh over ``devices`` (default: all); -1
  takes the remaining devices. ``jax.make_mesh`` orders the devices (TPU: along the physical
  torus; GPU: by device id; CPU: as given). Devices of several TPU slices (multi-slice, DCN
  between them): the mesh's first axis spans the slices (data parallel over DCN, every other
  axis inside a slice over ICI), so its size must be a multiple of the slice count."""
  devices = jax.devices() if devices is None else list(devices)
  names, sizes = mesh_shape(mesh_spec, len(devices))
  axis_types = (AxisType.Auto,) * len(names)
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices == 1:
    return jax.make_mesh(sizes, names, axis_types=axis_types, devices=devices)
  if sizes[0] % slices:
    raise FieldError("mesh", mesh_spec,
                     f"its first axis {names[0]!r} (size {sizes[0]}) spans the {slices} slices, "
                     f"and {sizes[0]} is not a multiple of {slices}",
                     f"make the first axis a multiple of {slices}, e.g. (('data', {slices}), "
                     "('fsdp', -1))")
  from jax.experimental import mesh_utils
  ici = (sizes[0] // slices,) + tuple(sizes[1:])
  dcn = (slices,) + (1,) * (len(sizes) - 1)
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  return jax.sharding.Mesh(grid, names, axis_types=axis_types)


def logical_rules(sharding_rules):
  """``config.sharding_rules`` (pairs in any sequence type, e.g. lists from a JSON config) -> the
  tuple of (logical name, mesh axes) tuples that flax's logical-axis functions take."""
  return tuple(tuple(r) for r in sharding_rules)


@contextlib.contextmanager
def mesh_context(mesh, rules):
  """``mesh`` and the logical-axis ``rules`` active while tracing / running jitted code."""
  with nn.logical_axis_rules(rules), jax.set_mesh(mesh):
    yield


def batch_mesh_axes(rules):
  """The mesh axes the logical 'batch' axis maps to under ``config.sharding_rules`` (a tuple; empty
  if unmapped)."""
  for logical, axes in rules:
    if logical == "batch":
      if axes is None:
        return ()
      return tuple(axes) if isinstance(axes, (list, tuple)) else (axes,)
  return ()


def batch_slots(mesh, rules):
  """How many ways the batch is split on ``mesh``: the product of its batch mesh axes' sizes."""
  return int(np.prod([mesh.shape[a] for a in batch_mesh_axes(rules)], dtype=np.int64))


def padded_batch_size(requested, mesh, rules, processes=None):
  """A global batch (eval, sampling) rounded up to a multiple of the mesh's data-parallel slots
  and of the process count (default this run's), so every process holds an equal, shardable slice
  of every padded batch."""
  processes = jax.process_count() if processes is None else processes
  unit = math.lcm(batch_slots(mesh, rules), processes)
  return -(-int(requested) // unit) * unit


def logical_shardings(boxed_tree, mesh, rules):
  """Boxed (LogicallyPartitioned) abstract tree -> NamedSharding tree."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)


def _used_axes(spec):
  used = set()
  for e in spec:
    if e is None:
      continue
    used.update(e if isinstance(e, tuple) else (e,))
  return used


def fsdp_spec(shape, spec, axis, axis_size, min_params):
  """Adds ``axis`` to the largest unsharded dim of ``shape`` divisible by ``axis_size``
  (params >= min_params)."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  if axis_size <= 1 or int(np.prod(shape)) < min_params or axis in _used_axes(entries):
    return P(*entries)
  dims = [d for d in range(len(shape)) if entries[d] is None and shape[d] % axis_size == 0]
  if dims:
    entries[max(dims, key=lambda d: (shape[d], -d))] = axis
  return P(*entries)


def param_shardings(boxed_tree, mesh, rules, fsdp=None):
  """Logical-rule shardings, then FSDP on large params
  (``fsdp = {'axis': 'fsdp', 'min_params': n}``)."""
  shardings = logical_shardings(boxed_tree, mesh, rules)
  if not fsdp or fsdp.get("axis") not in mesh.shape:
    return shardings
  axis, size, min_params = fsdp["axis"], mesh.shape[fsdp["axis"]], int(fsdp.get("min_params", 0))
  abstract = nn.unbox(boxed_tree)
  return jax.tree.map(
      lambda a, s: NamedSharding(mesh, fsdp_spec(a.shape, s.spec, axis, size, min_params)),
      abstract, shardings)


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh, rules):
  spec = nn.logical_to_mesh_axes(("batch",), rules)
  return NamedSharding(mesh, spec)


def opt_state_shardings(tx, abstract_opt_state, param_sh, mesh):
  """Optimizer-state leaves that mirror params take the params' sharding; the rest are
  replicated."""
  rep = replicated(mesh)
  base = jax.tree.map(lambda _: rep, abstract_opt_state)
  return optax.tree_map_params(
      tx, lambda _, s: s, base, param_sh, transform_non_params=lambda _: rep)


def host_to_global(tree, shardings):
  """Host arrays that every process holds in full (params read from a checkpoint or an export, a
  batch's keys and labels) -> global arrays with ``shardings``; each device gets its slice."""
  return jax.tree.map(
      lambda a, s: jax.make_array_from_callback(a.shape, s, lambda idx: a[idx]), tree, shardings)


def local_rows(x):
  """(row indices, rows) of the leading axis of the array ``x`` that this process holds, each row
  once and in order (all of them for an array on this process's devices only)."""
  if x.is_fully_addressable:
    return np.arange(x.shape[0]), np.asarray(x)
  parts = {}
  for s in x.addressable_shards:
    parts.setdefault(s.index[0].start or 0, s.data)
  starts = sorted(parts)
  data = [np.asarray(parts[a]) for a in starts]
  return np.concatenate([np.arange(a, a + len(d)) for a, d in zip(starts, data)]), np.concatenate(
      data)


def gather_rows(rows, tree, size):
  """Every process's rows of a batch of ``size`` (``rows`` and a tree of host arrays with those
  rows, the same count on every process, e.g. from ``local_rows``) -> the whole batch in row order,
  on every process. A collective: every process calls it."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    rows, tree = multihost_utils.process_allgather((rows, tree))
  rows = np.asarray(rows).reshape(-1)

  def place(a):
    a = np.asarray(a)
    a = a.reshape((-1,) + a.shape[2:]) if jax.process_count() > 1 else a
    out = np.zeros((size,) + a.shape[1:], a.dtype)
    out[rows] = a   # a row held by several processes is the same row
    return out
  return jax.tree.map(place, tree)


def global_batch(local_batch, mesh, sharding):
  """Assembles a global array from this process's slice of the batch (multi-host safe)."""
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)),
                      local_batch)


def place(tree, shardings):
  """``tree`` put on ``shardings`` (``jax.device_put``). Abstract leaves (ShapeDtypeStructs: the
  arguments of a program compiled for a target slice, aot/programs.py) get the sharding attached
  instead."""
  def put(a, s):
    if isinstance(a, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
    return jax.device_put(a, s)
  return jax.tree.map(put, tree, shardings)


def fitting_mesh(config, say=print):
  """The run ``config``'s mesh on these devices, or, if its fixed axis sizes do not fit them, the
  same axes with every device on the first batch axis (data parallel): how a trained model is
  evaluated and sampled on whatever devices are at hand."""
  try:
    return make_mesh(config.mesh)
  except (ConfigError, ValueError) as e:
    rules = logical_rules(config.sharding_rules)
    names = [n for n, _ in config.mesh]
    batch_axes = [a for a in batch_mesh_axes(rules) if a in names] or names[:1]
    spec = tuple((n, -1 if n == batch_axes[0] else 1) for n in names)
    say(f"the run's mesh {tuple(map(tuple, config.mesh))} does not fit {jax.device_count()} "
        f"device(s) ({str(e).splitlines()[0]}); using data-parallel {spec}")
    return make_mesh(spec)
