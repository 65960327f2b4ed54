"""Shared tiny configs and helpers. One tiny model shape is reused across tests to limit jit
compiles."""

import dataclasses
import os

# Tests compile many small programs and run each a few times: XLA's LLVM backend at -O0 cuts the
# default suite's wall time by ~30% on a 2-core CPU (compilation dominates) and computes the same
# functions. Set before jax creates its backend; subprocesses started with os.environ inherit it.
# FARMER_TEST_XLA_OPT=1 keeps XLA's default optimisation level (e.g. to test the optimised code).
if os.environ.get("FARMER_TEST_XLA_OPT") != "1":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

# No idle-CPU spinners (farmer_jax/host_cpu.py) in the test processes and the commands they start:
# tests that call the CLI in-process would keep them for the whole session; test_host_cpu asks for
# them explicitly.
os.environ.setdefault("FARMER_JAX_CPU_SPIN", "off")

import jax  # noqa: E402
import pytest  # noqa: E402

from farmer_jax.config.schema import ModelConfig  # noqa: E402
from farmer_jax.model import Farmer, init_params  # noqa: E402

TINY = ModelConfig(image_size=8, channels=1, patch_size=2, num_classes=3, flow_blocks=2,
                   flow_layers=1, flow_width=32, flow_heads=2, ar_width=32, ar_depth=2, ar_heads=2,
                   class_repeats=2, dimred="farmer", d_informative=2, mixtures_informative=3,
                   mixtures_redundant=2)


def fake_devices_env(devices):
  """os.environ for a subprocess with ``devices`` fake CPU devices (the only place the device-count
  flag is set; XLA_FLAGS already set, e.g. the -O0 above, are kept)."""
  flags = (os.environ.get("XLA_FLAGS", "") +
           f" --xla_force_host_platform_device_count={devices}").strip()
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")


def perturb(params, key, scale):
  """Adds N(0, scale^2) noise to every leaf so zero-initialised heads/projections become
  non-trivial."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      tree, [l + scale * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)])


def init_farmer(cfg: ModelConfig, seed=0, scale=0.05):
  """(Farmer, params): ``model.init_params`` with key(seed), then ``perturb``-ed by ``scale``."""
  model = Farmer(cfg)
  params = jax.jit(lambda rng: init_params(cfg, rng))(jax.random.key(seed))
  if scale:
    params = perturb(params, jax.random.key(seed + 100), scale)
  return model, params


def variant(**kw):
  return dataclasses.replace(TINY, **kw)


@pytest.fixture(scope="session")
def tiny():
  model, params = init_farmer(TINY)
  return TINY, model, params


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """The reduced quickstart (real MNIST-5k, 200 steps) trained once per session: (workdir, summary,
  trainer)."""
  from farmer_jax import configlib
  from farmer_jax.config.parse import parse
  from farmer_jax.train.trainer import train_and_report
  workdir = tmp_path_factory.mktemp("quickstart_tiny")
  summary, tr = train_and_report(parse(configlib.load("quickstart:tiny"), str(workdir)),
                                 str(workdir), quiet=True)
  return workdir, summary, tr


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory):
  """``trained_run`` exported once per session: (workdir, export directory, export metadata,
  trainer)."""
  from farmer_jax.artifacts.export import export_model
  workdir, _, tr = trained_run
  out = tmp_path_factory.mktemp("exports") / "model"
  meta = export_model(str(workdir), str(out))
  return workdir, out, meta, tr
