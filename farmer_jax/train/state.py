"""The train state: a plain dict {'params', 'opt_state', 'step', 'bad_step'[, 'ema']} (see
train/step.py), built in one place, with its shardings."""

import jax
import jax.numpy as jnp

from farmer_jax import sharding
from farmer_jax.config.schema import ModelConfig
from farmer_jax.model import init_params


def new_state(params, tx, ema=False):
  """The state at step 0 around ``params``: fresh optimizer state, no bad step, EMA = params."""
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0),
           "bad_step": jnp.int32(-1)}
  if ema:
    state["ema"] = params
  return state


def init_state(cfg: ModelConfig, tx, rng, ema=False, flow=None):
  """A freshly initialised state (``model.init_params``); ``flow``: AF params that replace the
  initialised ones (e.g. from a TARFlow checkpoint). Jit it with ``out_shardings`` for a state
  born sharded."""
  params = init_params(cfg, rng)
  if flow is not None:
    params = dict(params, flow=jax.tree.map(lambda a, b: jnp.asarray(b, a.dtype),
                                            params["flow"], flow))
  return new_state(params, tx, ema)


def abstract_state(cfg: ModelConfig, tx, ema=False):
  """The state's shapes/dtypes (ShapeDtypeStructs); nothing is allocated."""
  return jax.eval_shape(lambda r: init_state(cfg, tx, r, ema), jax.random.key(0))


def state_shardings(tx, abstract, param_sh, mesh):
  """Shardings of a state: params and EMA as ``param_sh``, optimizer moments mirroring the params,
  the rest replicated."""
  rep = sharding.replicated(mesh)
  out = {"params": param_sh,
         "opt_state": sharding.opt_state_shardings(tx, abstract["opt_state"], param_sh, mesh),
         "step": rep, "bad_step": rep}
  if "ema" in abstract:
    out["ema"] = param_sh
  return out
