"""The sections of a run config: one frozen dataclass per section, whose defaults are THE defaults
and whose fields carry their rules (rules.py): ``ModelConfig`` (``config.model`` + the shape fields
of ``config.data``), ``DataConfig``, ``TrainConfig``, ``EvalConfig`` and ``SampleConfig`` (the grid
a run samples, and its ``SamplerConfig``: the sampler settings, also set by ``farmer_jax sample
--cfg/--guidance/--sampler``). Each is built by ``from_section`` from its ConfigDict section;
parse.py builds the whole run config from them. This module does not import jax."""

import dataclasses
import math
import os
import typing
from typing import NamedTuple

from farmer_jax import xla_options
from farmer_jax.config import rules
from farmer_jax.config.rules import SettingError, is_int, is_real
from farmer_jax.errors import ConfigError

DIMRED_MODES = ("farmer", "jetformer", "none")
SCALE_FNS = ("squareplus", "softplus")
# The dtypes by name: model.dtype (compute) and the export's params (--dtype). jnp_dtype(name).
DTYPE_NAMES = ("float32", "bfloat16")
NOISE_KINDS = ("gaussian", "uniform")
AR_ORDERS = ("alternate", "same")
GUIDANCE_MODES = ("none", "resampling", "naive")
# sample.redundant_pool: the redundant tokens' resampling-CFG candidates, ONE pool per image every
# z^R_i picks from (paper Algorithm 1) | a fresh pool per z^R_i (docs/sampling.md)
REDUNDANT_POOLS = ("shared", "per_token")
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
# samples drawn at once by `farmer_jax sample` and `fid` unless --batch says otherwise
SAMPLE_BATCH = 64
# the fields of ModelConfig that config.data sets
DATA_SHAPE_FIELDS = ("image_size", "channels", "num_classes")


def jnp_dtype(name):
  """'float32' | 'bfloat16' (``DTYPE_NAMES``) -> the jax.numpy dtype."""
  if name not in DTYPE_NAMES:
    raise ValueError(f"dtype {name!r} is not supported; use one of {list(DTYPE_NAMES)}")
  import jax.numpy as jnp
  return getattr(jnp, name)


class Section:
  """A typed config section (a frozen dataclass): ``config.<SECTION>`` -> fields, checked once.

  The dataclass defaults are THE section defaults: configs start the section from
  ``configlib.base_<section>()``, a ConfigDict of them, so ``--config.<section>.x=...`` overrides
  work and unknown keys are refused. Each field's rule (rules.Rule) is checked in field order, then
  ``check`` (the rules relating several fields). With ``COMPLETE`` a section must list every field
  (a missing key is refused); otherwise a missing key takes its default. Integer values of float
  fields become floats.
  """
  SECTION = ""
  COMPLETE = True

  def get(self, name, default=None):
    """``t.get('ckpt_keep', 2)`` as on a ConfigDict (every field always has a value)."""
    return getattr(self, name, default)

  def check(self):
    """Cross-field rules (after every field passed its rule); FieldError."""

  @classmethod
  def known_fields(cls):
    """The keys a config section may hold."""
    return sorted(f.name for f in dataclasses.fields(cls) if not f.metadata.get("derived"))

  @classmethod
  def unknown_error(cls, unknown, known):
    return ConfigError(
        f"config.{cls.SECTION} has unknown field(s) {unknown}; known fields: {known}. Fix: remove "
        f"or rename them (see farmer_jax/config/schema.py {cls.__name__})")

  @classmethod
  def from_section(cls, t, extra=(), **given):
    """``config.<SECTION>`` (ConfigDict or dict) -> the section, checked. Keys in ``extra`` are
    skipped; ``given`` fields are set from elsewhere (ModelConfig's data shape)."""
    known = cls.known_fields()
    unknown = sorted(set(t.keys()) - set(known) - set(extra))
    if unknown:
      raise cls.unknown_error(unknown, sorted(known + list(extra)))
    if cls.COMPLETE:
      missing = [k for k in known if k not in t]
      if missing:
        raise ConfigError(
            f"config.{cls.SECTION} lacks field(s) {missing}. Fix: start config.{cls.SECTION} from "
            f"farmer_jax.configlib.base({cls.__name__}) (base_{cls.SECTION}()) and update it")
    # derived fields keep their defaults; ``given`` (ModelConfig's data shape, from config.data)
    # wins over a same-named key of the section
    out = cls(**{k: t[k] for k in known if k in t and k not in given}, **given)
    rules.check_fields(out, cls.SECTION)
    out.check()
    floats = {f.name: float(getattr(out, f.name))
              for f in dataclasses.fields(cls) if f.type in (float, "float")}
    return dataclasses.replace(out, **floats)


def _pos(name):
  """A model field that must be a positive (Python) integer."""
  return rules.Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                    "must be a positive integer", f"set --config.{name} to an integer >= 1")


def _bool(name):
  return rules.boolean(f"set --config.model.{name}=true or false")


def _choice(choices, why, hint=""):
  """A model field naming one of ``choices``; the fix lists them (and the ``hint``)."""
  return rules.one_of(choices, f"use one of {choices}" + (f" ({hint})" if hint else ""), why)


_NUM_CLASSES = rules.Rule(lambda v: isinstance(v, int) and v >= 0,
                          "must be >= 0 (0 = unconditional)", "set it to the number of labels")
_CLASS_REPEATS = rules.Rule(lambda v: isinstance(v, int) and v >= 1,
                            "the class prefix needs M >= 1 copies",
                            "set --config.model.class_repeats to 1 or more (paper: 64)")


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
  """Everything the FARMER network needs: ``config.model`` + the shape fields of ``config.data``
  (``from_section(config.model, **data shape)``). A missing model key takes its default."""
  SECTION = "model"
  COMPLETE = False
  image_size: int = rules.field(32, _pos("data.image_size"), name="data.image_size")
  channels: int = rules.field(1, _pos("data.channels"), name="data.channels")
  patch_size: int = rules.field(4, _pos("model.patch_size"))
  # 0 = unconditional (only the null class exists)
  num_classes: int = rules.field(10, _NUM_CLASSES, name="data.num_classes")
  # autoregressive flow
  flow_blocks: int = rules.field(4, _pos("model.flow_blocks"))
  # transformer layers per AF block
  flow_layers: int = rules.field(2, _pos("model.flow_layers"))
  flow_width: int = rules.field(128, _pos("model.flow_width"))
  flow_heads: int = rules.field(2, _pos("model.flow_heads"))
  flow_class_conditional: bool = rules.field(False, _bool("flow_class_conditional"))
  # LayerNorm before each AF block's proj_out (TARFlow has none; see docs/math.md)
  flow_final_norm: bool = rules.field(True, _bool("flow_final_norm"))
  # execution only (same params, same results up to float rounding): AF blocks and the AF's and
  # AR prior's layers as Python loops over the stacked params (true) or under scan (false, the
  # default: compile time independent of the depth); on CPU unrolling measured ~1.5x faster train
  # steps and ~4x faster sampling (benchmarks/vs_torch.py, docs/performance.md)
  unroll: bool = rules.field(False, _bool("unroll"))
  # query chunk size of the AF's causal attention in full-sequence passes with attention='einsum';
  # chunk i reads the keys of chunks <= i only (0 or >= tokens: one chunk)
  flow_attn_chunk: int = rules.field(64, rules.Rule(lambda v: rules.is_int(v) and v >= 0,
                                                    "must be an integer >= 0",
                                                    "e.g. 64 (0 = one chunk)"))
  # AR prior vs the last AF block: "alternate" (opposite order) | "same"
  ar_order: str = rules.field("alternate", _choice(
      AR_ORDERS, "unknown AR prior direction",
      "'alternate': opposite to the last AF block, the paper's final permute"))
  # the density of the AF's latents: "ar" (FARMER) | "standard_normal" (TARFlow; the ar_* and
  # GMM fields below are then unused); PRIORS
  prior: str = rules.field("ar", _choice(PRIORS, "unknown prior over the AF latents",
                                         "'standard_normal' = TARFlow's N(0, I)"))
  # uint8 <-> model space: "farmer" ((v + 0.5)/128 - 1) | "tarflow" (2v/255 - 1); PIXELS
  pixels: str = rules.field("farmer", _choice(PIXELS, "unknown pixel mapping",
                                              "'tarflow' for models trained on 2v/255 - 1"))
  # AR prior
  ar_width: int = rules.field(128, _pos("model.ar_width"))
  ar_depth: int = rules.field(2, _pos("model.ar_depth"))
  ar_heads: int = rules.field(2, _pos("model.ar_heads"))
  class_repeats: int = rules.field(4, _CLASS_REPEATS)     # M
  # DIMRED_MODES: farmer | jetformer | none
  dimred: str = rules.field("farmer", _choice(DIMRED_MODES, "unknown dimension-reduction mode"))
  d_informative: int = 8              # d_I (ignored for dimred='none', where d_I = d)
  mixtures_informative: int = rules.field(8, _pos("model.mixtures_informative"))   # K_I
  mixtures_redundant: int = 8         # K_R
  scale_fn: str = rules.field("squareplus", _choice(SCALE_FNS, "unknown scale parameterisation"))
  scale_floor: float = rules.field(1e-6, rules.Rule(lambda v: v > 0, "must be > 0",
                                                    "use e.g. 1e-6"))
  # common
  mlp_ratio: int = rules.field(4, _pos("model.mlp_ratio"))
  dtype: str = rules.field("float32", rules.one_of(DTYPE_NAMES,
                                                   f"use one of {sorted(DTYPE_NAMES)}",
                                                   "unknown compute dtype"))
  remat: bool = rules.field(False, _bool("remat"))
  # REMAT_POLICIES; used when remat=True
  remat_policy: str = rules.field("nothing_saveable", _choice(
      REMAT_POLICIES, "unknown rematerialisation policy", "or model.remat=False for none"))
  # also rematerialise each AF block whole (under scan): the backward keeps only the blocks'
  # inputs (B, N, d), not every layer's (B, N, C), for one more AF forward per step
  remat_blocks: bool = rules.field(False, _bool("remat_blocks"))
  # attention implementation (ATTENTION_IMPLS): 'xla' (jax.nn.dot_product_attention), 'cudnn' (its
  # fused GPU kernel; needs dtype='bfloat16', check()), 'einsum' (two einsums + fp32 softmax,
  # chunked causal: fastest on CPU)
  attention: str = rules.field("xla", _choice(ATTENTION_IMPLS, "unknown attention implementation",
                                              "'einsum' on CPU, 'cudnn' on GPU with bf16"))


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
    last_block_flipped = self.flow_blocks % 2 == 0
    return last_block_flipped if self.ar_order == "same" else not last_block_flipped

  @property
  def null_class(self):
    return self.num_classes

  @property
  def jnp_dtype(self):
    return jnp_dtype(self.dtype)

  @classmethod
  def known_fields(cls):
    return sorted(f.name for f in dataclasses.fields(cls))

  @classmethod
  def unknown_error(cls, unknown, known):
    return ConfigError(f"config.model has unknown field(s) {unknown}; known fields: {known}")

  def check(self):
    require = rules.require
    require(not self.image_size % self.patch_size, "model.patch_size", self.patch_size,
            f"it does not divide data.image_size={self.image_size}",
            "choose a patch size that divides the image size")
    require(not self.flow_width % self.flow_heads, "model.flow_heads", self.flow_heads,
            f"does not divide model.flow_width={self.flow_width}",
            "pick a head count dividing the width")
    require(not self.ar_width % self.ar_heads, "model.ar_heads", self.ar_heads,
            f"does not divide model.ar_width={self.ar_width}",
            "pick a head count dividing the width")
    if self.dimred != "none" and self.prior == "ar":    # (a standard_normal prior splits nothing)
      d = self.token_dim
      require(
          isinstance(self.d_informative, int) and 1 <= self.d_informative < d,
          "model.d_informative", self.d_informative,
          f"d_I must satisfy 1 <= d_I < d = patch_size^2 * channels = {d} for "
          f"dimred={self.dimred!r}",
          f"choose d_I below {d}, or set --config.model.dimred=none to model all {d} channels")
    if self.dimred == "farmer":
      _pos("model.mixtures_redundant").require("model.mixtures_redundant",
                                               self.mixtures_redundant)
    require(self.attention != "cudnn" or self.dtype != "float32", "model.attention",
            self.attention, "cuDNN's fused attention takes bf16/fp16 inputs only, and "
            "model.dtype='float32' computes in fp32",
            "set --config.model.dtype=bfloat16 (the GPU overlay sets both, e.g. "
            "--config=imagenet256:1.1B/16,gpu), or --config.model.attention=xla in "
            "fp32")


def _field(default, spec=None, **metadata):
  """A section field from (kind, bound, what it must be, fix): kind 'int': an integer >= bound,
  'real>': a finite number > bound, 'real': >= bound, 'unit': in [0, 1), 'bool': True or False,
  'str': a string, 'choice': one of bound; ``what`` replaces the default wording."""
  if spec is None:
    return rules.field(default, **metadata)
  kind, lo, what, fix = spec
  rule = {
      "int": lambda: rules.int_at_least(lo, fix, what),
      "real>": lambda: rules.real_in(lo, fix, what, lo_open=True),
      "real": lambda: rules.real_in(lo, fix, what),
      "unit": lambda: rules.unit(fix, what),
      "bool": lambda: rules.boolean(fix, *([what] if what else [])),
      "str": lambda: rules.text(fix, *([what] if what else [])),
      "choice": lambda: rules.one_of(lo, fix, what),
  }[kind]()
  return rules.field(default, rule, **metadata)


_NOISE_STD = ("real", 0.0, "a finite number >= 0 (the dequantization noise std)")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
  """``config.train``: optimizer, schedules, dequantization noise, checkpoints (``from_section``).
  The defaults below are THE train defaults (``configlib.base_train()``); see Section."""
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
  # XLA's compiler options for the train step on TPU (xla_options.py): 'tpu' (async collectives),
  # 'none' (XLA's defaults) or 'flag=value,...'
  xla_options: str = rules.field("tpu", rules.Rule(
      xla_options.valid, "must be 'tpu', 'none' or 'flag=value,...' with XLA flag names",
      "use --config.train.xla_options=none for XLA's defaults"))
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
    rules.require(self.min_lr <= self.lr, "train.min_lr", self.min_lr,
                  f"it exceeds train.lr={self.lr}",
                  "the cosine schedule decays from train.lr down to train.min_lr; lower min_lr")
    rules.require(self.noise_min <= self.noise_max, "train.noise_min", self.noise_min,
                  f"it exceeds train.noise_max={self.noise_max}",
                  "the cosine schedule anneals from noise_max down to noise_min")
    rules.require(not self.init_flow or os.path.isfile(self.init_flow), "train.init_flow",
                  self.init_flow, "no such file",
                  "pass the path of a TARFlow checkpoint (.pth / .npz) on this machine, or '' "
                  "for none")
    rules.require(is_int(self.noise_steps) and (self.noise_steps == -1 or self.noise_steps >= 1),
                  "train.noise_steps", self.noise_steps,
                  "must be an integer >= 1 (steps over which the noise anneals) or -1 "
                  "(= train.steps)",
                  "use -1 to anneal over the whole run")


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
  """``config.data``: which dataset (data/sources.py), the image shape the model is built for, and
  how the grain pipeline reads it (data/pipeline.py). Fields marked ``resume_neutral`` change
  nothing but where or how fast the same batches are read, so resuming with a new value is
  allowed (resume.py)."""
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
  # records read and decoded at once (per worker): a batch's records are read in parallel
  read_threads: int = _field(2, ("int", 1, None, "e.g. --config.data.read_threads=16"),
                             resume_neutral=True)
  # batches read ahead (per worker): prefetch x local batch records in flight, and with workers
  # prefetch finished batches buffered per worker
  prefetch: int = _field(4, ("int", 1, None, "e.g. --config.data.prefetch=4"),
                         resume_neutral=True)


@dataclasses.dataclass(frozen=True)
class EvalConfig(Section):
  """``config.eval``: the split bits/dim is measured on (checked against the dataset's splits by
  ``parse``), the eval batch (rounded up to a multiple of the data-parallel slots and the process
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

  Adding a sampler option = a field here (or in ResamplingCFG) and its rule in SAMPLER_RULES (or
  check); the config.sample keys, the CLI's --sampler keys and their help follow from the fields.
  """
  guidance: str = "none"                 # GUIDANCE_MODES
  # w and temperatures; the proposal temperatures are also used by 'none' and 'naive'
  cfg: ResamplingCFG = ResamplingCFG()
  # resampling CFG of the redundant tokens (REDUNDANT_POOLS): 'shared' = Algorithm 1, one pool of
  # redundant_candidates per group (cond, uncond) per image, every z^R_i picked from it;
  # 'per_token' = redundant_candidates per group for EACH z^R_i
  redundant_pool: str = "shared"
  redundant_candidates: int = 16
  redundant_var_scale: float = 1.0       # paper Fig. 7: multiplies the redundant group's variances
  naive_proposals: int = 1000
  # the AF inverse: 'exact' (sequential over tokens) | 'jacobi' (parallel fixed-point iterations,
  # until the largest change is <= jacobi_tol, at most jacobi_max_iters; 0 = N - 1 = exact) |
  # 'student' (the distilled one-step inverse of an export that carries one)
  inverse: str = "exact"
  jacobi_tol: float = 1e-4
  jacobi_max_iters: int = 0
  # what the exact and Jacobi AF inverses compute in, whatever model.dtype (DTYPE_NAMES): in bf16
  # the rounding compounds over the blocks into visible pixel errors (docs/math.md, "bf16")
  decode_dtype: str = "float32"
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
  def redundant_pool_size(self):
    """Candidates per redundant pool (one per image, or per token: ``redundant_pool``):
    redundant_candidates per group (cond, uncond)."""
    return 2 * self.redundant_candidates

  def check(self):
    """Each setting's rule (SAMPLER_RULES), then the rules relating several; SettingError."""
    for key, (parent, name, _) in SAMPLER_FIELDS.items():
      rule = SAMPLER_RULES.get(key)
      v = getattr(self.cfg if parent else self, name)
      if rule is not None and not rule.ok(v):
        raise SettingError(rule.why.format(v=v), (key,), v)
    c = self.cfg
    if self.guidance == "resampling" and (not (is_int(c.s_c) and is_int(c.s_u)) or c.s_c < 0
                                          or c.s_u < 0 or c.s_c + c.s_u < 1):
      raise SettingError(f"candidate counts s_c={c.s_c}, s_u={c.s_u} must be integers >= 0 with "
                         "s_c + s_u >= 1", ("s_c", "s_u"), c.s_c)
    if self.af_guidance and self.inverse != "exact":
      raise SettingError(f"af_guidance={self.af_guidance} guides the exact AF inverse, but "
                         f"inverse={self.inverse!r}; use inverse=exact or af_guidance=0",
                         ("af_guidance", "inverse"), self.af_guidance)

  def check_model(self, m: "ModelConfig"):
    """What this sampler needs of the model; SettingError."""
    if m.prior == "standard_normal" and self.guidance != "none":
      raise SettingError(
          f"guidance={self.guidance!r} guides the AR prior's GMMs, but this model's prior is "
          "standard_normal (e.g. a converted TARFlow); use guidance=none (--cfg=0) and TARFlow's "
          "guidance af_guidance=W (--sampler=af_guidance=W)", ("guidance",), self.guidance)
    if self.af_guidance and not m.flow_class_conditional and self.af_attn_temp == 1:
      raise SettingError(
          f"af_guidance={self.af_guidance} does nothing here: this model's AF is not class "
          "conditional, so its guided and weak branches are the same network; set af_attn_temp "
          "!= 1 (TARFlow's unconditional guidance, e.g. 0.8 or 1.3) or af_guidance=0",
          ("af_guidance",), self.af_guidance)

  @classmethod
  def from_config(cls, sc):
    """Sampler settings (``config.sample``, or the CLI's overrides; ConfigDict or dict) ->
    checked SamplerConfig. Keys other than SAMPLER_KEYS (per_class, seed) are ignored; missing
    ones take the defaults. SettingError naming the setting."""
    sc = dict(sc)
    top, sub = {}, {}
    for key, (parent, name, typ) in SAMPLER_FIELDS.items():
      if key in sc:
        (sub if parent else top)[name] = _sampler_value(key, sc[key], typ)
    s = cls(cfg=ResamplingCFG(**sub), **top)
    s.check()
    return s

  def settings(self):
    """{key: value} for every SAMPLER_KEYS key (flat, as in config.sample)."""
    return {k: getattr(self.cfg if parent else self, name)
            for k, (parent, name, _) in SAMPLER_FIELDS.items()}


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


def sampler_overrides(cfg=None, guidance=None, inverse=None, settings=None):
  """The config.sample overrides of a sampling request (`sample`'s and `fid`'s flags, the Python
  API's arguments): the guidance scale ``cfg``, ``guidance``, ``inverse`` when given, then
  ``settings`` ({SAMPLER_KEYS key: value}). A ``cfg`` given without ``guidance`` also sets it:
  resampling for cfg > 0, none for 0. Values are checked later (``SamplerConfig.from_config``); an
  unknown key is a SettingError here."""
  out = {}
  if cfg is not None:
    out["cfg"] = cfg
    if guidance is None:
      out["guidance"] = "resampling" if cfg > 0 else "none"
  if guidance is not None:
    out["guidance"] = guidance
  if inverse is not None:
    out["inverse"] = inverse
  for k, v in (settings or {}).items():
    if k not in SAMPLER_FIELDS:
      raise SettingError(f"{k}={v!r}: unknown sampler setting; known: {', '.join(SAMPLER_KEYS)}",
                         (k,), v)
    out[k] = v
  return out


def _finite_at_least(lo, text, lo_open=False):
  """A finite number >= lo (> lo with lo_open); ``text`` is the SettingError template."""
  return rules.Rule(lambda v: is_real(v) and (v > lo if lo_open else v >= lo), text)


# The rule of each sampler setting that has one; the why is the whole text, ``{v}`` the value.
SAMPLER_RULES = {
    "guidance": rules.Rule(lambda v: v in GUIDANCE_MODES,
                           f"guidance={{v!r}} is unknown; use one of {GUIDANCE_MODES}"),
    "decode_dtype": rules.Rule(lambda v: v in DTYPE_NAMES,
                               f"decode_dtype={{v!r}} is unknown; use one of {DTYPE_NAMES}"),
    "cfg": rules.Rule(lambda v: v >= 0 and math.isfinite(v),
                      "cfg={v} must be a finite number >= 0 (0 = no guidance strength)"),
    **{t: rules.Rule(lambda v: v > 0 and math.isfinite(v),
                     f"temperature {t}={{v}} must be a finite number > 0")
       for t in ("t_pi", "t_sigma", "t_pi_v", "t_sigma_v", "t_s")},
    "redundant_pool": rules.Rule(
        lambda v: v in REDUNDANT_POOLS,
        f"redundant_pool={{v!r}} is unknown; use one of {REDUNDANT_POOLS}"),
    "redundant_candidates": rules.Rule(
        lambda v: is_int(v) and v >= 1, "redundant_candidates={v} must be an integer >= 1 "
        "(candidates per group in each redundant pool)"),
    "redundant_var_scale": rules.Rule(lambda v: v >= 0 and math.isfinite(v),
                                      "redundant_var_scale={v} must be a finite number >= 0"),
    "naive_proposals": rules.Rule(lambda v: is_int(v) and v >= 1,
                                  "naive_proposals={v} must be an integer >= 1"),
    "inverse": rules.Rule(lambda v: v in INVERSES,
                          f"inverse={{v!r}} is unknown; use one of {INVERSES}"),
    "jacobi_tol": rules.Rule(lambda v: v >= 0 and math.isfinite(v),
                             "jacobi_tol={v} must be a finite number >= 0 (0 = until exact)"),
    "jacobi_max_iters": rules.Rule(lambda v: is_int(v) and v >= 0,
                                   "jacobi_max_iters={v} must be an integer >= 0 (0 = N - 1, the "
                                   "exact inverse)"),
    "af_guidance": _finite_at_least(0, "af_guidance={v} must be a finite number >= 0 (0 = off)"),
    "af_guide_what": rules.Rule(lambda v: v in AF_GUIDE_WHAT,
                                f"af_guide_what={{v!r}} is unknown; use one of {AF_GUIDE_WHAT}"),
    "af_attn_temp": _finite_at_least(0, "af_attn_temp={v} must be a finite number > 0 (1 = plain "
                                     "attention)", lo_open=True),
    "denoise_sigma": _finite_at_least(0, "denoise_sigma={v} must be a finite number >= 0 (the "
                                      "training noise std; 0 = no denoising step)"),
}


def _sampler_value(key, v, typ):
  """A setting's value as its field's type: bools from true/false/1/0, integers from integral
  numbers; SettingError naming the key otherwise."""
  if typ is bool:
    if isinstance(v, str) and v.lower() in ("true", "false"):
      return v.lower() == "true"
    if not (rules.is_bool(v) or (is_int(v) and v in (0, 1))):
      raise SettingError(f"{key}={v!r} must be true or false", (key,), v)
    return bool(v)
  if typ is int:
    if not (is_real(v) and v == int(v)):
      raise SettingError(f"{key}={v!r} must be an integer", (key,), v)
    return int(v)
  try:
    return typ(v)
  except ValueError as e:
    raise SettingError(str(e), (), v) from None


@dataclasses.dataclass(frozen=True)
class SampleConfig(Section):
  """``config.sample``: the sample grid a training run writes (``per_class`` samples of every
  class, ``seed``, ``batch_size`` at once; ``periodic_classes`` of them at every periodic eval)
  and how to sample it: the SAMPLER_KEYS, flat, parsed
  into ``sampler``."""
  SECTION = "sample"
  per_class: int = _field(8, ("int", 1, None, "e.g. --config.sample.per_class=8"))
  seed: int = _field(0, ("int", 0, None, "e.g. --config.sample.seed=0"))
  # samples drawn at once (the global batch, split over the mesh's data-parallel slots): bounds
  # the grid's device memory however many classes the model has
  batch_size: int = _field(256, ("int", 1, None, "e.g. --config.sample.batch_size=256"))
  # the grid drawn at every periodic eval (config.eval.every) into WORKDIR/samples/step_N.png and
  # TensorBoard: this many classes (rows), spread evenly over the model's, per_class samples each,
  # with this section's seed and sampler (0 = none). A model of at most this many classes draws
  # the final grid's samples, sharing its compiled sampler.
  periodic_classes: int = _field(10, ("int", 0, "an integer >= 0 (0 = no grid at the periodic "
                                      "evals)", "e.g. --config.sample.periodic_classes=10"))
  sampler: SamplerConfig = dataclasses.field(default=SamplerConfig(), metadata={"derived": True})

  @classmethod
  def from_section(cls, s, extra=(), **given):
    out = super().from_section(s, extra=tuple(extra) + SAMPLER_KEYS, **given)
    settings = {k: v for k, v in s.items() if k in SAMPLER_KEYS}
    try:
      sampler = SamplerConfig.from_config(settings)
    except SettingError as e:
      if not e.names:
        raise ConfigError(f"config.sample is invalid: {e}. Fix: correct config.sample") from None
      raise e.in_section(settings) from None
    return dataclasses.replace(out, sampler=sampler)
