"""Every jitted program a run executes, built by the code the run itself uses, with abstract
arguments (ShapeDtypeStructs carrying the run's shardings): what ``aot/compile.py`` lowers and
compiles for a mesh of devices that need not exist here.

A pretraining run (`farmer_jax train`) executes, on its mesh: the train step at the global batch,
the bits/dim eval step at the padded eval batch, and the end-of-run sample grid at its batch
(train/report.py ``grid_batch_size``). The grid drawn at every periodic eval
(``config.sample.periodic_classes`` rows) runs the same sampler at a batch no larger, so it is not
compiled separately: the end-of-run grid's program bounds its memory. A distillation (`farmer_jax
distill`): its step and the student's reconstruction error. From an export, `farmer_jax sample` /
`fid` draw on the run's mesh with the export's sampler, each device its share of the batch with the
weights gathered (the program of one chip at the batch per device, their default --batch
``SAMPLE_BATCH`` per device), and `fid` runs the Inception-v3 feature network on each host's first
chip.
"""

import contextlib
import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from farmer_jax import flops, sharding
from farmer_jax.config.parse import RunConfig
from farmer_jax.config.schema import SAMPLE_BATCH
from farmer_jax.model import abstract_params

# what `check --programs` selects: the train (or distill) step, the eval (or reconstruction
# error) step, the end-of-run sample grid, an export's sampler, fid's Inception-v3 features
KEYS = ("train", "eval", "grid", "sampler", "fid")

TRAIN_FIX = ("shard the state further (a larger fsdp axis in config.mesh), lower the per-device "
             "batch (config.train.batch_size or more devices), keep config.model.remat=True, or "
             "take chips with more HBM")
EVAL_FIX = "lower config.eval.batch_size (it is split over the mesh's data-parallel slots)"
GRID_FIX = "lower config.sample.batch_size (the grid is drawn in batches of it over the mesh)"
EXPORT_FIX = ("pass a smaller --batch to `farmer_jax sample` / `fid` (it is split over the mesh's "
              "data-parallel slots), or export with --dtype=bfloat16")


@dataclasses.dataclass(frozen=True)
class Program:
  """One jitted program (``key``: one of KEYS): ``fn`` lowered with ``args`` under ``context()``
  (the mesh and its logical-axis rules), on ``devices`` devices. ``flops``: its analytic matmul
  FLOPs on the whole batch (flops.py); ``flops_loops_once`` the same with each scanned loop body
  counted once, as XLA's cost analysis counts; None where no closed form is kept. ``train_step``:
  the step the time projection is of. ``fix``: what makes it fit when it does not. ``at_batch``
  (where the batch is the user's to choose): the same program at another ``batch``."""
  key: str
  name: str
  what: str
  fn: Callable
  args: tuple
  context: Callable
  devices: int
  flops: Optional[float] = None
  flops_loops_once: Optional[float] = None
  train_step: bool = False
  fix: str = ""
  batch: int = 0
  at_batch: Optional[Callable[[int], "Program"]] = None


def _abstract(shape, dtype, sh=None):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)


def _key():
  return jax.eval_shape(lambda: jax.random.key(0))


def _loops_once(m):
  """The model with each scanned loop (AF blocks, their layers, AR layers) run once: what XLA's
  cost analysis counts of the real one (a while body is counted once). Unrolled: the model."""
  if m.unroll:
    return m
  return dataclasses.replace(m, flow_blocks=1, flow_layers=1, ar_depth=1)


def train_programs(run: RunConfig, mesh, processes=1, distill=False):
  """The programs a `farmer_jax train` (``distill``: `farmer_jax distill`) run of ``run`` executes
  on ``mesh`` (``processes`` hosts)."""
  from farmer_jax.train.report import grid_batch_size
  from farmer_jax.train.trainer import make_setup, pretraining
  setup = make_setup(run, mesh)
  m, t = run.model, run.train
  b = t.batch_size
  img = (m.image_size, m.image_size, m.channels)
  batch = {"image": _abstract((b,) + img, jnp.uint8), "label": _abstract((b,), jnp.int32)}
  slots = f"{mesh.size} device{'s' if mesh.size > 1 else ''}, mesh {dict(mesh.shape)}"
  params = sharding.place(abstract_params(m), setup.param_sh)
  out = []
  if distill:
    from farmer_jax.distill.trainer import Teacher, distillation
    task = distillation(Teacher("aot", abstract_params(m)))(setup)
    # the teacher's AF forward, the student's forward and backward (3x): 4 AF passes
    out.append(Program("train", "distill step", f"global batch {b}; {slots}", task.step,
                       (task.abstract_state, batch, _key()) + task.step_args,
                       setup.mesh_context, mesh.size, 4 * flops.flow_flops(m, b),
                       4 * flops.flow_flops(_loops_once(m), b), train_step=True,
                       fix=TRAIN_FIX))
    out.append(_recon_program(setup, task.step_args[0], slots, processes))
    return out
  task = pretraining(setup)
  out.append(Program("train", "train step", f"global batch {b}; {slots}", task.step,
                     (task.abstract_state, batch, _key()), setup.mesh_context, mesh.size,
                     flops.train_step_flops(m, b), flops.train_step_flops(_loops_once(m), b),
                     train_step=True, fix=TRAIN_FIX))
  out.append(_eval_program(setup, params, slots, processes))
  n = grid_batch_size(run, mesh, processes)
  out.append(_sample_program("grid", "sample grid (end of run)", f"batch {n} of the grid; {slots}",
                             m, run.sampler, params, n, setup.mesh_context, mesh.size,
                             setup.batch_sh, fix=GRID_FIX))
  return out


def _eval_program(setup, params, slots, processes):
  """The bits/dim eval step (eval/likelihood.py ``make_eval_step``) at the padded eval batch."""
  from farmer_jax.eval.likelihood import make_eval_step
  run, m = setup.run, setup.run.model
  b = sharding.padded_batch_size(run.eval.batch_size, setup.mesh, run.sharding_rules, processes)
  img = (m.image_size, m.image_size, m.channels)
  sh = setup.batch_sh
  args = (params, _abstract((b,) + img, jnp.uint8, sh), _abstract((b,), jnp.int32, sh),
          _abstract((b,), jnp.bool_, sh), 0, 0, 0)
  doubled = 2 * b if m.num_classes > 0 else b   # [x, y; x, null] in one pass
  return Program("eval", "eval bits/dim", f"eval batch {b}; {slots}",
                 make_eval_step(setup.model, sharding.replicated(setup.mesh)), args,
                 setup.mesh_context, setup.mesh.size, flops.forward_flops(m, doubled),
                 flops.forward_flops(_loops_once(m), doubled), fix=EVAL_FIX)


def _recon_program(setup, teacher, slots, processes):
  """The distilled student's reconstruction error on the eval split (distill/trainer.py)."""
  from farmer_jax.distill.trainer import make_reconstruction_error
  run, m = setup.run, setup.run.model
  b = sharding.padded_batch_size(run.eval.batch_size, setup.mesh, run.sharding_rules, processes)
  img = (m.image_size, m.image_size, m.channels)
  sh = setup.batch_sh
  student = sharding.place(abstract_params(m)["flow"], setup.param_sh["flow"])
  batch = {"image": _abstract((b,) + img, jnp.uint8, sh), "label": _abstract((b,), jnp.int32, sh),
           "mask": _abstract((b,), jnp.bool_, sh)}
  return Program("eval", "student reconstruction error", f"eval batch {b}; {slots}",
                 make_reconstruction_error(m), (student, teacher, batch), setup.mesh_context,
                 setup.mesh.size, fix=EVAL_FIX)


def _sample_program(key, name, what, m, sampler, params, b, context, devices, batch_sh, fix,
                    student=None):
  from farmer_jax.sampling.generate import make_sample_fn
  fn = make_sample_fn(m, sampler, None, batch_sh)
  args = (params, _abstract((b, 2), jnp.uint32, batch_sh), _abstract((b,), jnp.int32, batch_sh),
          student)
  return Program(key, name, what, fn.fn, args, context, devices, fix=fix)


def export_programs(run: RunConfig, device, batch=SAMPLE_BATCH):
  """What each ``device`` runs of `farmer_jax sample` and `fid` from an fp32 export of ``run``'s
  model: the sampler of config.sample at ``batch`` samples per device (on a mesh every device runs
  the whole model on its share of the batch, the weights gathered once per call:
  ``sampling.generate.make_sample_fn``), and fid's Inception-v3 features."""
  from farmer_jax.eval import inception
  m = run.model
  context = contextlib.nullcontext   # the commands run without a mesh, on one device
  rep = jax.sharding.SingleDeviceSharding(device)
  params = sharding.place(abstract_params(m), jax.tree.map(lambda _: rep, abstract_params(m)))

  def sampler_at(b):
    p = _sample_program("sampler", "sample / fid sampler (export)", f"{b} per device", m,
                        run.sampler, params, b, context, 1, rep, EXPORT_FIX)
    return dataclasses.replace(p, batch=b, at_batch=sampler_at)

  out = [sampler_at(batch)]
  n = inception.FEATURE_BATCH
  net = jax.tree.map(lambda a: _abstract(a.shape, a.dtype, rep), inception.abstract_params())
  x = _abstract((n, inception.SIZE, inception.SIZE, 3), jnp.float32, rep)
  out.append(Program("fid", "fid Inception-v3 features", f"batch {n}; 1 device",
                     inception.network, (net, x), context, 1, fix=EXPORT_FIX))
  raw = _abstract((n, m.image_size, m.image_size, m.channels), jnp.uint8, rep)
  out.append(Program("fid", "fid image preprocessing", f"batch {n}; 1 device",
                     inception.preprocess, (raw,), context, 1, fix=EXPORT_FIX))
  return out


def not_compiled(run: RunConfig):
  """Lines naming what a run of ``run`` executes that ``train_programs`` leaves out."""
  out = []
  if run.eval.mnist_quality:
    out.append("the MNIST sample-quality score (eval.mnist_quality: a 32x32 digit CNN on the "
               "host's default device)")
  return out
