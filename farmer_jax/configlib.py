"""Helpers for configs/*.py (configs are code: each file has ``get_config(arg)`` returning a ConfigDict)."""

import ml_collections


def parse_arg(arg, **defaults):
  """Parses 'k1=v1,k2=v2' (or a bare preset name for the first key) into a ConfigDict over ``defaults``.

  Values are converted to the type of the default; bools accept true/false/1/0.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  keys = list(defaults)
  for i, item in enumerate(arg.split(",")):
    if "=" not in item:
      if i:
        raise ValueError(f"config arg {item!r} must be key=value (keys: {keys})")
      item = f"{keys[0]}={item}"
    k, v = item.split("=", 1)
    if k not in defaults:
      raise ValueError(f"unknown config arg {k!r}; known: {keys}")
    d = defaults[k]
    if isinstance(d, bool):
      if v.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config arg {k}={v!r} must be a bool")
      v = v.lower() in ("true", "1")
    else:
      v = type(d)(v)
    out[k] = v
  return out


def base_train():
  return ml_collections.ConfigDict(dict(
      steps=1000,
      batch_size=64,
      lr=1e-4,             # peak lr (paper: 1e-4 -> 1e-6 cosine, 5000 warmup steps)
      min_lr=1e-6,
      warmup_steps=5000,
      b1=0.9,
      b2=0.95,
      weight_decay=0.03,   # applied to kernels only
      grad_clip=0.0,       # global-norm clip; 0 = off
      ema_decay=0.0,       # 0 = no EMA params
      noise_kind="gaussian",   # gaussian (annealed) | uniform (exact bpd runs)
      noise_max=0.1,       # dequantization noise std in [-1, 1] units, cosine-annealed max -> min
      noise_min=0.005,
      noise_steps=-1,      # steps over which sigma anneals; -1 = train.steps
      label_drop=0.1,      # probability of replacing the label by the null class (for CFG)
      seed=0,
      log_every=50,
      ckpt_every=0,        # async checkpoint every k steps (0 = only at the end); always one at the end
      ckpt_keep=2,         # keep the last n checkpoints ...
      ckpt_keep_period=0,  # ... plus every m-th step forever (0 = none)
  ))


def base_mesh(config):
  # mesh axes: -1 takes the remaining devices. ('data', 8), ('fsdp', 1) = pure data parallel on 8 devices;
  # ('data', 1), ('fsdp', 8) = fully sharded params and optimizer state.
  config.mesh = (("data", -1), ("fsdp", 1))
  # logical axis -> mesh axes; anything unmapped is replicated. The batch spans both axes.
  config.sharding_rules = (("batch", ("data", "fsdp")),)
  # FSDP: params with >= min_params elements are sharded over `axis` on their largest divisible dim.
  config.fsdp = dict(axis="fsdp", min_params=2 ** 16)
