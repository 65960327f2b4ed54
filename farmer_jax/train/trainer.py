"""FARMER training loop (big_vision shape: mesh -> input -> model from shapes -> shard -> one jitted step -> loop).

The train state is a plain dict: {'params', 'opt_state', 'step', 'bad_step'[, 'ema']}. ``bad_step`` records the
first step whose loss or gradient norm was non-finite (-1 if none); such a step applies no update, and the host
stops with an error at the next check, before anything is saved.
"""

import contextlib
import json
import os
import signal
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm import tqdm

from farmer_jax import conventions, sharding
from farmer_jax.config import (ConfigError, ModelConfig, config_changes, resolved_config, upgrade_saved_config,
                               validate)
from farmer_jax.data.pipeline import ArrayLoader, load_split
from farmer_jax.eval.likelihood import evaluate_bpd
from farmer_jax.model import Farmer
from farmer_jax.sampling.sampler import sample_images, sample_keys, sampler_from_config
from farmer_jax.sampling.images import save_grid
from farmer_jax.train.checkpoint import Checkpointer
from farmer_jax.train.lock import WorkdirLock
from farmer_jax.train.metrics import MetricWriter
from farmer_jax.train.optim import make_optimizer


def noise_sigma(t, step):
  total = t.steps if t.noise_steps is None or t.noise_steps < 0 else t.noise_steps
  return conventions.cosine_noise_sigma(step, total, t.noise_max, t.noise_min)


def make_train_step(model: Farmer, mcfg: ModelConfig, t, tx, lr_fn):
  """Returns step(state, batch, rng) -> (state, metrics). Pure; jit it with shardings and donation.

  ``metrics['loss']`` is -log p(x~ | y)/D in nats/dim of the noise-dequantized batch (Gaussian noise at the
  scheduled sigma, labels after label dropout). It is not an 8-bit bits/dim, so no 'bpd' is derived from it;
  bits/dim come only from the uniform-dequantized evaluation (``eval/likelihood.py``).
  """
  num_dims = mcfg.num_dims

  def loss_fn(params, x, y):
    out = model.apply({"params": params}, x, y)
    nll = -out["log_prob"] / num_dims
    aux = {"ar_nll": -jnp.mean(out["log_prob_i"] + out["log_prob_r"]) / num_dims,
           "logdet_per_dim": jnp.mean(out["logdet"]) / num_dims}
    return jnp.mean(nll), aux

  def step(state, batch, rng):
    s = state["step"]
    rng = jax.random.fold_in(rng, s)
    k_noise, k_drop = jax.random.split(rng)
    sigma = noise_sigma(t, s) if t.noise_kind == "gaussian" else jnp.float32(0.0)
    x = conventions.dequantize(k_noise, batch["image"], t.noise_kind, sigma)
    y = batch["label"].astype(jnp.int32)
    if t.label_drop > 0:
      y = jnp.where(jax.random.uniform(k_drop, y.shape) < t.label_drop, mcfg.null_class, y)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], x, y)
    gnorm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # a step is applied only if the loss, the gradient AND the updated params are finite (lr=inf gives finite
    # grads but non-finite params)
    params_ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(params)]))
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm) & params_ok
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new = {"params": keep(params, state["params"]), "opt_state": keep(opt_state, state["opt_state"]),
           "step": s + 1, "bad_step": jnp.where((state["bad_step"] < 0) & ~ok, s, state["bad_step"])}
    if "ema" in state:
      d = t.ema_decay
      new["ema"] = keep(jax.tree.map(lambda e, p: d * e + (1 - d) * p, state["ema"], params), state["ema"])
    metrics = {"loss": loss, "noise_sigma": sigma, "lr": lr_fn(s), "grad_norm": gnorm, **aux}
    return new, metrics

  return step


class Trainer:
  """Builds everything from a validated config (resuming from the workdir); ``fit()`` trains,
  ``evaluate()`` gives test bits/dim (class-conditional and unconditional), ``sample_grid()`` writes a PNG."""

  def __init__(self, config, workdir: str, quiet: bool = False, devices=None, config_change_ok: bool = False,
               stop: "threading.Event | None" = None):
    self.config = config
    # the whole run config, the workdir and the mesh vs these devices: raises before any file is written
    self.mcfg = validate(config, workdir, num_devices=len(devices) if devices is not None else None)
    self.config_change_ok = config_change_ok
    self.stop = stop if stop is not None else threading.Event()    # set by SIGTERM (see install_sigterm)
    self.lock = None
    self.workdir = workdir
    self.quiet = quiet
    t = config.train
    self.t = t
    # ---- mesh ----
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = tuple(tuple(r) for r in config.sharding_rules)
    # ---- input pipeline ----
    images, labels = load_split(config.data, "train")
    self.loader = ArrayLoader(images, labels, t.batch_size, seed=t.seed, process_index=jax.process_index(),
                              process_count=jax.process_count())
    self.batch_sh = sharding.batch_sharding(self.mesh, self.rules)
    # ---- model and optimizer from shapes ----
    self.model = Farmer(self.mcfg)
    self.tx, self.lr_fn = make_optimizer(t)
    c = config.data
    x0 = jnp.zeros((1, c.image_size, c.image_size, c.channels), jnp.float32)
    y0 = jnp.zeros((1,), jnp.int32)
    init_params = lambda rng: self.model.init(rng, x0, y0)["params"]
    boxed = jax.eval_shape(init_params, jax.random.key(0))
    self.param_sh = sharding.param_shardings(boxed, self.mesh, self.rules, config.get("fsdp"))
    rep = sharding.replicated(self.mesh)

    def init_state(rng):
      params = nn.unbox(init_params(rng))
      state = {"params": params, "opt_state": self.tx.init(params), "step": jnp.int32(0),
               "bad_step": jnp.int32(-1)}
      if t.ema_decay > 0:
        state["ema"] = params
      return state

    abstract = jax.eval_shape(init_state, jax.random.key(0))
    self.state_sh = {"params": self.param_sh,
                     "opt_state": sharding.opt_state_shardings(self.tx, abstract["opt_state"], self.param_sh,
                                                               self.mesh),
                     "step": rep, "bad_step": rep}
    if t.ema_decay > 0:
      self.state_sh["ema"] = self.param_sh
    self.abstract_state = abstract
    # ---- shard and transfer: params are born sharded ----
    with self._ctx():
      self.state = jax.jit(init_state, out_shardings=self.state_sh)(jax.random.key(t.seed))
    self.num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self.state["params"]))
    # ---- one jitted, donating update step ----
    step = make_train_step(self.model, self.mcfg, t, self.tx, self.lr_fn)
    self.train_step = jax.jit(step, in_shardings=(self.state_sh, self.batch_sh, rep),
                              out_shardings=(self.state_sh, rep), donate_argnums=(0,))
    self.rng = jax.random.key(t.seed + 1)
    # ---- one run per workdir; then resume from its newest readable checkpoint, if any ----
    self._take_lock(workdir)
    try:
      self._restore(workdir)
    except BaseException:
      self.close()
      raise
    self.preempted = self.preempt_saved = False

  def _take_lock(self, workdir):
    if jax.process_index() != 0:
      return
    existed = os.path.exists(workdir)
    self.lock = WorkdirLock(workdir, say=self.log).acquire()
    self._created_workdir = not existed

  def close(self):
    """Releases the workdir lock (and removes a workdir this run created but never wrote to)."""
    if self.lock is not None:
      self.lock.release()
      self.lock = None
      if getattr(self, "_created_workdir", False):
        try:
          os.rmdir(self.workdir)          # only succeeds if empty
        except OSError:
          pass

  def _restore(self, workdir):
    t = self.t
    self.ckpt = Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"), keep=t.get("ckpt_keep", 2),
                             keep_period=t.get("ckpt_keep_period", 0))
    self.restored_step = None
    if self.ckpt.steps():            # compare configs first: a clear diff beats an Orbax tree-mismatch error
      self._check_same_model(workdir)
    restored = self.ckpt.restore_latest(self.abstract_state, self.state_sh, say=self.log)
    if restored is not None:
      self.state, meta, self.restored_step = restored
      if meta.get("seed") != t.seed:
        raise ValueError(f"the checkpoint in {self.ckpt.directory} was written with train.seed={meta.get('seed')}, "
                         f"this run has {t.seed}; resume with the same config or use a fresh --workdir")
      self.log(f"resumed from {self.ckpt.directory} at step {self.restored_step}")

  def _check_same_model(self, workdir):
    """Resuming must not silently change what the checkpoint's params mean: settings that shapes cannot detect (the
    AR order, the scale function, the data) are compared with the run's saved config.json."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
      return
    with open(path) as f:
      saved = upgrade_saved_config(ml_collections.ConfigDict(json.load(f)))
    diff = config_changes(saved, self.config)
    if diff and self.config_change_ok:
      self.log(f"resuming with a changed data/model config (--config_change_ok): {'; '.join(diff)}")
    elif diff:
      raise ConfigError(f"the checkpoint in {workdir} was trained with another data/model config: {'; '.join(diff)}. "
                        "Fix: resume with the run's own settings (e.g. --config.<key>=<saved value>), use a fresh "
                        "--workdir, or pass --config_change_ok if the change is intended")

  @contextlib.contextmanager
  def _ctx(self):
    """Mesh + logical-axis rules active while tracing / running jitted code."""
    with nn.logical_axis_rules(self.rules), jax.set_mesh(self.mesh):
      yield

  def log(self, msg):
    if not self.quiet and jax.process_index() == 0:
      tqdm.write(msg)

  def _check_finite(self):
    bad = int(self.state["bad_step"])
    if bad >= 0:
      raise FloatingPointError(
          f"non-finite loss or gradient at step {bad}; stopping before anything is saved. "
          "Lower train.lr, enable train.grad_clip, or raise train.noise_min.")

  def fit(self, stop_at=None):
    """Trains to ``train.steps`` (or only up to step ``stop_at``, e.g. for a staged run), then checkpoints."""
    t = self.t
    end = t.steps if stop_at is None else min(int(stop_at), t.steps)
    start = int(self.state["step"])
    if self.stop.is_set():
      self.log("SIGTERM before training started: exiting; nothing new to save")
      self.preempted = True
      return []
    os.makedirs(self.workdir, exist_ok=True)
    if jax.process_index() == 0:
      _atomic_write(os.path.join(self.workdir, "config.json"),        # every model field, defaults written out
                    resolved_config(self.config).to_json_best_effort(indent=2))
      trim_metrics(os.path.join(self.workdir, "metrics.jsonl"), start)
    writer = MetricWriter(self.workdir)
    self.log(f"FARMER: {self.num_params / 1e6:.2f}M params, N={self.mcfg.num_tokens} tokens of "
             f"d={self.mcfg.token_dim}, dimred={self.mcfg.dimred}, mesh={dict(self.mesh.shape)}")
    pending, history = [], []
    bar = tqdm(total=t.steps, initial=start, disable=self.quiet or jax.process_index() != 0,
               desc="train", dynamic_ncols=True)
    tick, tick_step = time.time(), start
    it = self.loader.iterate(start)
    ckpt_every = t.get("ckpt_every", 0)
    stop = self.stop
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
        signal.SIG_DFL, None):
      install_sigterm(stop)
    with self._ctx():
      for s in range(start, end):
        batch = sharding.global_batch(next(it), self.mesh, self.batch_sh)
        self.state, m = self.train_step(self.state, batch, self.rng)
        pending.append(m)
        bar.update(1)
        if self._any_process(stop.is_set()):
          self.log(f"SIGTERM: saving a checkpoint at step {s + 1} and exiting; re-run the same command to resume")
          self.save_checkpoint()
          self.preempted = self.preempt_saved = True
          break
        if ckpt_every and (s + 1) % ckpt_every == 0 and s + 1 < end:
          self.save_checkpoint()
        if (s + 1) % t.log_every == 0 or s + 1 == end:
          self._check_finite()
          vals = jax.device_get(pending)
          avg = {k: float(np.mean([v[k] for v in vals])) for k in vals[0]}
          now = time.time()
          avg["steps_per_s"] = (s + 1 - tick_step) / max(now - tick, 1e-9)
          tick, tick_step = now, s + 1
          pending = []
          writer.write(s + 1, avg)
          history.append({"step": s + 1, **avg})
          bar.set_postfix({"loss(nats/dim)": f"{avg['loss']:.3f}", "sigma": f"{avg['noise_sigma']:.3f}"})
    bar.close()
    if not self.preempted and int(self.state["step"]) > start:
      self.save_checkpoint()
    self.ckpt.close()
    writer.close()
    return history

  def _any_process(self, flag: bool) -> bool:
    if jax.process_count() == 1:
      return flag
    return bool(multihost_utils.process_allgather(np.array(flag)).any())

  def eval_params(self):
    return self.state.get("ema", self.state["params"])

  def save_checkpoint(self):
    """Async save of the full train state (never of a state that saw a non-finite step)."""
    self._check_finite()
    step = int(self.state["step"])
    self.ckpt.save(step, self.state, {"step": step, "data_step": step, "seed": int(self.t.seed)})

  def evaluate(self, split=None):
    cfg = self.config
    images, labels = load_split(cfg.data, split or cfg.eval.split)
    bar = tqdm(total=len(images), desc="eval bpd", disable=self.quiet or jax.process_index() != 0,
               dynamic_ncols=True)
    res = evaluate_bpd(self.model, self.eval_params(), images, labels, cfg.eval.batch_size, seed=cfg.train.seed,
                       progress=lambda done, n: bar.update(done - bar.n))
    bar.close()
    return res

  def sample_grid(self, path):
    """One row per class (per_class samples each); PNG at ``path``."""
    s = self.config.sample
    k = max(self.mcfg.num_classes, 1)
    y = jnp.repeat(jnp.arange(k, dtype=jnp.int32), s.per_class)
    if self.mcfg.num_classes == 0:
      y = jnp.full((s.per_class,), self.mcfg.null_class, jnp.int32)
    sampler = sampler_from_config(s)
    # replicated output: every process can read the images (multi-host safe); process 0 writes them
    fn = jax.jit(lambda p, keys, y: sample_images(self.mcfg, p, keys, y, sampler),
                 out_shardings=sharding.replicated(self.mesh))
    with self._ctx():
      x = fn(self.eval_params(), sample_keys(s.seed, 0, len(y)), y)
    x = np.asarray(x).reshape(k, s.per_class, *x.shape[1:])
    bad = int((~np.isfinite(x)).reshape(k * s.per_class, -1).any(-1).sum())
    if bad:
      raise FloatingPointError(f"{bad} of {k * s.per_class} samples of the training grid are not finite (NaN/inf); "
                               f"{path} was not written (the checkpoint is saved). Fix: train longer or inspect "
                               "the model with `farmer_jax sample`")
    if jax.process_index() == 0:
      save_grid(x, path)
    return x


class Preempted(Exception):
  """SIGTERM arrived before the training loop started (nothing to save)."""


_TRAINING_STARTED = threading.Event()


def install_sigterm(stop: threading.Event, raise_until_training: bool = False):
  """SIGTERM (preemption) sets ``stop``; the training loop saves at the next step boundary and exits cleanly. With
  ``raise_until_training``, a SIGTERM during start-up (before the loop) raises ``Preempted`` instead, so start-up
  (data loading, compilation, restore) is abandoned at once. Returns a function restoring the previous handler."""
  if threading.current_thread() is not threading.main_thread():
    return lambda: None

  def handler(*_):
    stop.set()
    if raise_until_training and not _TRAINING_STARTED.is_set():
      raise Preempted()

  prev = signal.signal(signal.SIGTERM, handler)
  return lambda: signal.signal(signal.SIGTERM, prev if prev is not None else signal.SIG_DFL)


def _atomic_write(path, text):
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def trim_metrics(path, step):
  """Drops metrics.jsonl rows past ``step`` (written after the checkpoint a resumed run restarts from) and any
  partly written last line, so no step appears twice."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if int(row.get("step", 0)) <= step:
        keep.append(json.dumps(row) + "\n")
  _atomic_write(path, "".join(keep))


def train_and_report(config, workdir, quiet=False, config_change_ok=False):
  """The `farmer_jax train` command: train, evaluate test bpd, write samples.png, return a summary dict.

  The test bits/dim (uniform dequantization) is reported twice on the same noise: ``test_bpd`` with the true labels,
  -log p(x|y), and ``test_bpd_uncond`` with the null label, -log p(x|null) (the literature's ImageNet number); both
  are equal for an unconditional model (``class_conditional`` False).
  """
  t0 = time.time()
  stop = threading.Event()
  restore = install_sigterm(stop, raise_until_training=True)
  tr = None
  try:
    tr = Trainer(config, workdir, quiet=quiet, config_change_ok=config_change_ok, stop=stop)
    _TRAINING_STARTED.set()
    history = tr.fit()
    train_s = time.time() - t0
    if tr.preempted:          # SIGTERM: the checkpoint (if any step ran) is saved; no eval, no sampling
      return {"steps": int(tr.state["step"]), "preempted": True, "saved": tr.preempt_saved}, tr
    summary = _report(tr, workdir, history, train_s, t0)
  except Preempted:           # SIGTERM during start-up: nothing to save
    return {"steps": int(tr.state["step"]) if tr is not None else 0, "preempted": True, "saved": False}, tr
  finally:
    _TRAINING_STARTED.clear()
    restore()
    if tr is not None:
      tr.close()
  return summary, tr


def _report(tr, workdir, history, train_s, t0):
  res = tr.evaluate()
  if not (np.isfinite(res["bpd"]) and np.isfinite(res["bpd_uncond"])):
    raise FloatingPointError(f"test bits/dim is not finite ({res['bpd']}, unconditional {res['bpd_uncond']}); "
                             "summary.json was not written (the checkpoint is saved)")
  grid = os.path.join(workdir, "samples.png")
  tr.sample_grid(grid)
  summary = {"steps": int(tr.state["step"]), "train_seconds": train_s, "total_seconds": time.time() - t0,
             "final_train_loss": history[-1]["loss"] if history else None,
             "test_bpd": res["bpd"], "test_bpd_uncond": res["bpd_uncond"],
             "test_nats_per_dim": res["nats_per_dim"], "test_nats_per_dim_uncond": res["nats_per_dim_uncond"],
             "test_count": res["count"], "class_conditional": tr.mcfg.num_classes > 0, "num_params": tr.num_params,
             "samples": grid}
  if jax.process_index() == 0:
    _atomic_write(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
  tr.log(f"{format_test_bpd(summary)}; {res['count']} images, uniform dequantization; samples -> {grid}; "
         f"wall {summary['total_seconds']:.0f}s")
  return summary


def format_test_bpd(summary):
  """'test bpd: 2.4200 (class-conditional), 2.5100 (unconditional)' from a train_and_report summary."""
  if not summary.get("class_conditional", True):
    return f"test bpd: {summary['test_bpd']:.4f} (unconditional model)"
  return f"test bpd: {summary['test_bpd']:.4f} (class-conditional), {summary['test_bpd_uncond']:.4f} (unconditional)"
