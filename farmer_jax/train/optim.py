"""Optimizer and schedules: AdamW (kernels decayed), linear warmup + cosine decay, optional
global-norm clip.

``t`` is the run's ``config.train`` section: a ``farmer_jax.config.schema.TrainConfig`` (or
anything with its attribute names).
"""

import jax
import optax

from farmer_jax.config.schema import TrainConfig


def lr_schedule(t: TrainConfig):
  """Linear warmup 0 -> lr over warmup_steps, then cosine to min_lr at train.steps."""
  warm = max(int(t.warmup_steps), 0)
  total = max(int(t.steps), warm + 1)
  return optax.warmup_cosine_decay_schedule(0.0, t.lr, warm, total, end_value=t.min_lr)


def decay_mask(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(t: TrainConfig):
  lr = lr_schedule(t)
  parts = []
  if t.grad_clip and t.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(t.grad_clip))
  parts.append(optax.adamw(lr, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask))
  return optax.chain(*parts), lr
