"""Typed config sections and validation of a whole run config (``ml_collections.ConfigDict``).

One dataclass per section holds its fields and their defaults: ``ModelConfig`` (``config.model``
+ the shape fields of ``config.data``), ``TrainConfig`` (``config.train``) and ``SamplerConfig``
(the sampler settings of ``config.sample``, also set by ``farmer_jax sample --cfg/--guidance/
--sampler``); each is built by ``from_config``. Validation runs before anything touches the disk,
and every error names the offending field, its value and a fix. This module does not import jax
(the CLI reads its tables before jax starts).
"""

import dataclasses
import math
import os
import re
import typing
from typing import NamedTuple

import numpy as np

from farmer_jax.errors import ConfigError

DIMRED_MODES = ("farmer", "jetformer", "none")
SCALE_FNS = ("squareplus", "softplus")
# The dtypes by name: model.dtype (compute) and the export's params (--dtype). jnp_dtype(name).
DTYPE_NAMES = ("float32", "bfloat16")
NOISE_KINDS = ("gaussian", "uniform")
AR_ORDERS = ("alternate", "same")
GUIDANCE_MODES = ("none", "resampling", "naive")
INVERSES = ("exact", "jacobi", "student")
RESIZE_MODES = ("none", "center_crop")
# model.prior: 'ar' = FARMER's AR transformer with GMM heads; 'standard_normal' = N(0, I) over the
# AF's latents (TARFlow; no prior params)
PRIORS = ("ar", "standard_normal")
# model.pixels: how uint8 pixels map to model space (conventions.PIXEL_MAPPINGS)
PIXELS = ("farmer", "tarflow")
# model.remat_policy (with model.remat=True): what each rematerialised layer keeps from the
# forward pass (jax.checkpoint_policies): nothing (recompute all), or the matmul outputs
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")
ATTENTION_IMPLS = ("xla", "cudnn", "einsum")
# which of the AF's (log-scale a, shift b) the guided AF inverse extrapolates (sample.af_guide_what)
AF_GUIDE_WHAT = ("a", "b", "ab")


def jnp_dtype(name):
  """'float32' | 'bfloat16' (``DTYPE_NAMES``) -> the jax.numpy dtype."""
  if name not in DTYPE_NAMES:
    raise ValueError(f"dtype {name!r} is not supported; use one of {list(DTYPE_NAMES)}")
  import jax.numpy as jnp
  return getattr(jnp, name)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything the FARMER network needs.

  Built from ``config.model`` + ``config.data`` by ``from_config``.
  """
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
  # LayerNorm before each AF block's proj_out (TARFlow has none; see docs/math.md)
  flow_final_norm: bool = True
  # execution only (same params, same results up to float rounding): AF blocks and the AF's and
  # AR prior's layers as Python loops over the stacked params (true) or under scan (false, the
  # default: compile time independent of the depth); on CPU unrolling measured ~1.5x faster train
  # steps and ~4x faster sampling (benchmarks/vs_torch.py, docs/performance.md)
  unroll: bool = False
  # query chunk size of the AF's causal attention in full-sequence passes with attention='einsum';
  # chunk i reads the keys of chunks <= i only (0 or >= tokens: one chunk)
  flow_attn_chunk: int = 64
  # AR prior vs the last AF block: "alternate" (opposite order) | "same"
  ar_order: str = "alternate"
  # the density of the AF's latents: "ar" (FARMER) | "standard_normal" (TARFlow; the ar_* and
  # GMM fields below are then unused); PRIORS
  prior: str = "ar"
  # uint8 <-> model space: "farmer" ((v + 0.5)/128 - 1) | "tarflow" (2v/255 - 1); PIXELS
  pixels: str = "farmer"
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
  remat_policy: str = "nothing_saveable"   # REMAT_POLICIES; used when remat=True
  # attention implementation (ATTENTION_IMPLS): 'xla' (jax.nn.dot_product_attention), 'cudnn' (its
  # fused GPU kernel; bf16), 'einsum' (two einsums + fp32 softmax, chunked causal: fastest on CPU)
  attention: str = "xla"

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
    """Whether the AF output (raster token order) is flipped before the AR prior; the one place that
    decides it.

    AF block t works in flipped order iff t is odd, so the last block (t = flow_blocks - 1) is
    flipped iff flow_blocks is even. 'alternate' runs the AR prior in the order opposite to the last
    block (the AR prior is "block n + 1" of the alternation; paper Table 3 "final permute"); 'same'
    runs it in the last block's order.
    """
    if self.ar_order not in AR_ORDERS:
      raise _err("model.ar_order", self.ar_order, "unknown AR prior direction",
                 f"use one of {AR_ORDERS}")
    last_block_flipped = self.flow_blocks % 2 == 0
    return last_block_flipped if self.ar_order == "same" else not last_block_flipped

  @property
  def null_class(self):
    return self.num_classes

  @property
  def jnp_dtype(self):
    return jnp_dtype(self.dtype)

  @classmethod
  def from_config(cls, config):
    fields = {f.name for f in dataclasses.fields(cls)}
    if "final_flip" in config.model:
      raise removed_final_flip_error(config.model.final_flip,
                                     config.model.get("flow_blocks", cls.flow_blocks))
    kw = {k: v for k, v in config.model.items() if k in fields}
    unknown = sorted(set(config.model.keys()) - fields)
    if unknown:
      raise ConfigError(
          f"config.model has unknown field(s) {unknown}; known fields: {sorted(fields)}")
    kw["image_size"] = config.data.image_size
    kw["channels"] = config.data.channels
    kw["num_classes"] = config.data.num_classes
    return cls(**kw)


def _err(field, value, why, fix):
  return ConfigError(f"config.{field}={value!r} is invalid: {why}. Fix: {fix}.")


def legacy_ar_order(final_flip, flow_blocks):
  """The ``model.ar_order`` that reproduces a config written with the removed ``model.final_flip``
  flag.

  The old flag flipped the AF output before the AR prior iff final_flip, whatever the block count.
  The last AF block is flipped iff flow_blocks is even, so final_flip=True is 'same' for an even
  count and 'alternate' for an odd one; final_flip=False is the opposite.
  """
  return "same" if bool(final_flip) == (flow_blocks % 2 == 0) else "alternate"


def upgrade_saved_config(config):
  """A config.json written by an older release -> today's keys, meaning the same model.

  ``model.final_flip`` (removed) becomes the ``model.ar_order`` that reproduces it, so old runs and
  exports keep their AR direction; a model saved without ``model.flow_final_norm`` had no AF output
  norm (False). (Config FILES with final_flip are refused instead, so a user picks the order on
  purpose.)"""
  model = config.get("model")
  if model is not None and "final_flip" in model:
    model.ar_order = legacy_ar_order(model.final_flip,
                                     model.get("flow_blocks", ModelConfig.flow_blocks))
    del model["final_flip"]
  if model is not None and "flow_final_norm" not in model:
    model.flow_final_norm = False  # saved before the AF output norm existed: those models have none
  return config


def resolved_config(config):
  """An unlocked copy of a run config whose ``model`` section lists EVERY ModelConfig field
  (defaults filled in). This is what a run saves as config.json, so a saved model means the same
  thing when a later release changes a default, and what resume compares (a key left at its default
  equals the same key written out)."""
  import ml_collections
  out = ml_collections.ConfigDict(config.to_dict())
  model = out.get("model")
  if model is not None:
    for f in dataclasses.fields(ModelConfig):
      if f.name not in model and f.name not in ("image_size", "channels", "num_classes"):
        model[f.name] = f.default
  for name, cls in (("data", DataConfig), ("eval", EvalConfig), ("train", TrainConfig)):
    sec = out.get(name)
    if sec is not None:  # a config.json written before some of these fields existed
      for f in dataclasses.fields(cls):
        if f.name not in sec and not f.metadata.get("derived"):
          sec[f.name] = f.default
  return out


def config_changes(saved, current, sections=("data", "model")):
  """['section.key: saved -> current', ...] for the keys of ``sections`` that differ between two run
  configs (both are resolved first, so a default left implicit equals the same value written
  out)."""
  saved, current = resolved_config(saved), resolved_config(current)
  out = []
  for sec in sections:
    a, b = dict(saved.get(sec, {}) or {}), dict(current.get(sec, {}) or {})
    for k in sorted(set(a) | set(b)):
      if f"{sec}.{k}" in RESUME_NEUTRAL:  # where/how fast the same batches are read
        continue
      va, vb = a.get(k, "<unset>"), b.get(k, "<unset>")
      if isinstance(va, (list, tuple)) or isinstance(vb, (list, tuple)):
        va, vb = list(va) if isinstance(va, (list, tuple)) else va, list(vb) if isinstance(
            vb, (list, tuple)) else vb
      if va != vb:
        out.append(f"{sec}.{k}: {va!r} -> {vb!r}")
  return out


def removed_final_flip_error(final_flip, flow_blocks):
  order = legacy_ar_order(final_flip, flow_blocks)
  return _err(
      "model.final_flip", final_flip,
      "model.final_flip was replaced by model.ar_order ('alternate': the AR prior runs opposite to "
      "the last AF block; 'same': in its order), whose meaning does not depend on the parity of "
      "model.flow_blocks",
      f"delete final_flip and set --config.model.ar_order={order} to reproduce the old behaviour "
      f"with model.flow_blocks={flow_blocks} (old final_flip=True is 'same' for an even block "
      "count and 'alternate' for an odd one; final_flip=False is the opposite)")


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
    raise _err("data.num_classes", m.num_classes, "must be >= 0 (0 = unconditional)",
               "set it to the number of labels")
  for f in ("flow_blocks", "flow_layers", "flow_width", "flow_heads", "ar_width", "ar_depth",
            "ar_heads", "mlp_ratio", "mixtures_informative"):
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
    raise _err("model.dimred", m.dimred, "unknown dimension-reduction mode",
               f"use one of {DIMRED_MODES}")
  if m.dimred != "none" and m.prior == "ar":    # (a standard_normal prior splits nothing)
    d = m.token_dim
    if not isinstance(m.d_informative, int) or not 1 <= m.d_informative < d:
      raise _err(
          "model.d_informative", m.d_informative,
          f"d_I must satisfy 1 <= d_I < d = patch_size^2 * channels = {d} for dimred={m.dimred!r}",
          f"choose d_I below {d}, or set --config.model.dimred=none to model all {d} channels")
  if m.dimred == "farmer":
    pos("model.mixtures_redundant", m.mixtures_redundant)
  # the fields that name one of a fixed set: (field, choices, what it is, the fix)
  for field, choices, what, fix in (
      ("ar_order", AR_ORDERS, "unknown AR prior direction",
       f"use one of {AR_ORDERS} ('alternate': opposite to the last AF block, the paper's final "
       "permute)"),
      ("attention", ATTENTION_IMPLS, "unknown attention implementation",
       f"use one of {ATTENTION_IMPLS} ('einsum' on CPU, 'cudnn' on GPU with bf16)"),
      ("remat_policy", REMAT_POLICIES, "unknown rematerialisation policy",
       f"use one of {REMAT_POLICIES} (or model.remat=False for none)"),
      ("prior", PRIORS, "unknown prior over the AF latents",
       f"use one of {PRIORS} ('standard_normal' = TARFlow's N(0, I))"),
      ("pixels", PIXELS, "unknown pixel mapping",
       f"use one of {PIXELS} ('tarflow' for models trained on 2v/255 - 1)"),
      ("scale_fn", SCALE_FNS, "unknown scale parameterisation", f"use one of {SCALE_FNS}"),
      ("dtype", DTYPE_NAMES, "unknown compute dtype", f"use one of {sorted(DTYPE_NAMES)}"),
  ):
    if getattr(m, field) not in choices:
      raise _err(f"model.{field}", getattr(m, field), what, fix)
  if not is_int(m.flow_attn_chunk) or m.flow_attn_chunk < 0:
    raise _err("model.flow_attn_chunk", m.flow_attn_chunk, "must be an integer >= 0",
               "e.g. 64 (0 = one chunk)")
  if not m.scale_floor > 0:
    raise _err("model.scale_floor", m.scale_floor, "must be > 0", "use e.g. 1e-6")
  for f in dataclasses.fields(m):
    if f.type in (bool, "bool") and not isinstance(getattr(m, f.name), (bool, np.bool_)):
      raise _err(f"model.{f.name}", getattr(m, f.name), "must be True or False",
                 f"set --config.model.{f.name}=true or false")


def is_int(v):
  """An integer (Python or numpy), not a bool."""
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v):
  """A finite number (int or float, not a bool)."""
  return (isinstance(v, (int, float, np.integer, np.floating)) and
          not isinstance(v, (bool, np.bool_)) and math.isfinite(v))


def _check(ok, field, value, why, fix):
  if not ok:
    raise _err(field, value, why, fix)


def _int_at_least(field, value, lo, fix, what=None):
  what = what or f"an integer >= {lo}"
  _check(is_int(value) and value >= lo, field, value, f"must be {what}", fix)


def _real_in(field, value, lo, hi=None, lo_open=False, fix="", what=None):
  """A finite real in [lo, hi) (or (lo, hi) with lo_open); hi=None means no upper bound."""
  ok = _is_real(value) and (value > lo if lo_open else value >= lo) and (hi is None or value < hi)
  if what is None:
    left = f"> {lo}" if lo_open else f">= {lo}"
    what = (f"a finite number {left}" if hi is None
            else f"a number in {'(' if lo_open else '['}{lo}, {hi})")
  _check(ok, field, value, f"must be {what}", fix)


def _section(config, name):
  if name not in config or config[name] is None:
    raise ConfigError(
        f"config has no '{name}' section; start from configs/quickstart.py (a run config needs "
        "data, model, train, eval, sample, mesh and sharding_rules)")
  return config[name]


def validate_model_config(config):
  """Checks only what builds the network (``config.data`` shape fields + ``config.model``) and
  returns its ModelConfig. For code that rebuilds a model from a saved config (export, load,
  benchmarks); a training run is checked by ``validate``, which also checks the data, optimizer,
  sampling, mesh and workdir settings."""
  for section in ("data", "model"):
    _section(config, section)
  for f in ("image_size", "channels", "num_classes"):
    if f not in config.data:
      raise ConfigError(f"config.data has no '{f}' field; start from configs/quickstart.py")
  m = ModelConfig.from_config(config)
  validate_model(m)
  return m


def _field(default, rule=None, **metadata):
  """A section field: its default and its rule (kind, bound, what it must be, fix); see _Section."""
  return dataclasses.field(default=default, metadata=dict(metadata, **({"rule": rule} if rule
                                                                       else {})))


class _Section:
  """A typed config section (a frozen dataclass): ``config.<SECTION>`` -> fields, validated once.

  The dataclass defaults are THE section defaults: configs start the section from
  ``configlib.base(<Section>)``, a ConfigDict of them, so ``--config.<section>.x=...`` overrides
  work and unknown keys are refused. A field's rule (kind, bound, what it must be, fix) is checked
  by ``_check_rules``; kind 'int': an integer >= bound, 'real>': a finite number > bound, 'real':
  >= bound, 'unit': in [0, 1), 'bool': True or False, 'choice': one of bound. Cross-field checks
  live in the section's ``check``.
  """
  SECTION = ""

  def get(self, name, default=None):
    """``t.get('ckpt_keep', 2)`` as on a ConfigDict (every field always has a value)."""
    return getattr(self, name, default)

  def check(self):
    """Cross-field checks (after every field passed its rule); ConfigError."""

  @classmethod
  def from_config(cls, config):
    """A run config's ``config.<SECTION>`` -> the section, validated (ConfigError naming the
    field)."""
    return cls.from_section(_section(config, cls.SECTION))

  @classmethod
  def from_section(cls, t, extra=()):
    """``config.<SECTION>`` (ConfigDict or dict) -> the section. Unknown and missing keys are
    refused (a config states every field; start from configlib.base(cls)), keys in ``extra`` are
    skipped, then every value is checked. Integer values of float fields become floats."""
    known = sorted(f.name for f in dataclasses.fields(cls) if not f.metadata.get("derived"))
    unknown = sorted(set(t.keys()) - set(known) - set(extra))
    if unknown:
      raise ConfigError(
          f"config.{cls.SECTION} has unknown field(s) {unknown}; known fields: "
          f"{sorted(known + list(extra))}. Fix: remove or rename them (see farmer_jax/config.py "
          f"{cls.__name__})")
    missing = [k for k in known if k not in t]
    if missing:
      raise ConfigError(
          f"config.{cls.SECTION} lacks field(s) {missing}. Fix: start config.{cls.SECTION} from "
          f"farmer_jax.configlib.base({cls.__name__}) (base_{cls.SECTION}()) and update it")
    out = cls(**{k: t[k] for k in known})  # derived fields keep their defaults here
    _check_rules(out)
    out.check()
    floats = {f.name: float(getattr(out, f.name))
              for f in dataclasses.fields(cls) if f.type in (float, "float")}
    return dataclasses.replace(out, **floats)


def _check_rules(sec):
  """Each field's rule (see _Section); ConfigError naming ``config.<section>.<field>``."""
  for f in dataclasses.fields(sec):
    if "rule" not in f.metadata:
      continue
    (kind, lo, what, fix), field = f.metadata["rule"], f"{sec.SECTION}.{f.name}"
    v = getattr(sec, f.name)
    if kind == "int":
      _int_at_least(field, v, lo, fix, what)
    elif kind == "real>":
      _real_in(field, v, lo, lo_open=True, fix=fix, what=what)
    elif kind == "real":
      _real_in(field, v, lo, fix=fix, what=what)
    elif kind == "unit":
      _real_in(field, v, 0.0, 1.0, fix=fix, what=what)
    elif kind == "bool":
      _check(isinstance(v, (bool, np.bool_)), field, v, what or "must be True or False", fix)
    elif kind == "str":
      _check(isinstance(v, str), field, v, what or "must be a string", fix)
    elif kind == "choice":
      _check(v in lo, field, v, what or f"must be one of {list(lo)}", fix)
    else:
      raise AssertionError(f"unknown rule kind {kind!r} for {field}")


_NOISE_STD = ("real", 0.0, "a finite number >= 0 (the dequantization noise std)")


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Section):
  """``config.train``: optimizer, schedules, dequantization noise, checkpoints (``from_config``).
  The defaults below are THE train defaults (``configlib.base_train()``); see _Section."""
  SECTION = "train"
  steps: int = _field(1000, ("int", 1, "an integer >= 1 (optimizer steps)",
                                   "e.g. --config.train.steps=3000"))
  batch_size: int = _field(64, ("int", 1, "an integer >= 1 (the global batch)",
                                      "e.g. --config.train.batch_size=32"))
  # peak lr (paper: 1e-4 -> 1e-6 cosine, 5000 warmup steps)
  lr: float = _field(1e-4, ("real>", 0.0, None, "use e.g. --config.train.lr=1e-4"))
  min_lr: float = _field(1e-6, ("real", 0.0, None,
                                      "use e.g. --config.train.min_lr=1e-6 (<= train.lr)"))
  warmup_steps: int = _field(5000, ("int", 0, "an integer >= 0",
                                          "e.g. --config.train.warmup_steps=100 (0 = no warmup)"))
  b1: float = _field(0.9, ("unit", None, "a number in [0, 1) (Adam's first-moment decay)",
                                 "use e.g. --config.train.b1=0.9"))
  b2: float = _field(0.95, ("unit", None, "a number in [0, 1) (Adam's second-moment decay)",
                                  "use e.g. --config.train.b2=0.95"))
  # applied to kernels only
  weight_decay: float = _field(0.03, ("real", 0.0, None,
                                            "use e.g. --config.train.weight_decay=0.03 (0 = none)"))
  # global-norm clip; 0 = off
  grad_clip: float = _field(0.0, ("real", 0.0, None,
                                        "use e.g. --config.train.grad_clip=1.0 (0 = off)"))
  # 0 = no EMA params
  ema_decay: float = _field(0.0, (
      "unit", None, "a number in [0, 1) (0 = no EMA; 1 would freeze the EMA at the init)",
      "use e.g. --config.train.ema_decay=0.9999, or 0 to turn EMA off"))
  # gaussian (annealed) | uniform (exact bpd runs); NOISE_KINDS
  noise_kind: str = _field("gaussian", ("choice", NOISE_KINDS, "unknown dequantization",
                                          f"use one of {NOISE_KINDS}"))
  # dequantization noise std in [-1, 1] units, cosine-annealed max -> min
  noise_max: float = _field(0.1, _NOISE_STD + ("use e.g. 0.1 (paper: 0.1 -> 0.005)",))
  noise_min: float = _field(0.005, _NOISE_STD + ("use e.g. 0.005 (paper: 0.1 -> 0.005)",))
  # steps over which sigma anneals; -1 = train.steps (see noise_anneal_steps)
  noise_steps: int = _field(-1)
  # probability of replacing the label by the null class (for CFG)
  label_drop: float = _field(0.1, ("unit", None,
                                         "a number in [0, 1) (probability of the null label)",
                                         "use e.g. --config.train.label_drop=0.1"))
  seed: int = _field(0, ("int", 0, "an integer >= 0", "e.g. --config.train.seed=0"))
  log_every: int = _field(50, ("int", 1,
                                     "an integer >= 1 (steps between logs and non-finite checks)",
                                     "e.g. --config.train.log_every=50"))
  # async checkpoint every k steps (0 = only at the end); always one at the end
  ckpt_every: int = _field(0, ("int", 0, "an integer >= 0 (0 = checkpoint only at the end)",
                                     "e.g. --config.train.ckpt_every=500"))
  # keep the last n checkpoints ...
  ckpt_keep: int = _field(2, ("int", 1,
                                    "an integer >= 1 (checkpoints kept; the newest must survive)",
                                    "e.g. --config.train.ckpt_keep=2"))
  # ... plus every m-th step forever (0 = none)
  ckpt_keep_period: int = _field(0, ("int", 0,
                                           "an integer >= 0 (0 = keep no periodic checkpoints)",
                                           "e.g. --config.train.ckpt_keep_period=0"))
  # multi-process runs: steps between the all-process SIGTERM checks (a host sync); 1 process
  # checks every step at no cost
  preempt_check_every: int = _field(10, ("int", 1, None,
                                         "e.g. --config.train.preempt_check_every=10"))
  # profiler trace of steps [profile_start, profile_start + profile_steps) to WORKDIR/profile
  # (TensorBoard's profile tab); 0 steps = off
  profile_start: int = _field(10, ("int", 0, None, "e.g. --config.train.profile_start=100"))
  profile_steps: int = _field(0, ("int", 0, "an integer >= 0 (0 = no trace)",
                                  "e.g. --config.train.profile_steps=5"))
  # a TARFlow checkpoint (.pth / .npz state_dict) whose AF starts a fresh run (the AR prior starts
  # from its init; ignored on resume); the model config must describe that AF (docs/pytorch.md)
  init_flow: str = _field("", ("str", None, None,
                               "e.g. --config.train.init_flow=afhq_model_8_768_8_8_0.07.pth"))

  @property
  def noise_anneal_steps(self):
    """Steps over which the noise std anneals: ``noise_steps``, or ``steps`` when it is -1."""
    return self.steps if self.noise_steps < 0 else self.noise_steps

  def check(self):
    """Cross-field checks of config.train (each field already passed its rule)."""
    _check(self.min_lr <= self.lr, "train.min_lr", self.min_lr, f"it exceeds train.lr={self.lr}",
           "the cosine schedule decays from train.lr down to train.min_lr; lower min_lr")
    _check(self.noise_min <= self.noise_max, "train.noise_min", self.noise_min,
           f"it exceeds train.noise_max={self.noise_max}",
           "the cosine schedule anneals from noise_max down to noise_min")
    _check(not self.init_flow or os.path.isfile(self.init_flow), "train.init_flow",
           self.init_flow, "no such file",
           "pass the path of a TARFlow checkpoint (.pth / .npz) on this machine, or '' for none")
    _check(is_int(self.noise_steps) and (self.noise_steps == -1 or self.noise_steps >= 1),
           "train.noise_steps", self.noise_steps,
           "must be an integer >= 1 (steps over which the noise anneals) or -1 (= train.steps)",
           "use -1 to anneal over the whole run")


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
  """``config.data``: which dataset (data/sources.py), the image shape the model is built for, and
  how the grain pipeline reads it (data/pipeline.py). Fields marked ``resume_neutral`` change
  nothing but where or how fast the same batches are read, so resuming with a new value is
  allowed (see config_changes)."""
  SECTION = "data"
  # mnist5k | tfds:NAME | folder:PATH (refused with the prepare command); see data/sources.py
  name: str = _field("mnist5k", ("str", None, None, "e.g. --config.data.name=tfds:imagenet2012"))
  # tfds:NAME only: the TFDS data_dir (local path or gs://...); "" = ~/tensorflow_datasets
  data_dir: str = _field("", ("str", None, None, "e.g. --config.data.data_dir=gs://bucket/tfds"),
                         resume_neutral=True)
  image_size: int = _field(32, ("int", 1, None, "e.g. --config.data.image_size=32"))
  channels: int = _field(1, ("int", 1, None, "e.g. --config.data.channels=3"))
  # 0 = unconditional (every label is the null class)
  num_classes: int = _field(10, ("int", 0, "an integer >= 0 (0 = unconditional)",
                                 "set it to the dataset's class count"))
  train_split: str = _field("train", ("str", None, None, "e.g. --config.data.train_split=train"))
  # none: stored images must be image_size^2 | center_crop: the ADM recipe, per image
  resize: str = _field("none", ("choice", RESIZE_MODES, None,
                                f"use one of {list(RESIZE_MODES)}"))
  # random horizontal flip of training images (not baked into the files)
  random_flip: bool = _field(False, ("bool", None, None, "use true or false"))
  # grain worker processes (0: read in this process, with read_threads threads)
  worker_count: int = _field(0, ("int", 0, None, "e.g. --config.data.worker_count=8 (0 = none)"),
                             resume_neutral=True)
  read_threads: int = _field(2, ("int", 1, None, "e.g. --config.data.read_threads=16"),
                             resume_neutral=True)
  # batches read ahead (per worker)
  prefetch: int = _field(4, ("int", 1, None, "e.g. --config.data.prefetch=4"),
                         resume_neutral=True)


# how the same model executes (same params, same function up to float rounding): a resumed run
# may change these
EXECUTION_FIELDS = ("unroll", "flow_attn_chunk", "attention", "remat", "remat_policy")
RESUME_NEUTRAL = tuple(f"data.{f.name}" for f in dataclasses.fields(DataConfig)
                       if f.metadata.get("resume_neutral")) + tuple(
                           f"model.{f}" for f in EXECUTION_FIELDS)


@dataclasses.dataclass(frozen=True)
class EvalConfig(_Section):
  """``config.eval``: the split bits/dim is measured on (checked against the dataset's splits by
  ``validate``), the eval batch (rounded up to a multiple of the data-parallel slots and the process
  count), the dequantization draws per image, how often training evaluates, and the offline MNIST
  sample-quality metrics (docs/eval.md)."""
  SECTION = "eval"
  batch_size: int = _field(250, ("int", 1, None, "e.g. --config.eval.batch_size=250"))
  split: str = _field("test", ("str", None, None, "e.g. --config.eval.split=test"))
  # uniform dequantization draws per image (mean, standard error; K > 1 adds the IW bound)
  dequant_samples: int = _field(1, ("int", 1, None, "e.g. --config.eval.dequant_samples=1"))
  # bits/dim during training every k steps (0 = only at the end)
  every: int = _field(0, ("int", 0, "an integer >= 0 (0 = only at the end of training)",
                          "e.g. --config.eval.every=1000"))
  # at the end of training: MNIST-FID and class consistency of samples, scored by a small CNN
  # trained on the bundled MNIST-5k train split (eval/mnist_quality.py); needs data.name=mnist5k
  mnist_quality: bool = _field(False, ("bool", None, None,
                                       "e.g. --config.eval.mnist_quality=True"))
  # samples per class for those metrics, drawn at cfg 0 and at config.sample's guidance
  quality_per_class: int = _field(100, ("int", 2, None,
                                        "e.g. --config.eval.quality_per_class=100"))


class ResamplingCFG(NamedTuple):
  """Hyper-parameters of resampling CFG (paper Table 6 names). ``w``, the guidance scale, is
  spelled ``cfg`` in config.sample and on the CLI (see SAMPLER_FIELDS)."""
  w: float = 0.0
  s_c: int = 5
  s_u: int = 5
  t_pi: float = 1.0
  t_sigma: float = 1.0
  t_pi_v: float = 1.0
  t_sigma_v: float = 1.0
  t_s: float = 1.0


class SamplerConfig(NamedTuple):
  """How to sample: the sampler settings of ``config.sample`` (``from_config``), flat: SAMPLER_KEYS.

  Adding a sampler option = a field here (or in ResamplingCFG) and its check in validate_sampler;
  the config.sample keys, the CLI's --sampler keys and their help follow from the fields.
  """
  guidance: str = "none"                 # GUIDANCE_MODES
  # w and temperatures; the proposal temperatures are also used by 'none' and 'naive'
  cfg: ResamplingCFG = ResamplingCFG()
  # resampling CFG: candidates per group (cond, uncond) for EACH z^R_i
  redundant_candidates: int = 16
  redundant_var_scale: float = 1.0       # paper Fig. 7: multiplies the redundant group's variances
  naive_proposals: int = 1000
  # the AF inverse: 'exact' (sequential over tokens) | 'jacobi' (parallel fixed-point iterations,
  # until the largest change is <= jacobi_tol, at most jacobi_max_iters; 0 = N - 1 = exact) |
  # 'student' (the distilled one-step inverse of an export that carries one)
  inverse: str = "exact"
  jacobi_tol: float = 1e-4
  jacobi_max_iters: int = 0
  # TARFlow's guided reverse, in the exact AF inverse (docs/sampling.md; the guidance of a
  # standard_normal-prior model): strength (0 = off), what it extrapolates (AF_GUIDE_WHAT), the
  # weak branch's attention temperature, and a guidance ramping up over the tokens (annealed)
  af_guidance: float = 0.0
  af_guide_what: str = "ab"
  af_attn_temp: float = 1.0
  af_annealed: bool = False
  # TARFlow's self-denoising after the AF inverse: x + sigma^2 grad_x log p(x | y) (Tweedie), sigma
  # = the Gaussian noise std the model was trained with (model units); 0 = off
  denoise_sigma: float = 0.0

  @property
  def af_guide(self):
    """The guidance kwargs of ``AutoregressiveFlow.inverse``, or None when af_guidance is 0."""
    if not self.af_guidance:
      return None
    return dict(guidance=float(self.af_guidance), guide_what=self.af_guide_what,
                attn_temp=float(self.af_attn_temp), annealed=bool(self.af_annealed))

  @property
  def informative_pool(self):
    """Candidates per informative resampling draw: s_c + s_u."""
    return self.cfg.s_c + self.cfg.s_u

  @property
  def redundant_pool(self):
    """Candidates per redundant resampling draw: redundant_candidates per group (cond, uncond)."""
    return 2 * self.redundant_candidates

  @classmethod
  def from_config(cls, sc):
    """``config.sample`` (ConfigDict or dict) -> validated SamplerConfig. Keys other than
    SAMPLER_KEYS (per_class, seed) are ignored; missing ones take the defaults. Raises ValueError
    naming the key."""
    sc = dict(sc)
    top, sub = {}, {}
    for key, (parent, name, typ) in SAMPLER_FIELDS.items():
      if key in sc:
        (sub if parent else top)[name] = _sampler_value(key, sc[key], typ)
    s = cls(cfg=ResamplingCFG(**sub), **top)
    validate_sampler(s)
    return s


def _sampler_fields():
  """flat key -> (parent field or None, field name, type): SamplerConfig's fields with ``cfg``
  replaced by ResamplingCFG's, of which ``w`` keeps the key ``cfg`` (the guidance scale, --cfg)."""
  out = {}
  top, sub = typing.get_type_hints(SamplerConfig), typing.get_type_hints(ResamplingCFG)
  for name in SamplerConfig._fields:
    if name != "cfg":
      out[name] = (None, name, top[name])
      continue
    for inner in ResamplingCFG._fields:
      out["cfg" if inner == "w" else inner] = ("cfg", inner, sub[inner])
  return out


# Keys of ``config.sample`` (and of the CLI's --sampler) that configure sampling; the others
# (per_class, seed) do not. Derived from the fields of SamplerConfig and ResamplingCFG.
SAMPLER_FIELDS = _sampler_fields()
SAMPLER_KEYS = tuple(SAMPLER_FIELDS)


def _sampler_value(key, v, typ):
  if typ is bool:
    if isinstance(v, str) and v.lower() in ("true", "false"):
      return v.lower() == "true"
    if not (isinstance(v, (bool, np.bool_)) or (is_int(v) and v in (0, 1))):
      raise ValueError(f"{key}={v!r} must be true or false")
    return bool(v)
  if typ is int:
    if not (_is_real(v) and v == int(v)):
      raise ValueError(f"{key}={v!r} must be an integer")
    return int(v)
  return typ(v)


def sampler_from_config(sc) -> SamplerConfig:
  """``config.sample`` (ConfigDict or dict) -> SamplerConfig; see SamplerConfig.from_config."""
  return SamplerConfig.from_config(sc)


def validate_sampler(s: SamplerConfig):
  """Checks a SamplerConfig; raises ValueError naming the setting."""
  if s.guidance not in GUIDANCE_MODES:
    raise ValueError(f"guidance={s.guidance!r} is unknown; use one of {GUIDANCE_MODES}")
  c = s.cfg
  if not (c.w >= 0 and math.isfinite(c.w)):
    raise ValueError(f"cfg={c.w} must be a finite number >= 0 (0 = no guidance strength)")
  for name in (f for f in ResamplingCFG._fields if f.startswith("t_")):
    v = getattr(c, name)
    if not (v > 0 and math.isfinite(v)):
      raise ValueError(f"temperature {name}={v} must be a finite number > 0")
  if s.guidance == "resampling" and (not (is_int(c.s_c) and is_int(c.s_u)) or c.s_c < 0 or c.s_u < 0
                                     or c.s_c + c.s_u < 1):
    raise ValueError(f"candidate counts s_c={c.s_c}, s_u={c.s_u} must be integers >= 0 with "
                     "s_c + s_u >= 1")
  if not is_int(s.redundant_candidates) or s.redundant_candidates < 1:
    raise ValueError(f"redundant_candidates={s.redundant_candidates} must be an integer >= 1 "
                     "(candidates per group for each redundant token)")
  if not (s.redundant_var_scale >= 0 and math.isfinite(s.redundant_var_scale)):
    raise ValueError(f"redundant_var_scale={s.redundant_var_scale} must be a finite number >= 0")
  if not is_int(s.naive_proposals) or s.naive_proposals < 1:
    raise ValueError(f"naive_proposals={s.naive_proposals} must be an integer >= 1")
  if s.inverse not in INVERSES:
    raise ValueError(f"inverse={s.inverse!r} is unknown; use one of {INVERSES}")
  if not (s.jacobi_tol >= 0 and math.isfinite(s.jacobi_tol)):
    raise ValueError(f"jacobi_tol={s.jacobi_tol} must be a finite number >= 0 (0 = until exact)")
  if not is_int(s.jacobi_max_iters) or s.jacobi_max_iters < 0:
    raise ValueError(f"jacobi_max_iters={s.jacobi_max_iters} must be an integer >= 0 (0 = N - 1, "
                     "the exact inverse)")
  if not (_is_real(s.af_guidance) and s.af_guidance >= 0 and math.isfinite(s.af_guidance)):
    raise ValueError(f"af_guidance={s.af_guidance} must be a finite number >= 0 (0 = off)")
  if s.af_guide_what not in AF_GUIDE_WHAT:
    raise ValueError(f"af_guide_what={s.af_guide_what!r} is unknown; use one of {AF_GUIDE_WHAT}")
  if not (_is_real(s.af_attn_temp) and s.af_attn_temp > 0 and math.isfinite(s.af_attn_temp)):
    raise ValueError(f"af_attn_temp={s.af_attn_temp} must be a finite number > 0 (1 = plain "
                     "attention)")
  if not (_is_real(s.denoise_sigma) and s.denoise_sigma >= 0 and math.isfinite(s.denoise_sigma)):
    raise ValueError(f"denoise_sigma={s.denoise_sigma} must be a finite number >= 0 (the training "
                     "noise std; 0 = no denoising step)")
  if s.af_guidance and s.inverse != "exact":
    raise ValueError(f"af_guidance={s.af_guidance} guides the exact AF inverse, but "
                     f"inverse={s.inverse!r}; use inverse=exact or af_guidance=0")


def check_sampler_for_model(s: SamplerConfig, m: ModelConfig):
  """What a sampler needs of the model; ValueError naming the setting."""
  if m.prior == "standard_normal" and s.guidance != "none":
    raise ValueError(f"guidance={s.guidance!r} guides the AR prior's GMMs, but this model's "
                     "prior is standard_normal (e.g. a converted TARFlow); use guidance=none "
                     "(--cfg=0) and TARFlow's guidance af_guidance=W (--sampler=af_guidance=W)")
  if s.af_guidance and not m.flow_class_conditional and s.af_attn_temp == 1:
    raise ValueError(f"af_guidance={s.af_guidance} does nothing here: this model's AF is not "
                     "class conditional, so its guided and weak branches are the same network; "
                     "set af_attn_temp != 1 (TARFlow's unconditional guidance, e.g. 0.8 or 1.3) "
                     "or af_guidance=0")


def sampler_defaults():
  """{key: default} for every SAMPLER_KEYS key (flat, as in config.sample)."""
  d = SamplerConfig()
  return {k: getattr(d.cfg if parent else d, name)
          for k, (parent, name, _) in SAMPLER_FIELDS.items()}


def _sampler_of_section(s):
  """The SamplerConfig of a ``config.sample`` section; its errors as ConfigError naming the key."""
  settings = {k: v for k, v in s.items() if k in SAMPLER_KEYS}
  try:
    return SamplerConfig.from_config(settings)
  except ValueError as e:
    msg = str(e)
    # name the key the sampler complained about (the earliest 'key=' in its message)
    hits = sorted((m.start(), k) for k in SAMPLER_KEYS for m in [re.search(rf"\b{k}=", msg)] if m)
    key = next((k for _, k in hits if k in settings), hits[0][1] if hits else None)
    if key is None:
      raise ConfigError(f"config.sample is invalid: {msg}. Fix: correct config.sample") from None
    value = settings.get(key, "<default>")
    raise ConfigError(f"config.sample.{key}={value!r} is invalid: {msg}. Fix: set "
                      f"--config.sample.{key} to a valid value (at sampling time: farmer_jax "
                      "sample --cfg/--guidance/--sampler)") from None


@dataclasses.dataclass(frozen=True)
class SampleConfig(_Section):
  """``config.sample``: the sample grid a training run writes (``per_class`` samples of every
  class, ``seed``) and how to sample it: the SAMPLER_KEYS, flat, parsed into ``sampler``."""
  SECTION = "sample"
  per_class: int = _field(8, ("int", 1, None, "e.g. --config.sample.per_class=8"))
  seed: int = _field(0, ("int", 0, None, "e.g. --config.sample.seed=0"))
  sampler: SamplerConfig = dataclasses.field(default=SamplerConfig(), metadata={"derived": True})

  @classmethod
  def from_section(cls, s, extra=()):
    out = super().from_section(s, extra=tuple(extra) + SAMPLER_KEYS)
    return dataclasses.replace(out, sampler=_sampler_of_section(s))


def _validate_mesh(config, t, train_size, num_devices, num_processes):
  from farmer_jax import sharding
  if num_devices is None:
    import jax
    num_devices = jax.device_count()
  if num_processes is None:
    import jax
    num_processes = jax.process_count()
  names, sizes = sharding.mesh_shape(config.mesh, num_devices)
  shape = dict(zip(names, sizes))
  rules = config.sharding_rules
  ok_rules = not isinstance(rules, (str, bytes)) and all(
      not isinstance(r, (str, bytes)) and len(r) == 2 and isinstance(r[0], str) for r in rules)
  _check(ok_rules, "sharding_rules", rules,
         "must be a sequence of (logical axis, mesh axis or axes) pairs",
         "e.g. (('batch', ('data', 'fsdp')),)")
  for logical, axes in rules:
    axes = () if axes is None else tuple(axes) if isinstance(axes, (list, tuple)) else (axes,)
    for a in axes:
      _check(
          a in shape, "sharding_rules", rules,
          f"logical axis {logical!r} maps to mesh axis {a!r}, which config.mesh={config.mesh!r} "
          "does not have",
          f"map it to axes of the mesh {list(names)}")
  batch_axes = sharding.batch_mesh_axes(rules)
  slots = int(np.prod([shape[a] for a in batch_axes])) if batch_axes else 1
  b = t.batch_size
  _check(
      b % slots == 0, "train.batch_size", b,
      f"the batch is split over mesh axes {batch_axes} = {slots} data-parallel slots on "
      f"{num_devices} device(s), "
      f"and {b} is not a multiple of {slots}",
      f"use a multiple of {slots}, e.g. --config.train.batch_size={max(slots, b // slots * slots)}")
  _check(b % num_processes == 0, "train.batch_size", b,
         f"each of the {num_processes} processes loads batch_size / {num_processes} examples",
         f"use a multiple of {num_processes}")
  if train_size is not None:
    _check(b <= train_size, "train.batch_size", b,
           f"it exceeds the {train_size} training images of config.data.name={config.data.name!r}",
           f"use at most {train_size}")
  fsdp = config.get("fsdp")
  if fsdp:
    _check(fsdp.get("axis") in shape, "fsdp.axis", fsdp.get("axis"),
           f"it is not an axis of config.mesh={config.mesh!r}", f"use one of {list(names)}")
    _int_at_least("fsdp.min_params", fsdp.get("min_params", 0), 0,
                  "e.g. --config.fsdp.min_params=65536")


def validate_workdir(workdir, flag="--workdir"):
  """Checks, without creating anything, that the directory ``workdir`` can be written: not an
  existing file, and it (if it exists) or its nearest existing ancestor is a writable directory.
  ``flag`` names it in the message. Remote paths (``scheme://...``) are not checked here."""
  def bad(why, fix):
    return ConfigError(f"{flag}={workdir} is invalid: {why}. Fix: {fix}.")
  if not isinstance(workdir, str) or not workdir.strip():
    raise bad("it must be a directory path", f"e.g. {flag}=/tmp/farmer_run")
  if "://" in workdir:
    return
  path = os.path.abspath(workdir)
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise bad("it is an existing file, not a directory",
                "pass a new directory path (or an existing run directory)")
    if not os.access(path, os.W_OK | os.X_OK):
      raise bad("the directory is not writable", f"fix its permissions or choose another {flag}")
    return
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise bad(f"{parent} is a file, so the directory cannot be created under it",
              "choose a path under a directory")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise bad(f"it does not exist and {parent} is not writable, so it cannot be created",
              f"choose a {flag} under a writable directory")


def validate(config, workdir=None, num_devices=None, num_processes=None):
  """Validates a full run config (and, if given, the workdir) and returns its ModelConfig.

  Raises ConfigError naming the field, its value and the fix, before anything is written: data (a
  dataset ``load_split`` knows, shapes and class count consistent with it), model, every
  config.train field, eval, sample (sampler settings via sampler_from_config), mesh + sharding rules
  against ``num_devices`` (default jax.device_count()) and the batch against the data-parallel slots
  and ``num_processes`` (default jax.process_count()), and the workdir (an existing file, or no way
  to create it, is refused).
  """
  for section in ("data", "model", "train", "eval", "sample", "mesh", "sharding_rules"):
    _section(config, section)
  from farmer_jax.data import sources
  d = DataConfig.from_config(config)
  info = sources.describe(d)
  e = EvalConfig.from_config(config)
  sources.check_config(d, info, (("data.train_split", d.train_split), ("eval.split", e.split)))
  _check(not e.mnist_quality or (d.name == "mnist5k" and d.image_size == 32 and d.channels == 1
                                  and d.num_classes == 10),
         "eval.mnist_quality", True, f"its digit classifier scores class-conditional 32x32x1 MNIST "
         f"samples only (10 classes), and this run trains on {d.name} ({d.image_size}x"
         f"{d.image_size}x{d.channels}, {d.num_classes} classes)",
         "set --config.eval.mnist_quality=False (score other data with `farmer_jax fid`)")
  m = validate_model_config(config)
  TrainConfig.from_config(config)
  grid = SampleConfig.from_config(config)
  _check(grid.sampler.inverse != "student", "sample.inverse", "student",
         "a run's sample grid is drawn with its own model, which carries no distilled student",
         "use --config.sample.inverse=exact or jacobi (the student is used by `farmer_jax sample "
         "--inverse=student` on an export made with --student)")
  try:
    check_sampler_for_model(grid.sampler, m)
  except ValueError as e:
    raise ConfigError(f"config.sample.guidance={grid.sampler.guidance!r} is invalid: {e}. Fix: "
                      "set --config.sample.guidance=none and --config.sample.cfg=0") from None
  _validate_mesh(config, config.train, info.splits.get(d.train_split), num_devices,
                 num_processes)
  if workdir is not None:
    validate_workdir(workdir)
  return m
