"""The pure train step: loss, gradient, guarded optimizer update, EMA.

The train state is a plain dict (train/state.py): {'params', 'opt_state', 'step', 'bad_step'[,
'ema']}. ``bad_step`` records the first step whose loss, gradient norm or updated params were
non-finite (-1 if none); such a step applies no update, and the host stops with an error at its
next check, before anything is saved.
"""

import jax
import jax.numpy as jnp
import optax

from farmer_jax import conventions
from farmer_jax.config.schema import ModelConfig, TrainConfig
from farmer_jax.model import Farmer


def noise_sigma(t: TrainConfig, step):
  """The dequantization noise std at ``step``: cosine from noise_max to noise_min."""
  return conventions.cosine_noise_sigma(step, t.noise_anneal_steps, t.noise_max, t.noise_min)


def make_loss(model: Farmer, mcfg: ModelConfig):
  """loss(params, x, y) -> (mean -log p(x|y)/D in nats/dim, aux metrics)."""
  num_dims = mcfg.num_dims

  def loss(params, x, y):
    out = model.apply({"params": params}, x, y)
    nll = conventions.nats_per_dim(out["log_prob"], num_dims)
    aux = {"ar_nll": -jnp.mean(out["log_prob_i"] + out["log_prob_r"]) / num_dims,
           "logdet_per_dim": jnp.mean(out["logdet"]) / num_dims}
    return jnp.mean(nll), aux

  return loss


def make_train_step(model: Farmer, mcfg: ModelConfig, t: TrainConfig, tx, lr_fn):
  """Returns step(state, batch, rng) -> (state, metrics). Pure; jit it with shardings and donation.

  ``metrics['loss']`` is -log p(x~ | y)/D in nats/dim of the noise-dequantized batch (Gaussian
  noise at the scheduled sigma, labels after label dropout). It is not an 8-bit bits/dim, so no
  'bpd' is derived from it; bits/dim come only from the uniform-dequantized evaluation
  (``eval/likelihood.py``).
  """
  loss_fn = make_loss(model, mcfg)

  def batch_loss(params, batch, rng, s):
    k_noise, k_drop = jax.random.split(rng)
    sigma = noise_sigma(t, s) if t.noise_kind == "gaussian" else jnp.float32(0.0)
    x = conventions.dequantize(k_noise, batch["image"], t.noise_kind, sigma, mcfg.pixels)
    y = batch["label"].astype(jnp.int32)
    if t.label_drop > 0:
      y = jnp.where(jax.random.uniform(k_drop, y.shape) < t.label_drop, mcfg.null_class, y)
    loss, aux = loss_fn(params, x, y)
    return loss, dict(aux, noise_sigma=sigma)

  return make_guarded_step(batch_loss, tx, lr_fn, t.ema_decay)


def make_guarded_step(batch_loss, tx, lr_fn, ema_decay=0.0):
  """step(state, batch, rng, *extra) -> (state, metrics) around ``batch_loss(params, batch,
  step_rng, step, *extra) -> (loss, aux metrics)``: the gradient, the guarded optimizer update
  (applied only if loss, gradient norm and new params are finite; else ``bad_step`` records the
  step) and the EMA. ``extra``: arrays the loss reads but never updates (the distillation
  teacher), passed as jit arguments so they keep their shardings. Shared by pretraining and
  distillation."""

  def step(state, batch, rng, *extra):
    s = state["step"]
    rng = jax.random.fold_in(rng, s)
    (loss, aux), grads = jax.value_and_grad(batch_loss, has_aux=True)(state["params"], batch,
                                                                      rng, s, *extra)
    gnorm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # a step is applied only if the loss, the gradient AND the updated params are finite (lr=inf
    # gives finite grads but non-finite params)
    params_ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(params)]))
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm) & params_ok
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new = {"params": keep(params, state["params"]),
           "opt_state": keep(opt_state, state["opt_state"]), "step": s + 1,
           "bad_step": jnp.where((state["bad_step"] < 0) & ~ok, s, state["bad_step"])}
    if "ema" in state:
      # d * ema + (1 - d) * params, as optax.incremental_update computes it (step_size * new +
      # (1 - step_size) * old). XLA fuses a*b + c*d into an FMA, so the operand order is part of
      # the numbers: an EMA written another way would not reproduce saved runs' EMA bit for bit.
      ema = optax.incremental_update(state["ema"], params, ema_decay)
      new["ema"] = keep(ema, state["ema"])
    metrics = {"loss": loss, "lr": lr_fn(s), "grad_norm": gnorm, **aux}
    return new, metrics

  return step
