"""Compiling a run's programs ahead of time for a target (farmer_jax/aot, `farmer_jax check
--compile / --topology`): slice names, the fit verdict on fake memory numbers, the projection
arithmetic, XLA's refusal of a compile option as one line, and (slow) that the programs compiled
are the run's own (the same HLO as the trainer's and the report's) and the quickstart compiled for
a real TPU topology through libtpu, with a program that does not fit refused by exit status 2."""

import contextlib
import json
import os
import re
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from farmer_jax import configlib, sharding
from farmer_jax.aot import programs, slices
from farmer_jax.aot.compile import (Compiled, Memory, compile_program, parse_oom, project,
                                     verdict)
from farmer_jax.config.parse import parse
from farmer_jax.errors import UserError

GIB = 2 ** 30


@pytest.mark.parametrize("name,chip,chips,topology", [
    ("v4-32", "v4", 16, "v4:2x2x4"),
    ("v5litepod-16", "v5e", 16, "v5e:4x4"),
    ("v5e-256", "v5e", 256, "v5e:16x16"),
    ("V5P-128", "v5p", 64, "v5:4x4x4"),
    ("v6e-8", "v6e", 8, "v6e:2x4"),
])
def test_slice_names_as_cloud_tpu_writes_them(name, chip, chips, topology):
  s = slices.parse_slice(name)
  assert (s.chip.name, s.chips, s.topology, s.devices_total) == (chip, chips, topology, chips)
  assert slices.parse_slice(name, num_slices=2).devices_total == 2 * chips


@pytest.mark.parametrize("name,why", [
    ("v4-33", r"v4 slices count TensorCores \(2 per chip\).*no v4 slice of 33"),
    ("v5litepod-12", r"no v5e slice of 12"),
    ("tpu-8", r"unknown TPU slice name"),
    ("v5p", r"unknown TPU slice name"),
])
def test_unknown_slice_names_are_refused_with_the_known_ones(name, why):
  with pytest.raises(UserError, match=why + r".*Fix: use one of v4-8, .*v5litepod-16, .*v5p-128"):
    slices.parse_slice(name)
  with pytest.raises(UserError, match="--num_slices=0"):
    slices.parse_slice("v4-8", num_slices=0)


def test_verdict_counts_donated_state_once_and_names_the_margin():
  # arguments 4 + outputs 4 of which 3 aliased (donated state) + temporaries 5 = 10 GiB
  m = Memory(4 * GIB, 4 * GIB, 3 * GIB, 5 * GIB)
  assert m.total == 10 * GIB
  fits = verdict(m, 10 * GIB)
  assert fits.fits and fits.margin == 0
  over = verdict(m, 9 * GIB)
  assert not over.fits and over.margin == -GIB
  assert over.describe() == "DOES NOT FIT: 10.00 GiB of 9.00 GiB per device (1.00 GiB over)"
  assert verdict(m, 16 * GIB).describe() == (
      "FITS: 10.00 GiB of 16.00 GiB per device (6.00 GiB left)")
  unknown = verdict(m, None)
  assert unknown.fits is None and unknown.margin is None and "unknown" in unknown.describe()
  # what the command's exit status follows: a known overflow or an error fails; unknown passes
  prog = object()
  assert Compiled(prog, m, fits, 1.0, 0.0).ok
  assert not Compiled(prog, m, over, 1.0, 0.0).ok
  assert Compiled(prog, m, unknown, 1.0, 0.0).ok
  assert not Compiled(prog, None, None, None, 0.0, error="INTERNAL: boom").ok


class _FakeCompiled:
  """A compiled program needing ``gib(batch)`` GiB of temporaries."""

  def __init__(self, temp):
    self.temp = temp

  def memory_analysis(self):
    class M:
      argument_size_in_bytes = output_size_in_bytes = alias_size_in_bytes = 0
      generated_code_size_in_bytes = 0
    m = M()
    m.temp_size_in_bytes = self.temp
    return m

  def cost_analysis(self):
    return {"flops": 1.0}


def _fake_program(batch, gib, compiled):
  import contextlib
  fn = type("Fn", (), {"lower": lambda self, *a: type("L", (), {
      "compile": lambda _: (compiled.append(batch), _FakeCompiled(int(gib(batch) * GIB)))[1]})()})
  return programs.Program("sampler", "s", "", fn(), (), contextlib.nullcontext, 1, batch=batch,
                          at_batch=lambda b: _fake_program(b, gib, compiled))


def test_a_sampler_that_does_not_fit_is_halved_until_it_does():
  from farmer_jax.aot.compile import compile_fitting
  seen = []
  c = compile_fitting(_fake_program(64, lambda b: 4 + b / 2, seen), 16 * GIB)  # 4 + b/2 GiB
  assert not c.ok and c.verdict.needed == 36 * GIB and c.fits_at == 16 and seen == [64, 32, 16]
  seen = []
  c = compile_fitting(_fake_program(64, lambda b: 20 + b, seen), 16 * GIB)     # never fits
  assert c.fits_at is None and seen == [64, 32, 16, 8, 4, 2, 1]
  seen = []
  assert compile_fitting(_fake_program(64, lambda b: 1, seen), 16 * GIB).ok and seen == [64]


def test_libtpu_out_of_memory_message_is_read():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (116.18G) exceeds available HBM (15.75G).")
  need, have = parse_oom(msg)
  assert need == int(116.18 * GIB) and have == int(15.75 * GIB)
  assert parse_oom("INTERNAL: something else") is None


def test_projection_arithmetic():
  # 1e15 FLOPs per step on 10 chips of 1e14 FLOP/s at 50% MFU: 2 s per step
  p = project(1e15, 3600, 10, 1e14, 0.5, price_per_chip_hour=2.0)
  assert p.step_seconds == pytest.approx(2.0)
  assert p.hours == pytest.approx(2.0) and p.chip_hours == pytest.approx(20.0)
  assert p.cost == pytest.approx(40.0)
  assert project(1e15, 3600, 10, 1e14, 0.5).cost is None


def _quickstart():
  c = configlib.load("quickstart:tiny")
  return parse(c, num_devices=1, num_processes=1, read_data=False)


@pytest.mark.slow  # starts a run and lowers its programs twice (about 25 s)
def test_compiled_programs_are_the_runs_own(tmp_path):
  """The train and eval steps and the sample grid that `check --compile` lowers from abstract
  arguments are the programs a started run executes: the same HLO as the trainer's step on its
  real state and batch, and as the eval and grid samplers the report builds."""
  from farmer_jax.eval.likelihood import make_eval_step
  from farmer_jax.sampling.generate import make_sample_fn
  from farmer_jax.train.report import grid_batch_size
  from farmer_jax.train.trainer import start
  c = configlib.load("quickstart:tiny")
  tr = start(parse(c, str(tmp_path)), str(tmp_path), quiet=True)
  try:
    run, mesh = tr.run, tr.mesh
    got = {p.key: p for p in programs.train_programs(run, mesh)}
    assert set(got) == {"train", "eval", "grid"}
    batch = next(tr.input)

    def hlo(fn, *args):
      """What the program is, for comparing two builds of it: the signature of its lowering
      (every argument's and result's sharding, which are donated) and its compiled FLOPs and
      memory plan. (The texts themselves differ in the numbering of private functions.)"""
      with tr.mesh_context():
        lowered = fn.lower(*args)
        main = re.search(r"func\.func public @main\(.*", lowered.as_text()).group(0)
        compiled = lowered.compile()
        cost = compiled.cost_analysis()
        return main, (cost[0] if isinstance(cost, list) else cost)["flops"], str(
            compiled.memory_analysis())

    p = got["train"]
    assert hlo(p.fn, *p.args) == hlo(tr.train_step, tr.state, batch, tr.rng)
    b = got["eval"].args[1].shape[0]
    assert b == sharding.padded_batch_size(run.eval.batch_size, mesh, run.sharding_rules)
    eval_step = make_eval_step(tr.model, sharding.replicated(mesh))
    g = sharding.global_batch({"image": np.zeros((b, 32, 32, 1), np.uint8),   # as the report
                               "label": np.zeros((b,), np.int32), "mask": np.ones((b,), bool)},
                              mesh, tr.batch_sh)
    assert hlo(got["eval"].fn, *got["eval"].args) == hlo(eval_step, tr.eval_params(), g["image"],
                                                         g["label"], g["mask"], 0, 0, 0)
    n = grid_batch_size(run, mesh)
    assert got["grid"].args[2].shape == (n,) == (run.model.num_classes * run.sample.per_class,)
    fn = make_sample_fn(tr.mcfg, run.sampler, None, tr.batch_sh)
    keys = fn.put(np.zeros((n, 2), np.uint32))
    assert hlo(got["grid"].fn, *got["grid"].args) == hlo(fn.fn, tr.eval_params(), keys,
                                                         fn.put(np.zeros((n,), np.int32)), None)
  finally:
    tr.close()


def test_grid_batch_is_bounded_and_shardable():
  run = _quickstart()
  mesh = sharding.make_mesh(run.mesh, jax.devices()[:1])
  from farmer_jax.train.report import grid_batch_size
  assert grid_batch_size(run, mesh) == 20                    # the whole tiny grid (10 x 2)
  c = configlib.load("imagenet256:1.1B/16")
  big = parse(c, num_devices=1, num_processes=1, read_data=False)
  assert big.model.num_classes * big.sample.per_class == 4000
  assert grid_batch_size(big, mesh) == 256                   # config.sample.batch_size
  # 12 data-parallel slots on 4 hosts: rounded up to a multiple of both
  assert sharding.padded_batch_size(256, _FakeMesh(12), big.sharding_rules, processes=4) == 264


class _FakeMesh:
  def __init__(self, data):
    self.shape = {"data": data, "fsdp": 1}


def _check(*args, timeout=1200):
  return subprocess.run([sys.executable, "-m", "farmer_jax", "check", *args],
                        capture_output=True, text=True, timeout=timeout)


def test_without_libtpu_the_command_says_what_to_install(monkeypatch):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  why = slices.libtpu_missing()
  assert "pip install 'farmer_jax[tpu-aot]'" in why and "libtpu==0.0.42" in why
  with pytest.raises(UserError, match="needs libtpu"):
    slices.slice_devices(slices.parse_slice("v5litepod-4"))


def test_a_multislice_mesh_spans_the_slices_with_its_first_axis():
  class Dev:
    def __init__(self, i):
      self.id, self.slice_index = i, i // 4
  from farmer_jax.config.rules import FieldError
  with pytest.raises(FieldError, match=r"config.mesh=.*first axis 'data' \(size 1\) spans the 2 "
                     r"slices.*Fix: make the first axis a multiple of 2"):
    sharding.make_mesh((("data", 1), ("fsdp", -1)), [Dev(i) for i in range(8)])


def test_libtpu_without_a_tpu_leaves_jax_on_the_cpu():
  """With the tpu-aot extra on a machine without a TPU, commands and ``farmer_jax.load`` run jax
  on the CPU without starting libtpu's TPU backend (whose warnings would break the one-line
  failure contract and fill a notebook); a JAX_PLATFORMS the user set is kept, and the API leaves
  the user's environment as it was."""
  from farmer_jax.distributed import skip_absent_tpu
  if slices.libtpu_missing():
    pytest.skip("libtpu is not installed: nothing to leave out")
  plain = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  fresh = ("import jax\nfrom farmer_jax.distributed import skip_absent_tpu\nenv = {}\n"
           "skip_absent_tpu(env)\nprint(env, jax.default_backend())")
  r = subprocess.run([sys.executable, "-c", fresh], capture_output=True, text=True, timeout=300,
                     env=plain)
  assert r.stdout.strip() == "{'JAX_PLATFORMS': 'cpu'} cpu" and r.stderr == "", r.stdout + r.stderr
  env = {"JAX_PLATFORMS": "cuda"}
  skip_absent_tpu(env)
  assert env == {"JAX_PLATFORMS": "cuda"}
  jax.devices()
  env = {}
  skip_absent_tpu(env)   # jax already chose its backends here: nothing to change any more
  assert env == {}
  r = subprocess.run([sys.executable, "-m", "farmer_jax", "export", "--workdir=/nonexistent",
                      "--out=/tmp/never"], capture_output=True, text=True, timeout=300, env=plain)
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
  api = ("import os, jax, farmer_jax\n"
         "try:\n  farmer_jax.load('/nonexistent')\nexcept ValueError:\n  pass\n"
         "print(jax.default_backend(), os.environ.get('JAX_PLATFORMS'))")
  r = subprocess.run([sys.executable, "-c", api], capture_output=True, text=True, timeout=300,
                     env=plain)
  assert r.returncode == 0 and r.stdout.split() == ["cpu", "None"], r.stdout + r.stderr
  assert r.stderr == "", r.stderr


def test_compile_flags_without_compile_are_refused(capsys):
  from farmer_jax import cli
  for flag in ("--num_slices=2", "--distill", "--out=x.json"):
    with pytest.raises(SystemExit) as e:
      cli.run(["farmer_jax", "check", "--config=quickstart:tiny", "--workdir=/tmp/x",
               flag])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"farmer_jax check: {flag.split('=')[0]} applies to what --compile compiles" in err


@pytest.mark.slow
def test_quickstart_compiles_for_a_tpu_slice_and_an_overflow_is_refused(tmp_path):
  """Through libtpu, with no TPU: every mesh program of the quickstart compiles for a v5e 2x2
  slice and fits; an eval batch whose activations exceed a chip's 15.75 GiB is DOES NOT FIT and
  exit 2, with the JSON report written first; a compile option libtpu refuses is one line, exit 2,
  before any program is reported."""
  if slices.libtpu_missing():
    pytest.skip("libtpu is not installed (pip install 'farmer_jax[tpu-aot]'); it installs on "
                "x86-64 and aarch64 Linux only")
  out = tmp_path / "fit.json"
  r = _check("--config=quickstart:tiny", "--topology=v5litepod-4",
             "--programs=train,eval,grid,sampler", f"--out={out}")
  assert r.returncode == 0, r.stdout + r.stderr
  assert "every program fits v5litepod-4" in r.stdout
  rep = json.loads(out.read_text())
  assert rep["fits"] and rep["target"]["devices"] == 4
  assert rep["target"]["memory_per_device"] == int(15.75 * GIB)
  assert [p["program"] for p in rep["programs"]] == [
      "train step", "eval bits/dim", "sample grid (end of run)", "sample / fid sampler (export)"]
  for p in rep["programs"]:
    assert p["fits"] and 0 < p["bytes_needed"] < p["bytes_available"], p
  train = rep["programs"][0]
  assert train["memory"]["aliased"] > 0          # the donated state
  assert 0.8 < train["xla_flops_per_device"] / (train["analytic_flops_loops_once"] / 4) < 1.25
  assert rep["projection"]["steps"] == 200 and rep["projection"]["cost"] > 0

  out2 = tmp_path / "over.json"
  r = _check("--config=quickstart:tiny", "--topology=v5litepod-4", "--programs=eval",
             "--config.eval.batch_size=400000", f"--out={out2}")
  assert r.returncode == 2, r.stdout + r.stderr
  assert "eval bits/dim" in r.stdout and "DOES NOT FIT" in r.stdout
  assert "farmer_jax check: 1 of 1 programs cannot run on v5litepod-4" in r.stderr
  assert "Fix: lower config.eval.batch_size" in r.stderr
  rep = json.loads(out2.read_text())
  assert rep["fits"] is False and rep["programs"][0]["bytes_needed"] > int(15.75 * GIB)

  # a compile option this libtpu refuses: the one line, before any program is reported
  r = _check("--config=quickstart:tiny", "--topology=v5litepod-4", "--programs=train",
             "--config.train.xla_options=xla_tpu_no_such_flag=true")
  assert r.returncode == 2, r.stdout + r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith(
      "farmer_jax check: the XLA compiler refused the compile option xla_tpu_no_such_flag (no such "
      "option)"), r.stderr
  assert "Fix: --config.train.xla_options=none" in r.stderr
  assert "train step" not in r.stdout

  # a distillation: its step and the student's reconstruction error
  r = _check("--config=quickstart:tiny", "--topology=v5litepod-4", "--distill")
  assert r.returncode == 0, r.stdout + r.stderr
  assert "distill step (global batch 32" in r.stdout and "student reconstruction error" in r.stdout
  assert "distill step at 40% MFU" in r.stdout

  # two slices: the mesh's data axis spans them over DCN
  r = _check("--config=quickstart:tiny", "--topology=v5litepod-4", "--num_slices=2",
             "--programs=train")
  assert r.returncode == 0, r.stdout + r.stderr
  assert "every program fits v5litepod-4 x 2 slices" in r.stdout
  assert "8 devices, mesh {'data': 8, 'fsdp': 1}" in r.stdout


def test_tpu_compiler_options_only_on_tpu_and_never_over_the_user_s_libtpu_args():
  """The train step's XLA options (xla_options.py): the async-collective set on TPU devices,
  less any flag LIBTPU_INIT_ARGS names; nothing on another platform."""
  from farmer_jax import xla_options
  tpu, cpu = type("D", (), {"platform": "tpu"})(), type("D", (), {"platform": "cpu"})()
  assert xla_options.for_devices([tpu], environ={}) == xla_options.TPU_OPTIONS
  assert xla_options.for_devices([cpu], environ={}) is None
  assert xla_options.for_devices([], environ={}) is None
  env = {"LIBTPU_INIT_ARGS": "--xla_tpu_enable_async_collective_fusion=false --foo"}
  got = xla_options.for_devices([tpu], environ=env)
  assert "xla_tpu_enable_async_collective_fusion" not in got
  assert len(got) == len(xla_options.TPU_OPTIONS) - 1
  assert "xla_tpu_enable_async_collective_fusion" not in xla_options.for_devices(
      [tpu], environ={"LIBTPU_INIT_ARGS": "--noxla_tpu_enable_async_collective_fusion"})
  assert xla_options.for_devices([tpu], "none", {}) is None
  assert xla_options.for_devices([tpu], "xla_a=1", {}) == {"xla_a": "1"}
  assert xla_options.parse("none") == {} and xla_options.parse("tpu") == xla_options.TPU_OPTIONS
  assert xla_options.parse("--a=1, b") == {"a": "1", "b": "true"}
  assert all(map(xla_options.valid, ("tpu", "none", "", "--a=1, b", "xla_b=0.5")))
  assert not any(map(xla_options.valid, ("a b", "a=1;b", "a=$(x)", None, 3)))


def test_xla_options_are_a_train_field_refused_at_the_edge():
  """config.train.xla_options is parsed with the config: a bad value is one line naming it."""
  from farmer_jax import configlib
  from farmer_jax.config.parse import parse
  from farmer_jax.errors import ConfigError
  c = configlib.load("quickstart:tiny")
  assert parse(c, read_data=False).train.xla_options == "tpu"
  c.train.xla_options = "a b"
  with pytest.raises(ConfigError,
                     match=r"config\.train\.xla_options=.a b. is invalid.*Fix: .*none"):
    parse(c, read_data=False)


def test_a_compile_option_xla_refuses_is_one_line_naming_it():
  """XLA's refusal of a compiler option (an unknown flag, a value it cannot parse: real refusals of
  the CPU compiler here, libtpu's wording in the slow TPU test) is the command's one line, exit 2,
  naming the flag and config.train.xla_options=none; any other runtime error stays a bug."""
  from farmer_jax import xla_options
  from farmer_jax.commands import exits
  for opts, named in [({"xla_no_such_flag": "true"}, "xla_no_such_flag (no such option)"),
                      ({"xla_cpu_enable_fast_math": "maybe"},
                       "xla_cpu_enable_fast_math=maybe (not a valid bool value)")]:
    with pytest.raises(jax.errors.JaxRuntimeError) as e:
      jax.jit(lambda x: x + 1, compiler_options=opts).lower(1.0).compile()
    code, line = exits.failure(e.value)
    assert code == 2 and f"refused the compile option {named}" in line, line
    assert "Fix: --config.train.xla_options=none" in line and "\n" not in line
  tpu_words = ("INVALID_ARGUMENT: Failed to parse 'maybe' into flag "
               "xla_tpu_enable_async_collective_fusion: ")
  assert ("option xla_tpu_enable_async_collective_fusion=maybe (a value it cannot parse) that"
          in xla_options.refusal(jax.errors.JaxRuntimeError(tpu_words)))
  # check --topology: the refusal is the command's, not one program's compile error
  program = types.SimpleNamespace(context=contextlib.nullcontext, args=(1.0,), fn=jax.jit(
      lambda x: x + 1, compiler_options={"xla_no_such_flag": "true"}))
  with pytest.raises(jax.errors.JaxRuntimeError, match="No such compile option"):
    compile_program(program, None)
  assert exits.failure(jax.errors.JaxRuntimeError("INTERNAL: Failed to allocate")) is None
  assert xla_options.refusal(ValueError("No such compile option: 'a'")) is None
