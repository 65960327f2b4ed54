"""Config validation (clear errors naming the field, before any file is written) and paper-size
presets."""

import json
import os
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from farmer_jax import cli, configlib
from farmer_jax.config.parse import parse, parse_model
from farmer_jax.errors import ConfigError
from farmer_jax.model import abstract_params


DELETE = object()


def config_with(changes, base="tiny"):
  """The quickstart config with ``{'section.key': value}`` set (or deleted with DELETE), bypassing
  ConfigDict's type safety so that values a config FILE could hold (a float where an int belongs, a
  bool, a string) can be tried."""
  d = configlib.load("quickstart:" + base).to_dict()
  for field, value in changes.items():
    *path, key = field.split(".")
    node = d
    for p in path:
      node = node[p]
    if value is DELETE:
      del node[key]
    else:
      node[key] = value
  return ml_collections.ConfigDict(d)


NAN, INF = float("nan"), float("inf")
# (field, value, pattern the message must match, also check that `farmer_jax train` writes nothing)
BAD_CONFIGS = [
    # model
    ("model.patch_size", 5, r"model.patch_size=5.*does not divide data.image_size=32", True),
    ("model.d_informative", 17, r"model.d_informative=17.*d_I must satisfy", False),
    ("model.class_repeats", 0, r"model.class_repeats=0", False),
    ("model.dimred", "pca", r"model.dimred='pca'.*unknown", False),
    ("model.flow_heads", 3, r"model.flow_heads=3.*does not divide", False),
    ("model.ar_order", "reversed",
     r"model.ar_order='reversed'.*unknown AR prior direction.*'alternate'", False),
    ("model.remat", "yes", r"config.model.remat='yes'.*True or False", False),
    ("model.attention", "cudnn",
     r"config.model.attention='cudnn' is invalid: cuDNN's fused attention takes bf16/fp16 inputs "
     r"only, and model.dtype='float32'.*Fix: set --config.model.dtype=bfloat16", True),
    # data: a dataset load_split knows, with its channels, size and class count
    ("data.name", "imagenet2012",
     r"config.data.name='imagenet2012'.*unknown dataset \(did you mean tfds:imagenet2012\?\)",
     True),
    ("data.name", "folder:/photos",
     r"config.data.name='folder:/photos'.*farmer_jax prepare --folder=/photos --data_dir=DIR",
     False),
    ("data.name", 7, r"config.data.name=7.*must be a string", False),
    ("data.train_split", "val",
     r"config.data.train_split='val'.*mnist5k has the splits \['train', 'test'\]",
     False),
    ("data.resize", "crop", r"config.data.resize='crop'.*must be one of \['none', 'center_crop'\]",
     False),
    ("data.random_flip", "yes", r"config.data.random_flip='yes'.*True or False", False),
    ("data.worker_count", -1, r"config.data.worker_count=-1.*integer >= 0", False),
    ("data.prefetch", 0, r"config.data.prefetch=0.*integer >= 1", False),
    ("data.shuffle", True, r"config.data has unknown field\(s\) \['shuffle'\]", False),
    ("data.channels", 3, r"config.data.channels=3.*mnist5k has 1 channel.*channels=1", False),
    ("data.image_size", 24, r"config.data.image_size=24.*28x28.*Fix: use 28 or more", False),
    ("data.image_size", 31, r"config.data.image_size=31.*padded evenly", False),
    ("data.num_classes", 5, r"config.data.num_classes=5.*mnist5k has 10 classes.*num_classes=10",
     False),
    # train: every field of configlib.base_train()
    ("train.steps", 0, r"config.train.steps=0.*integer >= 1", False),
    ("train.steps", 2.5, r"config.train.steps=2.5.*integer >= 1", False),
    ("train.steps", 1e4, r"config.train.steps=10000.0.*integer", False),
    ("train.steps", True, r"config.train.steps=True.*integer", False),
    ("train.batch_size", 0, r"config.train.batch_size=0.*integer >= 1", False),
    ("train.batch_size", 5000, r"config.train.batch_size=5000.*exceeds the 4500 training images",
     False),
    ("train.warmup_steps", -1, r"config.train.warmup_steps=-1.*integer >= 0", False),
    ("train.log_every", 0, r"config.train.log_every=0.*integer >= 1", True),
    ("train.lr", 0.0, r"config.train.lr=0.0.*> 0", False),
    ("train.lr", NAN, r"config.train.lr=nan.*finite", False),
    ("train.lr", INF, r"config.train.lr=inf.*finite", False),
    ("train.min_lr", -1e-6, r"config.train.min_lr=-1e-06.*>= 0", False),
    ("train.min_lr", 1.0, r"config.train.min_lr=1.0.*exceeds train.lr=0.003", False),
    ("train.b1", 1.0, r"config.train.b1=1.0.*\[0, 1\)", False),
    ("train.b2", -0.1, r"config.train.b2=-0.1.*\[0, 1\)", False),
    ("train.weight_decay", -0.1, r"config.train.weight_decay=-0.1.*>= 0", False),
    ("train.grad_clip", -1.0, r"config.train.grad_clip=-1.0.*>= 0", False),
    ("train.ema_decay", 1.0, r"config.train.ema_decay=1.0.*\[0, 1\).*freeze", False),
    ("train.ema_decay", -0.5, r"config.train.ema_decay=-0.5", False),
    ("train.noise_kind", "poisson", r"train.noise_kind='poisson'", False),
    ("train.noise_max", -0.1, r"train.noise_max=-0.1.*>= 0", False),
    ("train.noise_max", NAN, r"train.noise_max=nan.*finite", False),
    ("train.noise_min", -1.0, r"train.noise_min=-1.0", False),
    ("train.noise_min", 0.5, r"train.noise_min=0.5.*exceeds train.noise_max=0.1", False),
    ("train.noise_steps", 0, r"config.train.noise_steps=0.*-1", False),
    ("train.noise_steps", 2.5, r"config.train.noise_steps=2.5", False),
    ("train.label_drop", 1.0, r"config.train.label_drop=1.0.*\[0, 1\)", False),
    ("train.seed", -1, r"config.train.seed=-1.*>= 0", False),
    ("train.seed", 0.5, r"config.train.seed=0.5.*integer", False),
    ("train.ckpt_every", -1, r"config.train.ckpt_every=-1.*>= 0", False),
    ("train.ckpt_keep", 0, r"config.train.ckpt_keep=0.*integer >= 1", True),
    ("train.ckpt_keep_period", -1, r"config.train.ckpt_keep_period=-1.*>= 0", False),
    ("train.stepz", 10,
     r"config.train has unknown field\(s\) \['stepz'\]; known fields: \[.*'steps'", False),
    ("train.ckpt_keep", DELETE, r"config.train lacks field\(s\) \['ckpt_keep'\].*base_train",
     False),
    # eval
    ("eval.batch_size", 0, r"config.eval.batch_size=0.*integer >= 1", False),
    ("eval.split", "validation",
     r"config.eval.split='validation'.*mnist5k has the splits \['train', 'test'\]", False),
    # sample: keys, per_class/seed, and the sampler settings (SamplerConfig's errors, naming
    # the key)
    ("sample.per_class", 0, r"config.sample.per_class=0.*integer >= 1", False),
    ("sample.seed", 1.5, r"config.sample.seed=1.5.*integer", False),
    ("sample.cfg", NAN, r"config.sample.cfg=nan.*finite number >= 0", False),
    ("sample.s_c", 2.5, r"config.sample.s_c=2.5.*must be an integer", False),
    ("sample.t_sigma", 0.0,
     r"config.sample.t_sigma=0.0.*temperature t_sigma=0.0 must be a finite number > 0", False),
    ("sample.guidance", "magic", r"config.sample.guidance='magic'.*unknown", False),
    ("sample.temperature", 1.0, r"config.sample has unknown field\(s\) \['temperature'\]", False),
    ("sample.inverse", "student",
     r"config.sample.inverse='student'.*carries no distilled student.*inverse=exact or jacobi",
     False),
    # mesh and sharding on this machine's devices
    ("mesh", (("data", -1), ("fsdp", -1)), r"config.mesh=.*at most one axis may be -1", False),
    ("mesh", (("data", 0), ("fsdp", 1)), r"config.mesh=.*axis 'data' has size 0", False),
    ("mesh", "data", r"config.mesh='data'.*sequence of \(axis name, size\) pairs", False),
    ("fsdp.axis", "model", r"config.fsdp.axis='model'.*not an axis of config.mesh", False),
    ("sharding_rules", (("batch", ("data", "dp")),), r"config.sharding_rules=.*mesh axis 'dp'",
     False),
]


def train_command(config, workdir):
  """`farmer_jax train --workdir=WORKDIR` (commands/train.py main) on an in-memory config."""
  from farmer_jax import cli
  from farmer_jax.commands import train
  flags = cli.flag_values("train")
  flags(["farmer_jax train", f"--workdir={workdir}", "--quiet"])
  flags["config"].value = config
  train.main(flags)


@pytest.mark.parametrize(
    "field,value,pattern,trainer",
    BAD_CONFIGS,
    ids=[f"{f}={v!r}" if v is not DELETE else f"{f}:deleted" for f, v, _, _ in BAD_CONFIGS])
def test_bad_config_raises_naming_field(tmp_path, field, value, pattern, trainer):
  c = config_with({field: value})
  with pytest.raises(ConfigError, match=pattern):
    parse(c)
  if trainer:  # a few representative cases through the train command: refused before any write
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=pattern):
      train_command(c, str(workdir))
    assert not workdir.exists(), "nothing may be written for an invalid config"
    assert not os.listdir(tmp_path)


def test_good_configs_pass():
  """Controls for the table above: the shipped quickstart configs, an unconditional model,
  integer-valued floats where floats belong, and the validation functions return the model config
  without touching anything."""
  for size in ("tiny", "base"):
    assert parse(configlib.load("quickstart:" + size)).model.num_classes == 10
  assert parse(config_with({"data.num_classes": 0, "train.lr": 1, "train.ema_decay": 0.999,
                               "train.noise_steps": 50, "sample.s_c": 5.0})).model.num_classes == 0
  m = parse_model(configlib.load("imagenet256:1.1B/16"))   # model only: no data needed
  assert m.num_classes == 1000
  with pytest.raises(ConfigError, match="config.data.name='tfds:imagenet2012'.*not prepared"):
    parse(configlib.load("imagenet256:1.1B/16"))


@pytest.mark.parametrize("changes,devices,processes,pattern", [
    ({
        "mesh": (("data", 3), ("fsdp", 1))
    }, 8, 1, r"config.mesh=.*multiply to 3, which does not divide the 8 devices"),
    ({
        "mesh": (("data", 2), ("fsdp", 2))
    }, 8, 1, r"config.mesh=.*has 4 slots for 8 devices"),
    ({
        "train.batch_size": 12
    }, 8, 1, r"config.train.batch_size=12.*\('data', 'fsdp'\) = 8 data-parallel slots.*"
     r"multiple of 8"),
    ({
        "mesh": (("data", 4), ("fsdp", 2)),
        "train.batch_size": 20
    }, 8, 1, r"batch_size=20.*8 data-parallel slots"),
    ({
        "mesh": (("data", 4), ("fsdp", 2)),
        "sharding_rules": (("batch", "data"),),
        "train.batch_size": 6
    }, 8, 1, r"batch_size=6.*\('data',\) = 4 data-parallel slots"),
    ({
        "train.batch_size": 30
    }, 2, 4, r"config.train.batch_size=30.*4 processes"),
])
def test_mesh_and_batch_against_devices(changes, devices, processes, pattern):
  c = config_with(changes)
  with pytest.raises(ConfigError, match=pattern):
    parse(c, num_devices=devices, num_processes=processes)


def test_mesh_and_batch_controls():
  """The same checks accept what sharding.make_mesh and the loader accept."""
  from farmer_jax.sharding import mesh_shape
  assert mesh_shape((("data", -1), ("fsdp", 1)), 8) == (("data", "fsdp"), (8, 1))
  assert mesh_shape([["data", 4], ["fsdp", -1]],
                    8) == (("data", "fsdp"), (4, 2))  # as saved in JSON
  parse(config_with({"mesh": (("data", 4), ("fsdp", 2)), "train.batch_size": 16}), num_devices=8,
           num_processes=2)
  parse(config_with({"sharding_rules": (("batch", "data"),), "mesh": (("data", 2), ("fsdp", 4)),
                        "train.batch_size": 6}), num_devices=8, num_processes=2)


def test_workdir_checks_create_nothing(tmp_path):
  c = configlib.load("quickstart:tiny")
  afile = tmp_path / "file"
  afile.write_text("x")
  with pytest.raises(ConfigError, match=rf"--workdir={afile} is invalid: it is an existing file"):
    parse(c, str(afile))
  with pytest.raises(ConfigError, match=rf"--workdir={afile}/run is invalid: {afile} is a file"):
    parse(c, str(afile / "run"))
  parse(c, str(tmp_path / "new" / "deeper" /
                  "run"))  # creatable: fine, and not created by the check
  parse(c, str(tmp_path))  # an existing directory (a run to resume): fine
  assert sorted(os.listdir(tmp_path)) == ["file"]
  if os.geteuid() != 0:                                       # root may write anywhere
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
      with pytest.raises(
          ConfigError, match=rf"--workdir={locked}/run is invalid: .*{locked} is not writable"):
        parse(c, str(locked / "run"))
      with pytest.raises(
          ConfigError, match=rf"--workdir={locked} is invalid: the directory is not writable"):
        parse(c, str(locked))
    finally:
      locked.chmod(0o700)


def test_labels_outside_num_classes_are_an_error(monkeypatch):
  """Out-of-range labels in the data are refused at load time with the count, the range found and
  config.data.num_classes; never mapped to the null class. num_classes=0 (unconditional) makes every
  label null."""
  import dataclasses
  from farmer_jax.config.schema import DataConfig
  from farmer_jax.data import mnist, sources
  images = np.zeros((6, 32, 32, 1), np.uint8)
  monkeypatch.setattr(mnist, "load_mnist5k", lambda split, pad_to:
                      (images, np.array([0, 3, 9, 10, 12, -1])))
  data = DataConfig.from_section(config_with({}).data)
  with pytest.raises(
      ConfigError,
      match=r"3 of 6 labels in mnist5k split 'train' lie outside \[0, 10\) \(labels "
      r"found: -1..12\) with config.data.num_classes=10"):
    sources.open_split(data, "train")
  labels = sources.open_split(dataclasses.replace(data, num_classes=0), "train").labels
  assert labels.dtype == np.int32 and labels.tolist() == [0] * 6
  monkeypatch.setattr(mnist, "load_mnist5k", lambda split, pad_to:
                      (images, np.array([0, 3, 9, 9, 1, 2])))
  assert sources.open_split(data, "test").labels.tolist() == [0, 3, 9, 9, 1, 2]


def test_unknown_model_field():
  c = configlib.load("quickstart:tiny")
  c.model.unlock() if hasattr(c.model, "unlock") else None
  c.model["flow_depth"] = 3
  with pytest.raises(ConfigError, match="flow_depth"):
    parse(c)


def test_cli_reports_bad_config_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  r = subprocess.run([
      sys.executable, "-m", "farmer_jax", "train", "--config=quickstart:tiny",
      f"--workdir={workdir}", "--config.model.patch_size=3"
  ],
                     capture_output=True,
                     text=True,
                     timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("farmer_jax train: config.model.patch_size=3 is invalid"), r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert not workdir.exists()


# Paper Table 1 per model size, and the hyperparameters every preset shares (§3; mlp ratio 4 is our
# choice).
TABLE1 = {
    "1.1B": dict(af=828e6, ar=295e6, ar_layers=12, ar_width=768, af_blocks=28, af_layers=4,
                 af_width=768),
    "1.9B": dict(af=1.4e9, ar=498e6, ar_layers=24, ar_width=1024, af_blocks=32, af_layers=6,
                 af_width=768),
}
CLASSES, M, D_I, K_I, K_R = 1000, 64, 128, 64, 200
AR_MATCHES_TABLE1 = {"1.1B/16"
                    }  # see test_paper_presets_parameter_count's docstring for the other three


def _layer(c):
  """One pre-LN transformer layer of width c: 2 LayerNorms, fused q|k|v, out proj, MLP c -> 4c -> c;
  all biased."""
  return 2 * (2 * c) + (c * 3 * c + 3 * c) + (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c)


def _gmm_head(k, dim, c):
  """Linear head c -> K(1 + 2 D) (logits, means, scales) with bias."""
  return k * (1 + 2 * dim) * (c + 1)


def closed_form_counts(preset, final_norm=False):
  """(AF, AR) parameter counts from Table 1's hyperparameters, written out independently of the
  model code."""
  size, patch = preset.split("/")
  t, p = TABLE1[size], int(patch)
  n, d = (256 // p) ** 2, p * p * 3
  c = t["af_width"]
  af_block = (d * c + c) + n * c + t["af_layers"] * _layer(c) + (c * 2 * d + 2 * d
                                                                )  # proj_in, pos, trunk, proj_out
  af_block += 2 * c if final_norm else 0  # LayerNorm before proj_out (model.flow_final_norm)
  c = t["ar_width"]
  ar = ((CLASSES + 1) * c + M * c + (M + n) * c +
        (D_I * c + c)  # class (+null), repeat, pos, token_in
        + t["ar_layers"] * _layer(c) + 2 * c  # trunk, final LayerNorm
        + _gmm_head(K_I, D_I, c) + _gmm_head(K_R, d - D_I, c)
       )  # informative and shared redundant heads
  return t["af_blocks"] * af_block, ar


@pytest.mark.parametrize("preset", ["1.1B/16", "1.1B/8", "1.9B/16", "1.9B/8"])
def test_paper_presets_parameter_count(preset):
  """AF and AR parameter counts of each preset, separately, against Table 1 (AF 828M / AR 295M for
  1.1B, AF 1.4B / AR 498M for 1.9B) within 5%, and always exactly against an independent closed-form
  count.

  All four AFs match Table 1. Only the 1.1B/16 AR can: the AR count is dominated by the linear
  redundant GMM head K_R(1 + 2 d_R)(C + 1). For 1.9B/16 that head alone is 200 * 1281 * 1025 =
  263M, which with the 24 x 1024 trunk (302M) gives 583M, not 498M; the paper does not say what
  differs. At patch 8, d_R = 192 - 128 = 64 makes the head small (200 * 129 * (C + 1)), so the AR is
  119M (1.1B/8) and 348M (1.9B/8), while Table 1 gives one AR count per model size (295M / 498M),
  apparently the patch-16 model's. These three are asserted to stay off Table 1 so that a change
  that makes them match must also update this test and the imagenet256 config's docstring.
  """
  size, patch = preset.split("/")
  m = parse_model(configlib.load("imagenet256:" + preset))
  shapes = abstract_params(m)
  count = lambda tree: sum(int(np.prod(s.shape)) for s in jax.tree.leaves(tree))
  af, ar = count(shapes["flow"]), count(shapes["prior"])
  print(f"{preset}: AF {af / 1e6:.1f}M, AR {ar / 1e6:.1f}M, total {(af + ar) / 1e9:.3f}B")
  assert sorted(shapes) == ["flow", "prior"]
  d = int(patch) ** 2 * 3
  assert (m.num_tokens, m.token_dim, m.d_i, m.d_r) == ((256 // int(patch)) ** 2, d, D_I, d - D_I)
  assert (af, ar) == closed_form_counts(preset, getattr(m, "flow_final_norm", False))
  t = TABLE1[size]
  assert abs(af - t["af"]
            ) / t["af"] <= 0.05, f"{preset}: AF {af / 1e6:.1f}M vs Table 1 {t['af'] / 1e6:.0f}M"
  ar_off = abs(ar - t["ar"]) / t["ar"]
  if preset in AR_MATCHES_TABLE1:
    assert ar_off <= 0.05, f"{preset}: AR {ar / 1e6:.1f}M vs Table 1 {t['ar'] / 1e6:.0f}M"
  else:
    assert ar_off > 0.05, (f"{preset}: AR {ar / 1e6:.1f}M now matches Table 1; "
                           "update AR_MATCHES_TABLE1 and the docs")


def test_table6_sampling_presets():
  from farmer_jax.config.schema import SamplerConfig
  expect = {
      "1.1B/16": (2.5, 0.9, 0.2, 0.9),
      "1.1B/8": (2.0, 1.0, 0.2, 0.9),
      "1.9B/16": (3.5, 0.9, 0.2, 0.9),
      "1.9B/8": (1.5, 1.0, 0.1, 1.0)
  }
  for preset, (w, t_sigma, t_pi_v, t_sigma_v) in expect.items():
    s = SamplerConfig.from_config(configlib.load("imagenet256:" + preset).sample)
    assert s.guidance == "resampling"
    assert (s.cfg.w, s.cfg.t_sigma, s.cfg.t_pi_v, s.cfg.t_sigma_v) == (w, t_sigma, t_pi_v,
                                                                       t_sigma_v)
    assert (s.cfg.t_pi, s.cfg.s_c, s.cfg.s_u, s.cfg.t_s) == (1.0, 5, 5, 1.1)


def test_saved_config_is_resolved():
  """config.json lists every model field (a later default change cannot change a saved model);
  implicit defaults are no diff; a field no section has (e.g. the removed model.final_flip) is
  refused like any unknown field."""
  import dataclasses
  from farmer_jax.config.parse import resolved_config
  from farmer_jax.config.resume import config_changes
  from farmer_jax.config.schema import ModelConfig
  c = configlib.load("quickstart:tiny")
  del c.model["flow_final_norm"]
  r = resolved_config(c)
  assert r.model.flow_final_norm is True and r.model.scale_floor == ModelConfig.scale_floor
  assert {f.name for f in dataclasses.fields(ModelConfig)} - set(r.model) == {
      "image_size", "channels", "num_classes"
  }
  assert config_changes(r, c) == []
  c.model["final_flip"] = True
  with pytest.raises(ConfigError, match=r"config.model has unknown field\(s\) \['final_flip'\]"):
    parse(c)


def test_the_data_shape_comes_from_config_data():
  """ModelConfig's image_size / channels / num_classes are config.data's, also when config.model
  holds a key of the same name."""
  c = configlib.load("quickstart:tiny")
  c.model["image_size"] = 64
  m = parse_model(c)
  assert (m.image_size, m.channels, m.num_classes) == (32, 1, 10)


def test_saved_config_file_does_not_depend_on_the_order_a_config_file_wrote(tmp_path):
  """config.json is the same bytes for the same settings, whatever order the config file set them
  in and whether it wrote a model field at its default or left it out (keys sorted), and reads
  back as the same config."""
  from farmer_jax.artifacts import runs
  from farmer_jax.config.parse import resolved_config
  c = configlib.load("quickstart:tiny")
  shuffled = ml_collections.ConfigDict()
  for name in reversed(list(c.keys())):
    sec = c[name]
    shuffled[name] = (ml_collections.ConfigDict({k: sec[k] for k in reversed(list(sec.keys()))})
                      if isinstance(sec, ml_collections.ConfigDict) else sec)
  del shuffled.model["prior"], shuffled.model["pixels"]   # left at their defaults
  assert (c.model.prior, c.model.pixels) == ("ar", "farmer")
  for name, cfg in (("a", c), ("b", shuffled)):
    os.makedirs(tmp_path / name)
    runs.write_saved_config(str(tmp_path / name), resolved_config(cfg))
  a, b = ((tmp_path / n / "config.json").read_bytes() for n in "ab")
  assert a == b
  assert runs.read_saved_config(str(tmp_path / "a")).to_dict() == json.loads(
      resolved_config(c).to_json_best_effort())


@pytest.mark.parametrize("spec", ["quickstart", "quickstart:tiny", "imagenet256",
                                  "imagenet256:1.9B/8", "tarflow:tiny", "tarflow:imagenet64"])
def test_every_model_field_is_settable(spec):
  """Every shipped config starts config.model from configlib.base_model, so it lists every
  ModelConfig field but the data shape, and ``--config.model.<any field>=...`` overrides it."""
  import dataclasses
  from farmer_jax.config.schema import DATA_SHAPE_FIELDS, ModelConfig
  c = configlib.load(spec)
  assert set(c.model) == {f.name for f in dataclasses.fields(ModelConfig)} - set(DATA_SHAPE_FIELDS)
  base = configlib.base_model(patch_size=8)
  assert base.patch_size == 8 and set(base) == set(c.model)


def test_an_override_of_a_field_a_config_file_does_not_write_is_taken(tmp_path):
  """`farmer_jax check --config=quickstart:tiny --config.model.prior=standard_normal`
  (quickstart writes no 'prior') parses, and the parsed model has that prior."""
  import dataclasses
  out = subprocess.run(
      [sys.executable, "-m", "farmer_jax", "check", "--config=quickstart:tiny",
       "--config.model.prior=standard_normal", f"--workdir={tmp_path / 'run'}"],
      capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("config OK:"), out.stdout
  c = configlib.load("quickstart:tiny")
  c.model.prior = "standard_normal"
  assert parse(c).model == dataclasses.replace(parse(configlib.load("quickstart:tiny")).model,
                                               prior="standard_normal")


def test_typed_sections_hold_the_defaults_and_configs_load_by_name():
  """TrainConfig / EvalConfig / SampleConfig / SamplerConfig are the one place for their section's
  fields and defaults: configlib.base_*() are their defaults, the sampler keys (config.sample,
  --sampler) are the sampler fields, and configlib.load gives a config by name (an unknown name
  lists the others)."""
  import dataclasses
  from farmer_jax.config.schema import (EvalConfig, ResamplingCFG, SAMPLER_KEYS, SampleConfig,
                                        SamplerConfig, TrainConfig)
  assert configlib.base_train().to_dict() == dataclasses.asdict(TrainConfig())
  assert configlib.base_eval().to_dict() == dataclasses.asdict(EvalConfig())
  assert EvalConfig.from_section(configlib.base_eval()) == EvalConfig()
  base_sample = configlib.base_sample()
  assert sorted(base_sample) == sorted(SAMPLER_KEYS + ("per_class", "seed", "batch_size",
                                                       "periodic_classes"))
  assert SampleConfig.from_section(base_sample) == SampleConfig()
  assert SampleConfig.from_section(base_sample).sampler == SamplerConfig()
  grid = SampleConfig.from_section(configlib.load("imagenet256:1.1B/16").sample)
  assert (grid.per_class, grid.sampler.cfg.w, grid.sampler.guidance) == (4, 2.5, "resampling")
  with pytest.raises(ConfigError, match=r"config.eval lacks field\(s\) \['split'\].*base_eval"):
    EvalConfig.from_section({k: v for k, v in configlib.base_eval().items() if k != "split"})
  with pytest.raises(ConfigError, match=r"config.eval.every=-1 .*integer >= 0"):
    EvalConfig.from_section(dict(configlib.base_eval(), every=-1))
  with pytest.raises(ConfigError, match=r"config.eval.dequant_samples=0"):
    EvalConfig.from_section(dict(configlib.base_eval(), dequant_samples=0))
  c = configlib.load("quickstart:tiny")
  t = TrainConfig.from_section(c.train)
  assert (t.steps, t.lr, t.get("ckpt_keep", 99), t.noise_anneal_steps) == (200, 3e-3, 2, 200)
  flat = ([f for f in SamplerConfig._fields if f != "cfg"]
          + ["cfg" if f == "w" else f for f in ResamplingCFG._fields])
  assert sorted(SAMPLER_KEYS) == sorted(flat)
  assert SamplerConfig.from_config({}) == SamplerConfig()
  s = SamplerConfig.from_config(configlib.load("imagenet256:1.9B/8").sample)
  assert (s.cfg.w, s.informative_pool, s.redundant_pool, s.redundant_pool_size) == (
      1.5, 10, "shared", 2 * 1024)   # patch 8: N = 1024 candidates per group
  assert configlib.module("imagenet256").SAMPLING["1.9B/8"]["cfg"] == 1.5
  assert configlib.load("quickstart").train.steps == 3000
  # distillation presets: the paper's 60 epochs on ImageNet; the quickstart's short run
  assert configlib.load("imagenet256:1.1B/16,distill=1").train.steps == 60 * 1_281_167 // 256
  assert configlib.load("quickstart:distill=1").train.steps == 1000
  with pytest.raises(ConfigError, match=r"unknown config 'quickstar'; available configs: "
                                        r"\['imagenet256', 'quickstart', 'tarflow'\]"):
    configlib.load("quickstar:tiny")


def test_config_flag_takes_a_shipped_name_from_anywhere_or_a_path(tmp_path, monkeypatch):
  """--config=NAME[:arg] is the shipped farmer_jax/configs/NAME.py, whatever the working
  directory; anything else is a path, as config_flags reads it (a user's own config)."""
  from absl import flags
  from farmer_jax.commands import common
  shipped = os.path.join(configlib.CONFIGS_DIR, "quickstart.py")
  assert configlib.resolve("quickstart") == shipped
  assert configlib.resolve("quickstart:tiny,distill=1") == shipped + ":tiny,distill=1"
  for spec in ("quickstart.py:tiny", "my/quickstart:tiny", "quickstrt:tiny", "/a/b.py"):
    assert configlib.resolve(spec) == spec
  (tmp_path / "mine.py").write_text(
      "from farmer_jax import configlib\n"
      "def get_config(arg):\n"
      "  c = configlib.load('quickstart:' + arg)\n"
      "  c.train.lr = 0.5\n"
      "  return c\n")
  monkeypatch.chdir(tmp_path)
  for spec, lr in (("quickstart:tiny", 3e-3), ("mine.py:tiny", 0.5)):
    argv = ["farmer_jax train", f"--config={spec}", "--config.train.steps=2"]
    monkeypatch.setattr(sys, "argv", argv)   # config_flags reads the overrides from sys.argv
    fv = flags.FlagValues()
    common.define_config(fv)
    fv(argv)
    want = configlib.load("quickstart:tiny")
    want.train.update(steps=2, lr=lr)
    assert fv.config.to_dict() == want.to_dict(), spec


def test_the_gpu_overlay_selects_cudnn_attention_in_bf16(tmp_path, capsys):
  """``imagenet256:PRESET,gpu`` (a bool arg alone means true) is the preset with cuDNN's
  fused attention in bf16 and nothing else changed: an execution choice a run resumes across.
  configlib.gpu on the fp32 quickstart parses too, and `farmer_jax check` shows the choice."""
  from farmer_jax.commands import check
  from farmer_jax.config.resume import config_changes
  plain = configlib.load("imagenet256:1.1B/16")
  for spec in ("imagenet256:1.1B/16,gpu", "imagenet256:model=1.1B/16,gpu=true"):
    gpu = configlib.load(spec)
    m = parse_model(gpu)
    assert (m.attention, m.dtype) == ("cudnn", "bfloat16"), spec
    a, b = plain.to_dict(), gpu.to_dict()
    assert (a["model"].pop("attention"), b["model"].pop("attention")) == ("xla", "cudnn")
    assert a == b and config_changes(plain, gpu) == []
  assert parse_model(plain).attention == "xla"
  with pytest.raises(ValueError, match="config arg 'batch' must be key=value or a bool key alone"):
    configlib.load("imagenet256:1.1B/16,batch")
  fv = cli.flag_values("check")
  fv(["farmer_jax check", f"--workdir={tmp_path / 'run'}", "--devices=1"])
  fv["config"].value = configlib.gpu(configlib.load("quickstart:tiny"))
  capsys.readouterr()
  check.main(fv)
  out = capsys.readouterr().out
  assert out.startswith("config OK: 64 tokens of d=16 (compute bfloat16, attention cudnn), "), out
  assert not (tmp_path / "run").exists()


def test_imagenet256_dp_splits_the_mesh_into_data_parallel_fsdp_groups():
  """``imagenet256:PRESET,dp=N``: N data-parallel groups, FSDP inside each (what the compiled
  train step on v5p-64 favours, docs/performance.md); the default stays FSDP over every device."""
  from farmer_jax import sharding
  assert sharding.mesh_shape(configlib.load("imagenet256:1.1B/16").mesh, 32) == (
      ("data", "fsdp"), (1, 32))
  c = configlib.load("imagenet256:1.1B/16,dp=4")
  assert sharding.mesh_shape(c.mesh, 32) == (("data", "fsdp"), (4, 8))
  a, b = configlib.load("imagenet256:1.1B/16").to_dict(), c.to_dict()
  a.pop("mesh"), b.pop("mesh")
  assert a == b


@pytest.mark.parametrize("dp,message", [
    ("0", "imagenet256: dp=0 is not a number of data-parallel groups"),
    ("-2", "imagenet256: dp=-2 is not a number of data-parallel groups"),
    ("two", "config arg dp='two' must be of type int")])
def test_imagenet256_refuses_a_bad_dp(dp, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    configlib.load(f"imagenet256:1.1B/16,dp={dp}")
