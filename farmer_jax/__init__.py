"""farmer_jax: FARMER (an autoregressive flow with an AR prior over its latents) in JAX/Flax.

  import farmer_jax
  model = farmer_jax.load("models/quickstart")      # an export or a training run's workdir
  images, labels = model.sample(classes=[3, 7], num=4, cfg=2.0, seed=0)

``load`` and ``Model`` live in farmer_jax/api.py (docs/api.md) and are imported on first use, so
``import farmer_jax`` alone (the CLI's first step) loads neither jax nor the model code.
"""

__all__ = ["load", "Model"]


def __getattr__(name):
  if name in __all__:
    from farmer_jax import api
    return getattr(api, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(__all__))
