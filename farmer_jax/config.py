"""Typed model config and validation of a whole run config (``ml_collections.ConfigDict``).

Validation runs before anything touches the disk, and every error names the offending field, its value and a fix.
"""

import dataclasses

import jax.numpy as jnp

DIMRED_MODES = ("farmer", "jetformer", "none")
SCALE_FNS = ("squareplus", "softplus")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NOISE_KINDS = ("gaussian", "uniform")
AR_ORDERS = ("alternate", "same")


class ConfigError(ValueError):
  """A run config is invalid. The message names the field, the bad value and how to fix it."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything the FARMER network needs. Built from ``config.model`` + ``config.data`` by ``from_config``."""
  image_size: int = 32
  channels: int = 1
  patch_size: int = 4
  num_classes: int = 10               # 0 = unconditional (only the null class exists)
  # autoregressive flow
  flow_blocks: int = 4
  flow_layers: int = 2                # transformer layers per AF block
  flow_width: int = 128
  flow_heads: int = 2
  flow_class_conditional: bool = False
  ar_order: str = "alternate"         # AR prior vs the last AF block: "alternate" (opposite order) | "same"
  # AR prior
  ar_width: int = 128
  ar_depth: int = 2
  ar_heads: int = 2
  class_repeats: int = 4              # M
  dimred: str = "farmer"              # farmer | jetformer | none
  d_informative: int = 8              # d_I (ignored for dimred='none', where d_I = d)
  mixtures_informative: int = 8       # K_I
  mixtures_redundant: int = 8         # K_R
  scale_fn: str = "squareplus"
  scale_floor: float = 1e-6
  # common
  mlp_ratio: int = 4
  dtype: str = "float32"
  remat: bool = False

  @property
  def num_tokens(self):
    return (self.image_size // self.patch_size) ** 2

  @property
  def token_dim(self):
    return self.patch_size ** 2 * self.channels

  @property
  def d_i(self):
    return self.token_dim if self.dimred == "none" else self.d_informative

  @property
  def d_r(self):
    return self.token_dim - self.d_i

  @property
  def num_dims(self):
    return self.num_tokens * self.token_dim

  @property
  def ar_flip(self):
    """Whether the AF output (raster token order) is flipped before the AR prior; the one place that decides it.

    AF block t works in flipped order iff t is odd, so the last block (t = flow_blocks - 1) is flipped iff
    flow_blocks is even. 'alternate' runs the AR prior in the order opposite to the last block (the AR prior is
    "block n + 1" of the alternation; paper Table 3 "final permute"); 'same' runs it in the last block's order.
    """
    if self.ar_order not in AR_ORDERS:
      raise _err("model.ar_order", self.ar_order, "unknown AR prior direction", f"use one of {AR_ORDERS}")
    last_block_flipped = self.flow_blocks % 2 == 0
    return last_block_flipped if self.ar_order == "same" else not last_block_flipped

  @property
  def null_class(self):
    return self.num_classes

  @property
  def jnp_dtype(self):
    return DTYPES[self.dtype]

  @classmethod
  def from_config(cls, config):
    fields = {f.name for f in dataclasses.fields(cls)}
    if "final_flip" in config.model:
      raise removed_final_flip_error(config.model.final_flip, config.model.get("flow_blocks", cls.flow_blocks))
    kw = {k: v for k, v in config.model.items() if k in fields}
    unknown = sorted(set(config.model.keys()) - fields)
    if unknown:
      raise ConfigError(f"config.model has unknown field(s) {unknown}; known fields: {sorted(fields)}")
    kw["image_size"] = config.data.image_size
    kw["channels"] = config.data.channels
    kw["num_classes"] = config.data.num_classes
    return cls(**kw)


def _err(field, value, why, fix):
  return ConfigError(f"config.{field}={value!r} is invalid: {why}. Fix: {fix}.")


def legacy_ar_order(final_flip, flow_blocks):
  """The ``model.ar_order`` that reproduces a config written with the removed ``model.final_flip`` flag.

  The old flag flipped the AF output before the AR prior iff final_flip, whatever the block count. The last AF
  block is flipped iff flow_blocks is even, so final_flip=True is 'same' for an even count and 'alternate' for
  an odd one; final_flip=False is the opposite.
  """
  return "same" if bool(final_flip) == (flow_blocks % 2 == 0) else "alternate"


def upgrade_saved_config(config):
  """A config.json written by an older release -> today's keys, meaning the same model. ``model.final_flip``
  (removed) becomes the ``model.ar_order`` that reproduces it, so old runs and exports keep their AR direction.
  (Config FILES with final_flip are refused instead, so a user picks the order on purpose.)"""
  model = config.get("model")
  if model is not None and "final_flip" in model:
    model.ar_order = legacy_ar_order(model.final_flip, model.get("flow_blocks", ModelConfig.flow_blocks))
    del model["final_flip"]
  return config


def config_changes(saved, current, sections=("data", "model")):
  """['section.key: saved -> current', ...] for the keys of ``sections`` that differ between two run configs."""
  out = []
  for sec in sections:
    a, b = dict(saved.get(sec, {}) or {}), dict(current.get(sec, {}) or {})
    for k in sorted(set(a) | set(b)):
      va, vb = a.get(k, "<unset>"), b.get(k, "<unset>")
      if isinstance(va, (list, tuple)) or isinstance(vb, (list, tuple)):
        va, vb = list(va) if isinstance(va, (list, tuple)) else va, list(vb) if isinstance(vb, (list, tuple)) else vb
      if va != vb:
        out.append(f"{sec}.{k}: {va!r} -> {vb!r}")
  return out


def removed_final_flip_error(final_flip, flow_blocks):
  order = legacy_ar_order(final_flip, flow_blocks)
  return _err("model.final_flip", final_flip,
              "model.final_flip was replaced by model.ar_order ('alternate': the AR prior runs opposite to the "
              "last AF block; 'same': in its order), whose meaning does not depend on the parity of "
              "model.flow_blocks",
              f"delete final_flip and set --config.model.ar_order={order} to reproduce the old behaviour with "
              f"model.flow_blocks={flow_blocks} (old final_flip=True is 'same' for an even block count and "
              "'alternate' for an odd one; final_flip=False is the opposite)")


def validate_model(m: ModelConfig):
  """Checks a ModelConfig; raises ConfigError naming the field."""
  def pos(field, value, what="a positive integer"):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise _err(field, value, f"must be {what}", f"set --config.{field} to an integer >= 1")
  pos("data.image_size", m.image_size)
  pos("data.channels", m.channels)
  pos("model.patch_size", m.patch_size)
  if m.image_size % m.patch_size:
    raise _err("model.patch_size", m.patch_size,
               f"it does not divide data.image_size={m.image_size}",
               "choose a patch size that divides the image size")
  if not isinstance(m.num_classes, int) or m.num_classes < 0:
    raise _err("data.num_classes", m.num_classes, "must be >= 0 (0 = unconditional)", "set it to the number of labels")
  for f in ("flow_blocks", "flow_layers", "flow_width", "flow_heads", "ar_width", "ar_depth", "ar_heads",
            "mlp_ratio", "mixtures_informative"):
    pos("model." + f, getattr(m, f))
  if not isinstance(m.class_repeats, int) or m.class_repeats < 1:
    raise _err("model.class_repeats", m.class_repeats, "the class prefix needs M >= 1 copies",
               "set --config.model.class_repeats to 1 or more (paper: 64)")
  if m.flow_width % m.flow_heads:
    raise _err("model.flow_heads", m.flow_heads, f"does not divide model.flow_width={m.flow_width}",
               "pick a head count dividing the width")
  if m.ar_width % m.ar_heads:
    raise _err("model.ar_heads", m.ar_heads, f"does not divide model.ar_width={m.ar_width}",
               "pick a head count dividing the width")
  if m.dimred not in DIMRED_MODES:
    raise _err("model.dimred", m.dimred, "unknown dimension-reduction mode", f"use one of {DIMRED_MODES}")
  if m.dimred != "none":
    d = m.token_dim
    if not isinstance(m.d_informative, int) or not 1 <= m.d_informative < d:
      raise _err("model.d_informative", m.d_informative,
                 f"d_I must satisfy 1 <= d_I < d = patch_size^2 * channels = {d} for dimred={m.dimred!r}",
                 f"choose d_I below {d}, or set --config.model.dimred=none to model all {d} channels")
  if m.dimred == "farmer":
    pos("model.mixtures_redundant", m.mixtures_redundant)
  if m.ar_order not in AR_ORDERS:
    raise _err("model.ar_order", m.ar_order, "unknown AR prior direction",
               f"use one of {AR_ORDERS} ('alternate': opposite to the last AF block, the paper's final permute)")
  if m.scale_fn not in SCALE_FNS:
    raise _err("model.scale_fn", m.scale_fn, "unknown scale parameterisation", f"use one of {SCALE_FNS}")
  if not m.scale_floor > 0:
    raise _err("model.scale_floor", m.scale_floor, "must be > 0", "use e.g. 1e-6")
  if m.dtype not in DTYPES:
    raise _err("model.dtype", m.dtype, "unknown compute dtype", f"use one of {sorted(DTYPES)}")


def validate(config):
  """Validates a full run config and returns its ModelConfig. Raises ConfigError before any file is written."""
  for section in ("data", "model", "train"):
    if section not in config:
      raise ConfigError(f"config has no '{section}' section; start from configs/quickstart.py")
  m = ModelConfig.from_config(config)
  validate_model(m)
  t = config.train
  for f in ("noise_max", "noise_min"):
    v = t.get(f, 0.0)
    if not isinstance(v, (int, float)) or v < 0:
      raise _err(f"train.{f}", v, "the dequantization noise std must be >= 0", "use e.g. 0.1 / 0.005 (paper)")
  if t.noise_min > t.noise_max:
    raise _err("train.noise_min", t.noise_min, f"it exceeds train.noise_max={t.noise_max}",
               "the cosine schedule anneals from noise_max down to noise_min")
  if t.noise_kind not in NOISE_KINDS:
    raise _err("train.noise_kind", t.noise_kind, "unknown dequantization", f"use one of {NOISE_KINDS}")
  if not 0.0 <= t.label_drop < 1.0:
    raise _err("train.label_drop", t.label_drop, "must be in [0, 1)", "use e.g. 0.1")
  for f in ("batch_size", "steps"):
    v = t[f]
    if not isinstance(v, int) or v < 1:
      raise _err(f"train.{f}", v, "must be a positive integer", f"set --config.train.{f}")
  if not t.lr > 0:
    raise _err("train.lr", t.lr, "must be > 0", "use e.g. 1e-4")
  return m
