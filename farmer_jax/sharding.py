"""Mesh from config and logical-axis sharding (the same code path on 1 CPU and on a pod).

Logical axis names used on params/activations: batch, seq, embed, mlp, heads, kv, token, head, classes, layers,
blocks. ``config.sharding_rules`` maps them to mesh axes; an unmapped name is replicated.

FSDP (``config.fsdp``): after the logical rules, every param with at least ``min_params`` elements is further
sharded over the ``axis`` mesh axis on its largest dimension that is still unsharded and divisible by the axis
size (big_vision's strategy). Optimizer moments mirror the params' shardings.
"""

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def make_mesh(mesh_spec, devices=None):
  """``(('data', -1), ('fsdp', 1))`` -> an Auto-typed Mesh; -1 takes the remaining devices."""
  devices = jax.devices() if devices is None else devices
  names = tuple(n for n, _ in mesh_spec)
  sizes = [int(s) for _, s in mesh_spec]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh={mesh_spec!r}: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if len(devices) % known:
    raise ValueError(f"config.mesh={mesh_spec!r} needs a multiple of {known} devices, have {len(devices)}")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"config.mesh={mesh_spec!r} has {int(np.prod(sizes))} slots for {len(devices)} devices")
  return jax.sharding.Mesh(np.asarray(devices).reshape(sizes), names,
                           axis_types=(AxisType.Auto,) * len(names))


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
  """Adds ``axis`` to the largest unsharded dim of ``shape`` divisible by ``axis_size`` (params >= min_params)."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  if axis_size <= 1 or int(np.prod(shape)) < min_params or axis in _used_axes(entries):
    return P(*entries)
  dims = [d for d in range(len(shape)) if entries[d] is None and shape[d] % axis_size == 0]
  if dims:
    entries[max(dims, key=lambda d: (shape[d], -d))] = axis
  return P(*entries)


def param_shardings(boxed_tree, mesh, rules, fsdp=None):
  """Logical-rule shardings, then FSDP on large params (``fsdp = {'axis': 'fsdp', 'min_params': n}``)."""
  shardings = logical_shardings(boxed_tree, mesh, rules)
  if not fsdp or fsdp.get("axis") not in mesh.shape:
    return shardings
  axis, size, min_params = fsdp["axis"], mesh.shape[fsdp["axis"]], int(fsdp.get("min_params", 0))
  abstract = nn.unbox(boxed_tree)
  return jax.tree.map(lambda a, s: NamedSharding(mesh, fsdp_spec(a.shape, s.spec, axis, size, min_params)),
                      abstract, shardings)


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh, rules):
  spec = nn.logical_to_mesh_axes(("batch",), rules)
  return NamedSharding(mesh, spec)


def opt_state_shardings(tx, abstract_opt_state, param_sh, mesh):
  """Optimizer-state leaves that mirror params take the params' sharding; the rest are replicated."""
  rep = replicated(mesh)
  base = jax.tree.map(lambda _: rep, abstract_opt_state)
  return optax.tree_map_params(tx, lambda _, s: s, base, param_sh, transform_non_params=lambda _: rep)


def global_batch(local_batch, mesh, sharding):
  """Assembles a global array from this process's slice of the batch (multi-host safe)."""
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), local_batch)
