"""The one atomic file write (storage.atomic_file) and the one atomic directory replacement
(storage.staged_dir): a reader sees the old or the complete new file/folder, nothing planted at a
temporary name is followed, and a failure at any point leaves what was there and no temporary."""

import itertools
import os
import secrets

import numpy as np
import pytest

from farmer_jax.artifacts import storage


def _names(d):
  return sorted(os.listdir(d))


def test_atomic_file_replaces_only_on_success_and_leaves_no_temporary(tmp_path):
  p = tmp_path / "a.json"
  p.write_text("old")
  with pytest.raises(RuntimeError, match="half-way"):
    with storage.atomic_file(p, "w") as f:
      f.write("new, but ")
      raise RuntimeError("half-way")
  assert p.read_text() == "old" and _names(tmp_path) == ["a.json"]
  with storage.atomic_file(p, "w") as f:
    f.write("new")
  assert p.read_text() == "new" and _names(tmp_path) == ["a.json"]


def test_atomic_file_never_follows_a_planted_link(tmp_path, monkeypatch):
  """A symbolic link planted at the temporary name the writer picks is neither followed nor
  replaced (the next random name is used), and a link at the target itself is replaced, not
  written through."""
  victim = tmp_path / "victim"
  victim.write_text("precious")
  names = itertools.chain(["aaaa"], (f"n{i}" for i in itertools.count()))
  monkeypatch.setattr(secrets, "token_hex", lambda n: next(names))
  os.symlink(victim, tmp_path / ".out.bin.aaaa.tmp")
  with storage.atomic_file(tmp_path / "out.bin") as f:
    f.write(b"data")
  assert victim.read_text() == "precious"
  assert os.readlink(tmp_path / ".out.bin.aaaa.tmp") == str(victim)
  assert (tmp_path / "out.bin").read_bytes() == b"data"
  os.symlink(victim, tmp_path / "link")
  storage.write_bytes(tmp_path / "link", b"new")
  assert victim.read_text() == "precious" and not os.path.islink(tmp_path / "link")


def test_convert_npz_writer_does_not_overwrite_through_a_planted_link(tmp_path):
  """`convert --to=tarflow --out=X.npz` once wrote to the predictable X.npz.tmp-PID.npz, opened by
  path: a link planted there had its target overwritten."""
  from farmer_jax.interop.convert import _save_npz
  victim = tmp_path / "victim"
  victim.write_text("precious")
  out = tmp_path / "model.npz"
  os.symlink(victim, f"{out}.tmp-{os.getpid()}.npz")
  _save_npz(str(out), {"w": np.arange(3.0)})
  assert victim.read_text() == "precious"
  np.testing.assert_array_equal(np.load(out)["w"], np.arange(3.0))


def _replace(out, fill, may_replace=lambda o: None):
  with storage.staged_dir(out, may_replace) as tmp:
    fill(tmp)


def test_staged_dir_replaces_only_when_complete_and_allowed(tmp_path, monkeypatch):
  out = tmp_path / "new" / "deeper" / "out"

  def write(text):
    return lambda d: open(os.path.join(d, "f"), "w").write(text)

  def broken(d):
    write("half")(d)
    raise RuntimeError("interrupted")

  with pytest.raises(RuntimeError):
    _replace(out, broken)
  assert not (tmp_path / "new").exists()          # the parent folders it made are gone again
  _replace(out, write("one"))
  assert (out / "f").read_text() == "one"
  with pytest.raises(RuntimeError):
    _replace(out, broken)
  assert (out / "f").read_text() == "one" and _names(out.parent) == ["out"]

  def refuse(o):
    raise ValueError(f"{o} changed")

  with pytest.raises(ValueError, match="changed"):
    _replace(out, write("two"), refuse)
  assert (out / "f").read_text() == "one" and _names(out.parent) == ["out"]
  # interrupted between the two renames (the old one aside, the new one not yet in): put back
  real_rename, calls = os.rename, []

  def rename(a, b):
    calls.append((a, b))
    if len(calls) == 2:
      raise KeyboardInterrupt
    real_rename(a, b)

  monkeypatch.setattr(os, "rename", rename)
  with pytest.raises(KeyboardInterrupt):
    _replace(out, write("two"))
  monkeypatch.setattr(os, "rename", real_rename)
  assert (out / "f").read_text() == "one" and _names(out.parent) == ["out"]
  _replace(out, write("two"))
  assert (out / "f").read_text() == "two" and _names(out.parent) == ["out"]
  # something recreated `out` between the two renames: the old directory is kept aside, not lost

  def racing(a, b):
    if ".tmp-" in os.path.basename(a):
      os.mkdir(b)
      (out / "g").write_text("theirs")
    real_rename(a, b)

  monkeypatch.setattr(os, "rename", racing)
  with pytest.raises(OSError):
    _replace(out, write("three"))
  monkeypatch.setattr(os, "rename", real_rename)
  assert (out / "g").read_text() == "theirs"
  (aside,) = [n for n in _names(out.parent) if n != "out"]
  assert (out.parent / aside / "f").read_text() == "two"
