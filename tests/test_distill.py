"""The distilled one-step AF inverse (Algorithm 2) and bidirectional attention."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import TINY, init_farmer, perturb
from farmer_jax.distill.student import (distill_loss, init_student, make_student, student_decode,
                                        teacher_path)
from farmer_jax.model import Farmer
from farmer_jax.nn.transformer import Transformer


@pytest.mark.slow  # moved out of the default suite to keep it <= 10 min on 2 cores
def test_bidirectional_attention_sees_later_tokens():
  """causal=False: changing the last token changes every output; causal: only the last."""
  x = jax.random.normal(jax.random.key(0), (1, 6, 16))
  x2 = x.at[:, -1].add(jax.random.normal(jax.random.key(3), (1, 16)))  # not a constant: LN
  for causal, changed in ((True, [5]), (False, list(range(6)))):
    t = Transformer(depth=1, num_heads=2, causal=causal)
    p = perturb(t.init(jax.random.key(1), x), jax.random.key(2), 0.1)   # zero-init projections
    d = jnp.abs(t.apply(p, x2)[0] - t.apply(p, x)[0]).max(axis=-1)[0]
    assert [i for i in range(6) if float(d[i]) > 1e-6] == changed


@pytest.mark.slow  # moved out of the default suite to keep it <= 10 min on 2 cores
def test_student_starts_as_the_teacher_and_distillation_beats_the_copy():
  """The student's params are a copy of params['flow']; its path has one entry per block;
  a short Algorithm-2 distillation cuts the relative reconstruction error of x from z = F(x)
  well below that of the copied-but-undistilled student, and student_decode inverts encode."""
  model, params = init_farmer(TINY, scale=0.05)
  sp = init_student(params)
  chex.assert_trees_all_equal_shapes_and_dtypes(sp, params["flow"])
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, (64, 8, 8, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 64), jnp.int32)
  zs = teacher_path(TINY, params, x, y)
  chex.assert_shape(zs, (TINY.flow_blocks + 1, 64, TINY.num_tokens, TINY.token_dim))
  z_enc, _ = model.apply({"params": params}, x, y, method=Farmer.encode)

  def rel_err(sp):
    xr, _ = make_student(TINY).apply({"params": sp}, zs[-1])
    return float(jnp.sum((xr - zs[0]) ** 2) / jnp.sum(zs[0] ** 2))

  before = rel_err(sp)
  tx = optax.adam(3e-3)
  opt = tx.init(sp)

  @jax.jit
  def step(sp, opt, key):
    (loss, per_block), g = jax.value_and_grad(
        lambda s: distill_loss(TINY, s, params, x, y, key), has_aux=True)(sp)
    upd, opt = tx.update(g, opt, sp)
    return optax.apply_updates(sp, upd), opt, loss, per_block

  for i in range(150):
    sp, opt, loss, per_block = step(sp, opt, jax.random.key(i))
  after = rel_err(sp)
  chex.assert_shape(per_block, (TINY.flow_blocks,))
  assert after < 0.3 * before, (before, after)
  img = student_decode(TINY, sp, z_enc, y)             # AR-order latents -> images
  assert float(jnp.mean((img - x) ** 2)) < 0.3 * float(jnp.mean(
      (student_decode(TINY, init_student(params), z_enc, y) - x) ** 2))


@pytest.mark.slow  # ~25-35 s on 2 cores; CI runs it
def test_distill_command_resumes_exactly(trained_run, tmp_path):
  """`farmer_jax distill` runs on the pretraining machinery: a distillation interrupted after a
  checkpoint and resumed ends with bit-identical student params and optimizer state to an
  uninterrupted one; the student's reconstruction beats the undistilled copy's."""
  from farmer_jax import configlib
  from farmer_jax.commands.distill import load_teacher, teacher_config
  from farmer_jax.config.parse import parse
  from farmer_jax.distill.trainer import distill_and_report, distillation
  from farmer_jax.train.trainer import start
  teacher, _, _ = trained_run
  c = configlib.load("quickstart:tiny,distill=1")
  c.train.update(steps=8, log_every=4)

  def student(workdir):
    """(the student's RunConfig, the Teacher) as `farmer_jax distill` builds them."""
    teacher_run, loaded = load_teacher(str(teacher), say=lambda _: None)
    return parse(teacher_config(c, teacher_run), workdir), loaded

  wd = str(tmp_path / "straight")
  run, loaded = student(wd)
  summary, straight = distill_and_report(run, wd, loaded, quiet=True)
  assert summary["recon_rel_mse_student"] < summary["recon_rel_mse_copy"]
  assert set(summary["final_block_losses"]) == {"block_0", "block_1"}
  assert summary["teacher"] == str(teacher)
  wd = str(tmp_path / "staged")
  for stop_at, restored in ((4, None), (None, 4)):   # interrupted after step 4, then resumed
    run, loaded = student(wd)
    tr = start(run, wd, distillation(loaded), quiet=True)
    assert tr.restored_step == restored
    tr.fit(stop_at=stop_at)
    tr.close()
  chex.assert_trees_all_equal(straight.state, tr.state, strict=True)
  # the export carries the student; `sample --inverse=student` decodes with it
  from farmer_jax.config.schema import SamplerConfig
  from farmer_jax.artifacts.export import export_model, load_model, load_student
  from farmer_jax.sampling.generate import generate
  out = tmp_path / "export"
  meta = export_model(str(teacher), str(out), say=lambda _: None,
                      student=str(tmp_path / "staged"))
  assert meta["student"]["step"] == 8
  mcfg, params, _, meta = load_model(str(out))
  student = load_student(str(out), mcfg, meta)
  chex.assert_trees_all_equal(student, tr.state["params"], strict=True)
  s = SamplerConfig()
  exact, _ = generate(mcfg, params, [1], 2, s, seed=0, batch_size=2, progress=False)
  fast, _ = generate(mcfg, params, [1], 2, s._replace(inverse="student"), seed=0, batch_size=2,
                     progress=False, student_params=student)
  assert fast.shape == exact.shape and np.mean(np.abs(fast.astype(int) - exact)) < 64
  plain = tmp_path / "plain"
  export_model(str(teacher), str(plain), say=lambda _: None)
  assert load_student(str(plain), mcfg, load_model(str(plain))[3]) is None


def test_distill_into_the_teachers_own_folder_is_named_as_such(tmp_path):
  """--workdir = --teacher (or a link to it) is refused before anything is read or written, with
  the real mistake named, not reported as a corrupt checkpoint with a pytree dump."""
  from farmer_jax import cli
  from farmer_jax.commands import distill
  from farmer_jax.errors import ConfigError
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "config.json").write_text("{}")
  os.symlink(wd, tmp_path / "link")
  before = sorted(os.listdir(wd))
  for workdir in (str(wd), str(tmp_path / "link")):
    flags = cli.flag_values("distill")
    flags(["farmer_jax distill", "--config=quickstart:tiny,distill=1",
           f"--teacher={wd}", f"--workdir={workdir}", "--quiet"])
    with pytest.raises(ConfigError,
                       match=r"is the teacher's own folder.*Fix: pass a new --workdir"):
      distill.main(flags)
  assert sorted(os.listdir(wd)) == before
