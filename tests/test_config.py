"""Config validation (clear errors naming the field, before any file is written) and paper-size presets."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from farmer_jax.config import ConfigError, validate
from farmer_jax.model import abstract_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import imagenet256  # noqa: E402
import quickstart  # noqa: E402


@pytest.mark.parametrize("field,value,pattern", [
    ("model.patch_size", 5, r"model.patch_size=5.*does not divide data.image_size=32"),
    ("model.d_informative", 17, r"model.d_informative=17.*d_I must satisfy"),
    ("model.class_repeats", 0, r"model.class_repeats=0"),
    ("model.dimred", "pca", r"model.dimred='pca'.*unknown"),
    ("train.noise_max", -0.1, r"train.noise_max=-0.1.*>= 0"),
    ("train.noise_min", -1.0, r"train.noise_min=-1.0"),
    ("model.flow_heads", 3, r"model.flow_heads=3.*does not divide"),
    ("train.noise_kind", "poisson", r"train.noise_kind='poisson'"),
])
def test_bad_config_raises_naming_field(tmp_path, field, value, pattern):
  from farmer_jax.train.trainer import Trainer
  c = quickstart.get_config("tiny")
  section, key = field.split(".")
  c[section][key] = value
  with pytest.raises(ConfigError, match=pattern):
    validate(c)
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError):
    Trainer(c, str(workdir))
  assert not workdir.exists(), "nothing may be written for an invalid config"


def test_unknown_model_field():
  c = quickstart.get_config("tiny")
  c.model.unlock() if hasattr(c.model, "unlock") else None
  c.model["flow_depth"] = 3
  with pytest.raises(ConfigError, match="flow_depth"):
    validate(c)


def test_cli_reports_bad_config_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  r = subprocess.run([sys.executable, "-m", "farmer_jax", "train", f"--config={ROOT}/configs/quickstart.py:tiny",
                      f"--workdir={workdir}", "--config.model.patch_size=3"], capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "model.patch_size=3" in r.stderr
  assert not workdir.exists()


@pytest.mark.parametrize("preset,target", [("1.1B/16", 1.1e9), ("1.9B/16", 1.9e9)])
def test_paper_presets_parameter_count(preset, target):
  m = validate(imagenet256.get_config(preset))
  shapes = abstract_params(m)
  total = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  assert abs(total - target) / target <= 0.10, f"{preset}: {total / 1e9:.3f}B params"
  flow = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["flow"]))
  ar = total - flow
  assert m.num_tokens == 256 and m.token_dim == 768 and m.d_r == 640
  print(f"{preset}: total {total / 1e9:.3f}B (AF {flow / 1e6:.0f}M, AR {ar / 1e6:.0f}M)")


def test_patch8_presets_validate():
  for p in ("1.1B/8", "1.9B/8"):
    m = validate(imagenet256.get_config(p))
    assert (m.num_tokens, m.token_dim, m.d_i, m.d_r) == (1024, 192, 128, 64)


def test_table6_sampling_presets():
  from farmer_jax.sampling.sampler import sampler_from_config
  expect = {"1.1B/16": (2.5, 0.9, 0.2, 0.9), "1.1B/8": (2.0, 1.0, 0.2, 0.9), "1.9B/16": (3.5, 0.9, 0.2, 0.9),
            "1.9B/8": (1.5, 1.0, 0.1, 1.0)}
  for preset, (w, t_sigma, t_pi_v, t_sigma_v) in expect.items():
    s = sampler_from_config(imagenet256.get_config(preset).sample)
    assert s.guidance == "resampling"
    assert (s.cfg.w, s.cfg.t_sigma, s.cfg.t_pi_v, s.cfg.t_sigma_v) == (w, t_sigma, t_pi_v, t_sigma_v)
    assert (s.cfg.t_pi, s.cfg.s_c, s.cfg.s_u, s.cfg.t_s) == (1.0, 5, 5, 1.1)
