"""The wheel `pip install .` builds: it carries the shipped configs and MNIST-5k, and an install of
it (unpacked, outside the checkout) finds them by name. Built offline (--no-index --no-deps
--no-build-isolation) from a copy of the sources."""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME_DROPPED = ("mlxtend", "pandas", "scikit-learn", "matplotlib")


def _sha256(data):
  return hashlib.sha256(data).hexdigest()


@pytest.mark.slow
def test_the_wheel_ships_configs_and_mnist_and_runs_them_by_name(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, name), src / name)
  shutil.copytree(os.path.join(ROOT, "farmer_jax"), src / "farmer_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
                      "--no-build-isolation", "--disable-pip-version-check", "-q",
                      "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  (wheel,) = os.listdir(tmp_path / "dist")
  with zipfile.ZipFile(tmp_path / "dist" / wheel) as z:
    names = set(z.namelist())
    configs = sorted(n for n in names if re.fullmatch(r"farmer_jax/configs/\w+\.py", n))
    assert configs == ["farmer_jax/configs/__init__.py", "farmer_jax/configs/imagenet256.py",
                       "farmer_jax/configs/quickstart.py", "farmer_jax/configs/tarflow.py"]
    with open(os.path.join(ROOT, "farmer_jax", "data", "mnist5k.npz"), "rb") as f:
      assert _sha256(z.read("farmer_jax/data/mnist5k.npz")) == _sha256(f.read())
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = re.findall(r"^Requires-Dist: ([A-Za-z0-9_.-]+)", z.read(metadata).decode(), re.M)
    assert "jax" in requires and not set(RUNTIME_DROPPED) & set(requires), requires
    z.extractall(tmp_path / "site")
  # the unpacked wheel ahead of the checkout, run from a folder outside it
  run_dir = tmp_path / "elsewhere"
  run_dir.mkdir()
  code = (
      "import sys, farmer_jax\n"
      "from absl import flags\n"
      "from farmer_jax import configlib\n"
      "from farmer_jax.commands import common\n"
      "from farmer_jax.data.mnist import load_mnist5k\n"
      "argv = ['farmer_jax train', '--config=quickstart:tiny', '--config.train.steps=2']\n"
      "sys.argv = argv\n"
      "fv = flags.FlagValues()\n"
      "common.define_config(fv)\n"
      "fv(argv)\n"
      "x, y = load_mnist5k('train')\n"
      "print(farmer_jax.__file__, configlib.CONFIGS_DIR, configlib.available(),\n"
      "      fv.config.train.steps, fv.config.data.name, x.shape, int(y.sum()))\n")
  env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
  r = subprocess.run([sys.executable, "-c", code], cwd=run_dir, env=env, capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  site = str(tmp_path / "site")
  file, configs_dir, *rest = r.stdout.split(" ", 2)
  assert file.startswith(site) and configs_dir.startswith(site), r.stdout
  assert rest[0].strip() == ("['imagenet256', 'quickstart', 'tarflow'] 2 mnist5k "
                             "(4500, 32, 32, 1) 20250"), r.stdout
