"""farmer_jax.interop.torch_checkpoint: reading torch.save files without torch. The format tests
write real torch.save files (zip and legacy) and compare with torch's own values (need torch);
the rest (npz, errors, refused pickles) run without torch. The save_state_dict tests write
without torch and read back with torch.load (need torch) and with load_state_dict. The crafted-file
tests (and those of farmer_jax.untrusted, the .npz / .npy reader) build each file in the test."""

import argparse
import collections
import contextlib
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest

from farmer_jax import untrusted
from farmer_jax.interop import torch_checkpoint
from farmer_jax.interop.torch_checkpoint import (CheckpointError, load_state_dict,
                                                 save_state_dict)
from farmer_jax.untrusted import UnreadableFileError, short_repr


@contextlib.contextmanager
def _bounded_memory(limit):
  """Asserts that the block's peak Python allocation (tracemalloc) stays under ``limit`` bytes."""
  tracemalloc.start()
  try:
    yield
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < limit, peak


def _torch_state_dict(torch):
  """Every dtype and layout a state_dict may hold, with torch's values as numpy arrays."""
  g = torch.Generator().manual_seed(0)
  big = torch.randn(6, 9, generator=g)
  sd = collections.OrderedDict(
      f32=torch.randn(3, 4, generator=g),
      f16=torch.randn(5, generator=g).half(),
      bf16=torch.randn(2, 3, generator=g).bfloat16(),
      i64=torch.arange(-3, 7),
      i32=torch.tensor([1, -2, 2 ** 31 - 1], dtype=torch.int32),
      u8=torch.tensor([0, 7, 255], dtype=torch.uint8),
      flag=torch.tensor([True, False, True]),
      transposed=torch.randn(4, 3, generator=g).t(),  # non-contiguous
      sliced=big[2:5, 3:7],  # storage offset + row stride, shares big's storage
      column=big[:, 1],
      big=big,
      scalar=torch.tensor(2.5),
      scalar_bf16=torch.tensor(-1.375, dtype=torch.bfloat16),
      count=torch.tensor(7),
      empty=torch.zeros(0, 4),
      param=torch.nn.Parameter(torch.randn(2, 2, generator=g)),
      expanded=torch.randn(3, 1, generator=g).expand(3, 5),  # stride 0
      neg_view=torch.randn(3, generator=g)._neg_view(),  # tensor metadata {'neg': True}
  )
  want = {k: (v.detach().float() if v.dtype == torch.bfloat16 else v.detach().resolve_neg())
          .numpy() for k, v in sd.items()}
  return sd, want


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_matches_torch(tmp_path, zip_format):
  torch = pytest.importorskip("torch")
  sd, want = _torch_state_dict(torch)
  path = tmp_path / "model.pth"
  torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
  got = load_state_dict(path)
  assert list(got) == list(sd)
  loaded = torch.load(path, weights_only=True)
  for k, v in got.items():
    assert isinstance(v, np.ndarray) and v.flags.c_contiguous and v.flags.writeable, k
    assert v.dtype == want[k].dtype and v.shape == want[k].shape, k
    np.testing.assert_array_equal(v, want[k], err_msg=k)
    ref = loaded[k].detach()
    ref = ref.float() if ref.dtype == torch.bfloat16 else ref.resolve_neg()
    np.testing.assert_array_equal(v, ref.numpy(), err_msg=k)
  assert got["scalar"].shape == () and got["scalar"] == 2.5
  assert got["bf16"].dtype == np.float32 and got["scalar_bf16"] == -1.375
  got["sliced"][:] = 0  # each tensor owns its memory
  assert np.array_equal(got["big"], want["big"])


def test_big_endian_zip(tmp_path):
  """A zip checkpoint whose byteorder record says 'big' is swapped to native order."""
  torch = pytest.importorskip("torch")
  w, i = torch.randn(2, 3), torch.arange(4)
  torch.save({"w": w, "i": i}, tmp_path / "le.pth")
  with zipfile.ZipFile(tmp_path / "le.pth") as src, \
       zipfile.ZipFile(tmp_path / "be.pth", "w") as dst:
    for name in src.namelist():
      data = src.read(name)
      if name.endswith("/byteorder"):
        data = b"big"
      elif name.endswith("/data/0"):
        data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
      elif name.endswith("/data/1"):
        data = np.frombuffer(data, "<i8").astype(">i8").tobytes()
      dst.writestr(name, data)
  got = load_state_dict(tmp_path / "be.pth")
  np.testing.assert_array_equal(got["w"], w.numpy())
  np.testing.assert_array_equal(got["i"], i.numpy())
  assert got["w"].dtype == np.float32 and got["w"].dtype.isnative


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_wrapped_checkpoint(tmp_path, zip_format):
  torch = pytest.importorskip("torch")
  path = tmp_path / "ckpt.pt"
  torch.save({"model": {"w": torch.ones(2)}, "ema": {"w": torch.zeros(2)}, "step": 12,
              "args": argparse.Namespace(lr=0.1)}, path,
             _use_new_zipfile_serialization=zip_format)
  with pytest.raises(CheckpointError, match="'argparse.Namespace'.*pass key="):
    load_state_dict(path)
  got = load_state_dict(path, key="ema")  # other globals: inert placeholders
  assert list(got) == ["w"] and np.array_equal(got["w"], np.zeros(2, np.float32))
  with pytest.raises(CheckpointError, match=r"no entry 'state_dict'.*'args', 'ema'"):
    load_state_dict(path, key="state_dict")
  with pytest.raises(CheckpointError, match="entry 'args' holds an unloaded argparse.Namespace"):
    load_state_dict(path, key="args")
  torch.save({"model": {"w": torch.ones(2)}, "step": 12}, path)
  with pytest.raises(CheckpointError, match=r"not tensors: 'model' .*'step' \(int 12\).*"
                     r"pass key= one of \['model'\]"):
    load_state_dict(path)


def test_npz_round_trip(tmp_path):
  arrays = {"conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
            "bn.num_batches_tracked": np.array(5, np.int64),
            "flag": np.array([True, False])}
  np.savez(tmp_path / "w.npz", **arrays)
  got = load_state_dict(tmp_path / "w.npz")
  assert list(got) == list(arrays)
  for k in arrays:
    assert got[k].dtype == arrays[k].dtype
    np.testing.assert_array_equal(got[k], arrays[k])
  np.savez(tmp_path / "wrapped.npz", **{"ema." + k: v for k, v in arrays.items()}, step=3)
  assert list(load_state_dict(tmp_path / "wrapped.npz", key="ema")) == list(arrays)
  np.savez(tmp_path / "objects.npz", o=np.array([{}], dtype=object))
  with pytest.raises(CheckpointError, match="objects.npz"):
    load_state_dict(tmp_path / "objects.npz")


def test_file_errors(tmp_path):
  with pytest.raises(CheckpointError, match="nope.pth' not found"):
    load_state_dict(tmp_path / "nope.pth")
  (tmp_path / "w.safetensors").write_bytes(b"{}")
  with pytest.raises(CheckpointError, match=r"unknown checkpoint extension '\.safetensors'"):
    load_state_dict(tmp_path / "w.safetensors")
  (tmp_path / "garbage.pth").write_bytes(np.random.default_rng(0).bytes(300))
  with pytest.raises(CheckpointError, match="garbage.pth: not a torch.save checkpoint"):
    load_state_dict(tmp_path / "garbage.pth")
  (tmp_path / "truncated.pth").write_bytes(pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2))
  with pytest.raises(CheckpointError, match="truncated.pth"):
    load_state_dict(tmp_path / "truncated.pth")
  (tmp_path / "wrong_magic.pth").write_bytes(pickle.dumps(12345, protocol=2))
  with pytest.raises(CheckpointError, match="wrong magic number"):
    load_state_dict(tmp_path / "wrong_magic.pth")
  with zipfile.ZipFile(tmp_path / "other.zip.pt", "w") as z:
    z.writestr("readme.txt", "hello")
  with pytest.raises(CheckpointError, match="without data.pkl"):
    load_state_dict(tmp_path / "other.zip.pt")


def _evil_pickle(marker):
  """A protocol-0 pickle that would run ``os.system('touch <marker>')`` when loaded."""
  return b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."


def _legacy_stream(obj_pickle, storage_keys=()):
  """The pickles of a legacy-format file (the storages' bytes follow them)."""
  head = b"".join(pickle.dumps(v, protocol=2) for v in (
      0x1950a86a20f9469cfc6c, 1001, {"protocol_version": 1001, "little_endian": True}))
  return head + obj_pickle + pickle.dumps(list(storage_keys), protocol=2)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_disallowed_class_is_refused_not_run(tmp_path, zip_format):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  if zip_format:
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("evil/data.pkl", _evil_pickle(marker))
      z.writestr("evil/byteorder", "little")
  else:
    path.write_bytes(_legacy_stream(_evil_pickle(marker)))
  with pytest.raises(CheckpointError, match=r"refusing to load the global '(os|posix)\.system'"):
    load_state_dict(path)
  # with key= unknown globals become inert placeholders: still nothing runs
  with pytest.raises(CheckpointError, match=r"(os|posix)\.system object, not a dict"):
    load_state_dict(path, key="model")
  assert not marker.exists()


def test_refuses_out_of_bounds_tensor(tmp_path):
  """A tensor whose size/stride reach past its storage is an error, not a read of stray memory
  (the pickle is written by hand: storage of 4 float32, a 3x3 view of it)."""
  tensor = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n("
            b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00"
            b"cpuK\x04tQK\x00K\x03K\x03\x86K\x03K\x01\x86\x89ccollections\nOrderedDict\n)Rt")
  data_pkl = tensor.replace(b"\x80\x02", b"\x80\x02}X\x01\x00\x00\x00w", 1) + b"Rs."
  with zipfile.ZipFile(tmp_path / "oob.pth", "w") as z:
    z.writestr("oob/data.pkl", data_pkl)
    z.writestr("oob/data/0", np.arange(4, dtype=np.float32).tobytes())
  with pytest.raises(CheckpointError, match="reads element 8 of a storage of 4"):
    load_state_dict(tmp_path / "oob.pth")


def test_hand_written_legacy_file(tmp_path):
  """The legacy layout written without torch: pickles, then the 8-byte count and raw bytes."""
  obj = (b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n("
         b"(X\x07\x00\x00\x00storagectorch\nHalfStorage\nX\x02\x00\x00\x0042X\x03\x00\x00\x00"
         b"cpuK\x06NtQK\x01K\x02K\x02\x86K\x01K\x02\x86\x89ccollections\nOrderedDict\n)RtRs.")
  values = np.arange(6, dtype=np.float16) / 4
  (tmp_path / "old.pt").write_bytes(
      _legacy_stream(obj, ["42"]) + np.int64(6).tobytes() + values.tobytes())
  got = load_state_dict(tmp_path / "old.pt")
  want = np.lib.stride_tricks.as_strided(values[1:], (2, 2), (2, 4))
  assert got["w"].dtype == np.float16
  np.testing.assert_array_equal(got["w"], want)


def _numpy_state_dict():
  """Every dtype save_state_dict writes (bar bfloat16), a 0-d, empty and non-contiguous array."""
  rng = np.random.default_rng(0)
  return collections.OrderedDict([
      ("layer.weight", rng.standard_normal((3, 4)).astype(np.float32)),
      ("f64", rng.standard_normal(5)),
      ("f16", np.array([1.5, -2.0, 65504.0], np.float16)),
      ("i64", np.array([-3, 2 ** 40, 7], np.int64)),
      ("i32", np.array([1, -2, 2 ** 31 - 1], np.int32)),
      ("i16", np.array([-5, 300], np.int16)),
      ("i8", np.array([-128, 127], np.int8)),
      ("u8", np.array([0, 7, 255], np.uint8)),
      ("flag", np.array([True, False, True])),
      ("c64", np.array([1 + 2j, -0.5j], np.complex64)),
      ("scalar", np.array(2.5, np.float32)),
      ("count", np.int64(7)),  # a numpy scalar: a 0-d tensor
      ("empty", np.zeros((2, 0, 3), np.float32)),
      ("transposed", rng.standard_normal((4, 6))[::2, ::-3].T),  # non-contiguous, negative
      ("big_endian", np.arange(4, dtype=">i4")),
      ("a", np.ones(1, np.float32)),  # not sorted: order is the mapping's
  ])


def _data_offsets(path):
  """{record name: offset of its data in the file} of a stored (uncompressed) zip."""
  offsets = {}
  with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
    for info in zf.infolist():
      f.seek(info.header_offset + 26)
      name_len, extra_len = np.frombuffer(f.read(4), "<u2")
      offsets[info.filename] = info.header_offset + 30 + int(name_len) + int(extra_len)
      assert info.compress_type == zipfile.ZIP_STORED, info.filename
  return offsets


def test_save_read_by_torch(tmp_path):
  torch = pytest.importorskip("torch")
  sd = _numpy_state_dict()
  path = tmp_path / "my.model.pth"
  save_state_dict(path, sd)
  for weights_only in (True, False):
    loaded = torch.load(path, weights_only=weights_only)
    assert type(loaded) is collections.OrderedDict and list(loaded) == list(sd)
    for k, want in sd.items():
      t = loaded[k]
      assert isinstance(t, torch.Tensor) and not t.requires_grad and t.is_contiguous(), k
      got = t.numpy()
      assert got.dtype == want.dtype.newbyteorder("=") and got.shape == np.shape(want), k
      np.testing.assert_array_equal(got, want, err_msg=k)
  assert loaded["empty"].stride() == torch.zeros(2, 0, 3).stride()
  offsets = _data_offsets(path)
  assert {n.split("/", 1)[0] for n in offsets} == {"my.model"}  # the archive: the file's stem
  assert all(offset % 64 == 0 for offset in offsets.values())
  with zipfile.ZipFile(path) as zf:
    assert zf.read("my.model/version") == b"3\n" and zf.read("my.model/byteorder") == b"little"
  save_state_dict(path, {})
  assert torch.load(path, weights_only=True) == collections.OrderedDict()


def test_save_bfloat16_read_by_torch(tmp_path):
  torch = pytest.importorskip("torch")
  ml_dtypes = pytest.importorskip("ml_dtypes")
  w = np.array([[1.5, -3.25], [0.0078125, 3e38]], ml_dtypes.bfloat16)
  save_state_dict(tmp_path / "bf16.pt", {"w": w})
  t = torch.load(tmp_path / "bf16.pt", weights_only=True)["w"]
  assert t.dtype == torch.bfloat16
  np.testing.assert_array_equal(t.float().numpy(), w.astype(np.float32))
  got = load_state_dict(tmp_path / "bf16.pt")["w"]  # widened to float32, exactly
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, w.astype(np.float32))


class _ArrayLike:
  """Not an ndarray, but converts to one (as jax arrays do)."""

  def __init__(self, array):
    self._array = array

  def __array__(self, dtype=None, copy=None):
    return self._array


def test_save_round_trip_without_torch(tmp_path):
  sd = _numpy_state_dict()
  sd["array_like"] = _ArrayLike(np.arange(6, dtype=np.int16).reshape(2, 3))
  path = tmp_path / "ckpt.ckpt"
  save_state_dict(path, sd)
  got = load_state_dict(path)
  assert list(got) == list(sd)
  for k, want in sd.items():
    want = np.asarray(want)
    assert got[k].dtype == want.dtype.newbyteorder("=") and got[k].shape == want.shape, k
    np.testing.assert_array_equal(got[k], want, err_msg=k)
  assert [p.name for p in tmp_path.iterdir()] == ["ckpt.ckpt"]  # no temporary file left
  before = path.read_bytes()
  save_state_dict(path, sd)  # overwrite; the same arrays give the same bytes
  assert path.read_bytes() == before


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
  good = {"w": np.ones(3, np.float32)}
  bad_values = [
      ({"w": np.ones(2), 3: np.ones(2)}, r"key 3 \(int\) is not a str.*str\(\)"),
      ({"w": np.ones(2), "obj": np.array([{}], dtype=object)},
       r"entry 'obj' has dtype object.*supported: float64.*\.astype"),
      ({"u16": np.ones(2, np.uint16)}, r"entry 'u16' has dtype uint16"),
      ({"lst": [1.0, 2.0]}, r"entry 'lst' is a list of 2 items, not an array.*np\.asarray"),
      ({"n": None}, r"entry 'n' is NoneType None, not an array"),
      ([np.ones(2)], r"the state_dict is a list of 1 items, expected a mapping"),
  ]
  new = tmp_path / "new.pth"
  existing = tmp_path / "existing.pth"
  save_state_dict(existing, good)
  before = existing.read_bytes()
  for bad, match in bad_values:
    for path in (new, existing):
      with pytest.raises(CheckpointError, match=f"{path.name}: {match}"):
        save_state_dict(path, bad)
  with pytest.raises(CheckpointError, match=r"new\.npz: .*np\.savez"):
    save_state_dict(tmp_path / "new.npz", good)
  with pytest.raises(CheckpointError, match="does not exist"):
    save_state_dict(tmp_path / "missing" / "new.pth", good)

  real_write = torch_checkpoint._write_record

  def failing_write(zf, f, name, data):  # the disk fills up after the first storage
    if name.endswith("/data/1"):
      raise OSError(28, "No space left on device")
    real_write(zf, f, name, data)

  monkeypatch.setattr(torch_checkpoint, "_write_record", failing_write)
  for path in (new, existing):
    with pytest.raises(OSError, match="No space left"):
      save_state_dict(path, {"a": np.ones(2), "b": np.ones(2)})
  assert [p.name for p in tmp_path.iterdir()] == ["existing.pth"]  # no new file, no temp file
  assert existing.read_bytes() == before
  np.testing.assert_array_equal(load_state_dict(existing)["w"], good["w"])


# ---------------------------------------------------------------------------------------------
# Crafted files: bounded time and memory, one clear error. Each file is a few hundred bytes to
# ~100 KB standing for GBs of data or a 2**60-node tree; the reader must refuse it before
# building that.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = torch_checkpoint


def _tensor_pickle(tensors, legacy=False):
  """data.pkl of {key: FloatStorage tensor}, written opcode by opcode; ``tensors``: key (str or
  int) -> (storage key, numel, offset, size, stride); size may be raw opcodes pushing it."""
  out = [b"\x80\x02", T._OP_ORDERED_DICT, b"("]
  for name, (key, numel, offset, size, stride) in tensors.items():
    pid = T._op_tuple(T._op_str("storage"), T._op_global("torch", "FloatStorage"),
                      T._op_str(key), T._op_str("cpu"), T._op_int(numel),
                      *([b"N"] if legacy else []))  # legacy: no storage view
    size = size if isinstance(size, bytes) else T._op_tuple(*map(T._op_int, size))
    args = T._op_tuple(pid + b"Q", T._op_int(offset), size,
                       T._op_tuple(*map(T._op_int, stride)), b"\x89", T._OP_ORDERED_DICT)
    out += [T._op_str(name) if isinstance(name, str) else T._op_int(name),
            T._op_global("torch._utils", "_rebuild_tensor_v2"), args, b"R"]
  return b"".join(out + [b"u."])


def _zip_checkpoint(path, data_pkl, storages, deflated=()):
  """A zip-format checkpoint: data.pkl and storages {key: bytes}, stored except keys in
  ``deflated``; returns path."""
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("c/data.pkl", data_pkl)
    z.writestr("c/byteorder", "little")
    for key, data in storages.items():
      method = zipfile.ZIP_DEFLATED if key in deflated else zipfile.ZIP_STORED
      z.writestr(f"c/data/{key}", data, compress_type=method)
  return path


def _deflated_zeros(z, name, nbytes):
  """Adds member ``name`` to the open zip ``z``: ``nbytes`` zeros, deflated (~1000x smaller)."""
  info = zipfile.ZipInfo(name)
  info.compress_type = zipfile.ZIP_DEFLATED
  with z.open(info, "w") as w:
    for _ in range(nbytes >> 20):
      w.write(bytes(1 << 20))


def _doubling_tuple(levels):
  """Opcodes pushing t_levels, t_0 = 0 and t_(i+1) = (t_i, t_i) through the memo: 7 bytes per
  level, 2**levels leaves when hashed or printed."""
  return b"K\x00" + b"q\x000h\x00h\x00\x86" * levels  # BINPUT 0, POP, BINGET 0 twice, TUPLE2


_LOAD = r'''
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a crafted size fails, not swaps
from farmer_jax.interop.torch_checkpoint import load_state_dict
out = []
for path in sys.argv[1:]:
  start = time.time()
  try:
    load_state_dict(path)
    out.append(["loaded", "", time.time() - start])
  except Exception as e:
    out.append([type(e).__name__, str(e), time.time() - start])
print(json.dumps(out))
'''


def _load_isolated(paths, timeout=30):
  """[(error type, message, seconds)] of load_state_dict on each path, in a subprocess with a
  timeout and 3 GB of address space (a hang or a huge allocation fails the test, not the run)."""
  env = dict(os.environ, OPENBLAS_NUM_THREADS="1",
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  r = subprocess.run([sys.executable, "-c", _LOAD, *map(str, paths)], capture_output=True,
                     text=True, timeout=timeout, env=env, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.splitlines()[-1])


def test_pickle_bombs_are_refused_quickly(tmp_path):
  bomb = _doubling_tuple(60)
  files = {
      # a 2**60-leaf tuple as a dict key: hashing it never ends
      "key": b"\x80\x02}" + bomb + b"K\x01s.",
      # ... as a tensor size: the error message's repr never ends
      "size": _tensor_pickle({"w": ("0", 4, 0, bomb, (1,))}),
      # a memo index of 2**31 - 1: the unpickler would allocate a 16 GB memo
      "memo": b"\x80\x02}r\xff\xff\xff\x7f.",
  }
  paths = [_zip_checkpoint(tmp_path / f"{k}.pth", v, {"0": bytes(16)}) for k, v in files.items()]
  got = dict(zip(files, _load_isolated(paths)))
  for k, match in (("key", "expand to .* objects through shared references"),
                   ("size", "expand to .* objects through shared references"),
                   ("memo", "memo index 2147483647 out of sequence")):
    kind, msg, seconds = got[k]
    assert kind == "CheckpointError" and re.search(match, msg), (k, got[k])
    assert msg.startswith(str(tmp_path / f"{k}.pth")) and "\n" not in msg and len(msg) < 400
    assert seconds < 5, (k, seconds)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_absurd_pickles_are_refused(tmp_path, monkeypatch, zip_format):
  def refused(data_pkl, match):
    path = tmp_path / "crafted.pth"
    if zip_format:
      _zip_checkpoint(path, data_pkl, {"0": bytes(16)})
    else:
      path.write_bytes(_legacy_stream(data_pkl, ["0"]) + np.int64(4).tobytes() + bytes(16))
    with pytest.raises(CheckpointError, match=match):
      load_state_dict(path)

  tensor = ("0", 4, 0, (4,), (1,))
  refused(_tensor_pickle({1: tensor}, legacy=not zip_format),
          r"has the key 1 \(int\); a state_dict's keys are str")
  deep = b"\x80\x02}X\x01\x00\x00\x00wK\x00" + b"\x85" * 1000 + b"s."  # {'w': ((((0,),),),...)}
  refused(deep, "nested more than 100 deep")
  monkeypatch.setattr(torch_checkpoint, "_MAX_OBJECTS", 1000)
  many = b"\x80\x02}X\x01\x00\x00\x00w](" + b"}" * 3000 + b"es."  # {'w': [{}, {}, ...]}
  refused(many, r"builds more than 1000 \+ 1 per 4 bytes objects")


def test_compressed_storage_is_refused_unread(tmp_path):
  """A deflated storage (torch.save stores every record) could inflate a thousandfold: refused
  before a byte of it is inflated, whatever size its tensor declares."""
  path = tmp_path / "deflated.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("c/data.pkl", _tensor_pickle({"w": ("0", 4, 0, (4,), (1,))}))
    _deflated_zeros(z, "c/data/0", 64 << 20)
  assert path.stat().st_size < 200_000
  with _bounded_memory(4 << 20):
    with pytest.raises(CheckpointError, match=r"member 'c/data/0' is compressed with deflate; "
                       r"expected stored"):
      load_state_dict(path)


def test_zero_strides_and_shared_storages_cannot_blow_up(tmp_path):
  """Views of one small storage (zero strides, many tensors on it) are each copied out: the arrays
  produced are bounded by 4x the file's size + 16 MiB, with an error naming the tensor."""
  one = _tensor_pickle({"w": ("0", 1, 0, (3000, 3000), (0, 0))})  # 36 MB from 4 bytes
  path = _zip_checkpoint(tmp_path / "stride0.pth", one, {"0": bytes(4)})
  with pytest.raises(CheckpointError, match=r"tensor 'w' of size \(3000, 3000\) would bring the "
                     r"arrays read to 36000000 bytes, more than 4 x the file's \d+ bytes"):
    load_state_dict(path)
  shared = _tensor_pickle({f"w{i}": ("0", 1000, 0, (1000, 1000), (0, 1)) for i in range(8)})
  path = _zip_checkpoint(tmp_path / "shared.pth", shared, {"0": bytes(4000)})
  with pytest.raises(CheckpointError, match=r"tensor 'w4' of size \(1000, 1000\) would bring the "
                     r"arrays read to 20000000 bytes"):
    load_state_dict(path)
  # the same layouts within the bound still load exactly
  small = _tensor_pickle({"a": ("0", 3, 0, (2, 3), (0, 1)), "b": ("0", 3, 1, (2,), (1,))})
  path = _zip_checkpoint(tmp_path / "ok.pth", small,
                         {"0": np.array([1, 2, 3], np.float32).tobytes()})
  got = load_state_dict(path)
  np.testing.assert_array_equal(got["a"], [[1, 2, 3], [1, 2, 3]])
  np.testing.assert_array_equal(got["b"], [2, 3])


def _patch_member(path, name, flag=None, method=None, flip_data=False):
  """Rewrites zip member ``name``'s flag bits / compression method (local header and central
  directory), or flips a bit of its data (its CRC then fails)."""
  data = bytearray(path.read_bytes())
  with zipfile.ZipFile(path) as z:
    offset = z.getinfo(name).header_offset
  local = [offset]
  central = [i for i in range(len(data)) if data[i:i + 4] == b"PK\x01\x02"
             and data[i + 46:i + 46 + len(name)] == name.encode()]
  for base, flag_at, method_at in [(i, 6, 8) for i in local] + [(i, 8, 10) for i in central]:
    if flag is not None:
      data[base + flag_at:base + flag_at + 2] = struct.pack("<H", flag)
    if method is not None:
      data[base + method_at:base + method_at + 2] = struct.pack("<H", method)
  if flip_data:
    name_len, extra_len = struct.unpack("<HH", data[offset + 26:offset + 30])
    data[offset + 30 + name_len + extra_len] ^= 1
  path.write_bytes(bytes(data))


def _crafted_zips(tmp_path):
  """{what: path} of zip checkpoints whose storage record is encrypted, compressed with an unknown
  method, or fails its CRC."""
  pkl = _tensor_pickle({"w": ("0", 4, 0, (4,), (1,))})
  out = {}
  for what, patch in (("encrypted", dict(flag=1)), ("method", dict(method=99)),
                      ("crc", dict(flip_data=True))):
    out[what] = _zip_checkpoint(tmp_path / f"{what}.pth", pkl, {"0": bytes(16)})
    _patch_member(out[what], "c/data/0", **patch)
  return out


def test_zip_errors_are_checkpoint_errors(tmp_path):
  files = _crafted_zips(tmp_path)
  for what, match in (("encrypted", "member 'c/data/0' is encrypted"),
                      ("method", "member 'c/data/0' is compressed with method 99"),
                      ("crc", "Bad CRC-32")):
    with pytest.raises(CheckpointError, match=f"{what}.pth: .*{match}"):
      load_state_dict(files[what])


def test_convert_refuses_a_crafted_file_in_one_line(tmp_path):
  ckpt = _crafted_zips(tmp_path)["encrypted"]
  out = tmp_path / "export"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  r = subprocess.run([sys.executable, "-m", "farmer_jax", "convert", "--from=tarflow",
                      f"--ckpt={ckpt}", f"--out={out}"], capture_output=True, text=True,
                     timeout=300, env=env, cwd=ROOT)
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert re.fullmatch(r"farmer_jax convert: .*encrypted.pth: member 'c/data/0' is encrypted.* "
                      r"Fix: .*", last), last
  assert not out.exists()


# ---------------------------------------------------------------------------------------------
# untrusted: the .npz / .npy reader and short_repr


def test_short_repr_is_bounded():
  bomb = 0
  for _ in range(60):
    bomb = (bomb, bomb)
  deep = []
  for _ in range(10000):
    deep = [deep]
  big = collections.OrderedDict((str(i), bomb) for i in range(1000))
  for obj in (bomb, deep, big, {"k": [bomb]}, 10 ** 5000, "x" * 10 ** 6, b"\x00" * 10 ** 6):
    text = short_repr(obj, 80)
    assert len(text) <= 80, text
  assert short_repr(("a", 1, [2.5, None], {"k": b"v"})) == "('a', 1, [2.5, None], {'k': b'v'})"
  assert short_repr((1,)) == "(1,)"
  assert short_repr(list(range(100)), 200) == "[0, 1, 2, 3, 4, 5, ...]"


def _npz_with(path, name, header_shape, data, deflate=False):
  """An .npz holding one float64 member whose .npy header declares ``header_shape`` and whose
  data is ``data`` (bytes, or an int: that many deflated zeros)."""
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      header, {"descr": "<f8", "fortran_order": False, "shape": header_shape})
  with zipfile.ZipFile(path, "w") as z:
    if isinstance(data, int):
      info = zipfile.ZipInfo(name + ".npy")
      info.compress_type = zipfile.ZIP_DEFLATED
      with z.open(info, "w") as w:
        w.write(header.getvalue())
        for _ in range(data >> 20):
          w.write(bytes(1 << 20))
    else:
      z.writestr(name + ".npy", header.getvalue() + data,
                 compress_type=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
  return path


def test_npz_reader_bounds_what_a_file_can_produce(tmp_path):
  # a deflate bomb: 64 MB of zeros in ~64 KB, refused from its header, before inflating
  bomb = _npz_with(tmp_path / "bomb.npz", "mu", (8 << 20,), 64 << 20)
  with _bounded_memory(4 << 20):
    with pytest.raises(UnreadableFileError, match=r"bomb.npz: array 'mu' declares shape "
                       r"\(8388608,\) of float64 \(67108864 bytes\), more than the file can hold"):
      untrusted.load_npz(bomb)
  # a header declaring 8 TB over 8 bytes of data: refused, nothing allocated
  huge = _npz_with(tmp_path / "huge.npz", "w", (1 << 40,), bytes(8))
  with pytest.raises(CheckpointError, match=r"huge.npz: array 'w' declares shape"):
    load_state_dict(huge)
  # compressed within bounds (np.savez_compressed) still loads exactly; so does a plain .npy
  a = np.arange(1000, dtype=np.float64).reshape(10, 100)
  np.savez_compressed(tmp_path / "ok.npz", a=a, b=a[:, ::2].T.astype(">i4"))
  got = untrusted.load_npz(tmp_path / "ok.npz")
  np.testing.assert_array_equal(got["a"], a)
  np.testing.assert_array_equal(got["b"], a[:, ::2].T)
  np.save(tmp_path / "v.npy", a)
  np.testing.assert_array_equal(untrusted.load_npy(tmp_path / "v.npy"), a)
  (tmp_path / "cut.npy").write_bytes((tmp_path / "v.npy").read_bytes()[:-8])
  with pytest.raises(UnreadableFileError, match="cut.npy: declares 8000 bytes of data but holds "
                     "7992"):
    untrusted.load_npy(tmp_path / "cut.npy")


def test_npz_reader_zip_errors(tmp_path):
  good = _npz_with(tmp_path / "good.npz", "w", (2,), np.ones(2).tobytes())
  for what, patch, match in (("encrypted", dict(flag=1), "member 'w.npy' is encrypted"),
                             ("method", dict(method=99), "compressed with method 99"),
                             ("crc", dict(flip_data=True), "Bad CRC-32")):
    path = tmp_path / f"{what}.npz"
    path.write_bytes(good.read_bytes())
    _patch_member(path, "w.npy", **patch)
    with pytest.raises(UnreadableFileError, match=f"{what}.npz: .*({match})"):
      untrusted.load_npz(path)
  np.savez(tmp_path / "objects.npz", o=np.array([{}], dtype=object))
  with pytest.raises(UnreadableFileError, match="array 'o' holds Python objects"):
    untrusted.load_npz(tmp_path / "objects.npz")


def _npy_member(header, data=b"", version=1):
  """Bytes of an .npy with the header dict ``header`` (an .npy format 1.0 or 2.0) and ``data``."""
  out = io.BytesIO()
  write = np.lib.format.write_array_header_1_0 if version == 1 else \
      np.lib.format.write_array_header_2_0
  write(out, header)
  return out.getvalue() + data


def test_npz_header_length_is_checked_before_the_header_is_read(tmp_path):
  """A v2.0 header declaring 4 GiB, deflated padding: numpy would read all of it before checking
  its limit; refused from the 4-byte length, nothing inflated (also as a .pth of .npy members)."""
  npz = tmp_path / "header.npz"
  with zipfile.ZipFile(npz, "w") as z:
    info = zipfile.ZipInfo("w.npy")
    info.compress_type = zipfile.ZIP_DEFLATED
    with z.open(info, "w") as w:
      w.write(b"\x93NUMPY\x02\x00" + struct.pack("<I", 2 ** 32 - 1))
      for _ in range(32):
        w.write(b" " * (1 << 20))
  assert npz.stat().st_size < 100_000
  pth = tmp_path / "header.pth"
  pth.write_bytes(npz.read_bytes())
  with _bounded_memory(4 << 20):
    with pytest.raises(UnreadableFileError, match=r"header.npz: array 'w' declares a header of "
                       r"4294967295 bytes"):
      untrusted.load_npz(npz)
    with pytest.raises(CheckpointError, match=r"header.pth: array 'w' declares a header of "
                       r"4294967295 bytes"):
      load_state_dict(pth)


def test_npy_reader_refuses_non_numeric_dtypes(tmp_path):
  """Zero-size (|V0 of 2**40 elements: 0 bytes declared), string and structured dtypes are
  refused by name; a lying latent_var.npy is an ExportError, never a traceback."""
  cases = {"void": ("|V0", (1 << 40,)), "str": ("<U4", (2,)), "rec": ([("a", "<f4")], (2,))}
  for what, (descr, shape) in cases.items():
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    data = bytes(int(np.prod(shape)) * np.dtype(descr).itemsize)
    with zipfile.ZipFile(tmp_path / f"{what}.npz", "w") as z:
      z.writestr("x.npy", _npy_member(header, data))
    (tmp_path / f"{what}.npy").write_bytes(_npy_member(header, data))
    match = r"has dtype .*; only bool, integer, float and complex arrays are read"
    with pytest.raises(UnreadableFileError, match=f"{what}.npz: array 'x' {match}"):
      untrusted.load_npz(tmp_path / f"{what}.npz")
    with pytest.raises(UnreadableFileError, match=f"{what}.npy: array '{what}.npy' {match}"):
      untrusted.load_npy(tmp_path / f"{what}.npy")
  for dtype in (np.bool_, np.int8, np.uint16, np.float16, np.complex64):  # numeric: still read
    np.save(tmp_path / "ok.npy", np.ones(3, dtype))
    assert untrusted.load_npy(tmp_path / "ok.npy").dtype == dtype

  import types
  from farmer_jax.artifacts import runs
  from farmer_jax.artifacts import export
  mcfg = types.SimpleNamespace(num_tokens=2, token_dim=1)
  path = runs.ExportDir(str(tmp_path)).latent_var
  for values, match in ((np.array([["ab"], ["cd"]]), r"could not be read .*has dtype"),
                        (np.ones((2, 1), np.int32), "holds int32 values, not floats")):
    np.save(path, values)
    with pytest.raises(export.ExportError, match=match):
      export.load_latent_var(str(tmp_path), mcfg, {"latent_var": True})
  np.save(path, np.ones((2, 1), np.float32))
  assert export.load_latent_var(str(tmp_path), mcfg, {"latent_var": True}).shape == (2, 1)


def test_deflate_expansion_message_says_what_to_do(tmp_path):
  """A real np.savez_compressed file that compresses better than 32x (zeros) is refused, and the
  message says why and how to save it."""
  np.savez_compressed(tmp_path / "zeros.npz", z=np.zeros(4 << 20))  # 32 MB in ~32 KB
  with pytest.raises(UnreadableFileError, match=r"expand more than 32x.*a possible deflate bomb.*"
                     r"save it uncompressed with np.savez"):
    untrusted.load_npz(tmp_path / "zeros.npz")
  np.savez(tmp_path / "zeros.npz", z=np.zeros(4 << 20))
  assert untrusted.load_npz(tmp_path / "zeros.npz")["z"].shape == (4 << 20,)


def test_huge_tensor_sizes_are_refused_quickly(tmp_path):
  """Sizes, strides and offsets are ints in [0, 2**63), at most 64 of them: a 20 KB int shared
  200 times through the memo would make the size arithmetic run for minutes."""
  big = (1 << 160_000) + 1
  data = big.to_bytes(big.bit_length() // 8 + 1, "little")
  huge = (b"(\x8b" + struct.pack("<i", len(data)) + data  # MARK, LONG4
          + b"q\x00" + b"h\x00" * 199 + b"t")  # BINPUT 0, BINGET 0 x 199, TUPLE
  files = {
      "huge": _tensor_pickle({"w": ("0", 4, 0, huge, (1,) * 200)}),
      "dims": _tensor_pickle({"w": ("0", 4, 0, (1,) * 65, (1,) * 65)}),
      "negative": _tensor_pickle({"w": ("0", 4, 0, (-1,), (1,))}),
      "offset": _tensor_pickle({"w": ("0", 4, 2 ** 63, (1,), (1,))}),
      "numel": _tensor_pickle({"w": ("0", 2 ** 63, 0, (1,), (1,))}),
  }
  paths = [_zip_checkpoint(tmp_path / f"{k}.pth", v, {"0": bytes(16)}) for k, v in files.items()]
  got = dict(zip(files, _load_isolated(paths, timeout=60)))
  for k, match in (("huge", r"tensor size \(<int of 160001 bits>, .* is not a tuple of ints in "
                            r"\[0, 2\*\*63\)"),
                   ("dims", "tensor size has 65 dimensions, more than 64"),
                   ("negative", r"tensor size \(-1,\) is not a tuple of ints in \[0, 2\*\*63\)"),
                   ("offset", r"tensor storage offset 9223372036854775808 is not an int in"),
                   ("numel", r"bad storage key/size '0'/9223372036854775808")):
    kind, msg, seconds = got[k]
    assert kind == "CheckpointError" and re.search(match, msg), (k, got[k])
    assert seconds < 5, (k, seconds)


def _dict_pickle(keys):
  """A top-level dict {key: None} of the pickled ``keys`` (opcodes each)."""
  return b"\x80\x02}(" + b"".join(k + b"N" for k in keys) + b"u."


def test_colliding_dict_keys_are_refused(tmp_path):
  """Ints i * (2**61 - 1) all hash to 0: a dict of 50000 of them (~500 KB) would take seconds to
  build (quadratic). Dict keys and set items may only be str, bytes, None, bool and ints of
  |k| < 2**61 - 1; real checkpoints (str names, int param ids in optimizer states) still load."""
  colliding = [T._op_int(i * (2 ** 61 - 1)) for i in range(1, 50_001)]
  files = {"ints": _dict_pickle(colliding),
           "float": _dict_pickle([b"G" + struct.pack(">d", 0.5)]),
           "tuple": _dict_pickle([T._op_tuple(T._op_str("a"))]),
           "set": b"\x80\x04\x8f(G\x3f\xe0\x00\x00\x00\x00\x00\x00\x90.",  # {0.5} (EMPTY_SET)
           "ordered": (T._op_global("collections", "OrderedDict")  # python 2's OrderedDict(...)
                       + b"]](" + T._op_int(2 ** 61 - 1) + b"Nea](" + T._op_int(2 ** 62) + b"Nea"
                       + b"\x85R.")}
  paths = [_zip_checkpoint(tmp_path / f"{k}.pth", v, {"0": bytes(16)}) for k, v in files.items()]
  got = dict(zip(files, _load_isolated(paths)))
  for k, match in (("ints", r"a dict key or set item that is an int of 61 bits \(at byte \d+\); "
                            r"only str, bytes"),
                   ("float", "a dict key or set item that is a float"),
                   ("tuple", "a dict key or set item that is a tuple"),
                   ("set", "a dict key or set item that is a float"),
                   ("ordered", r"OrderedDict key 2305843009213693951 \(int\)")):
    kind, msg, seconds = got[k]
    assert kind == "CheckpointError" and re.search(match, msg), (k, got[k])
    assert msg.startswith(str(tmp_path / f"{k}.pth")) and "\n" not in msg
    assert seconds < 2, (k, seconds)
  # python 2's OrderedDict([[name, tensor], ...]) of str keys still loads
  tensor = _tensor_pickle({"w": ("0", 4, 0, (4,), (1,))})[len(b"\x80\x02" + T._OP_ORDERED_DICT
                                                              + b"("):-len(b"u.")]
  name, rebuild = tensor[:len(T._op_str("w"))], tensor[len(T._op_str("w")):]
  py2 = (b"\x80\x02" + T._op_global("collections", "OrderedDict") + b"]](" + name + rebuild
         + b"ea\x85R.")
  got = load_state_dict(_zip_checkpoint(tmp_path / "py2.pth", py2, {"0": bytes(16)}))
  assert list(got) == ["w"] and got["w"].shape == (4,)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_real_training_checkpoint_keys_load(tmp_path, zip_format):
  """A module's state_dict (an OrderedDict with _metadata) and an Adam state (int param ids as
  keys) pass the key rules."""
  torch = pytest.importorskip("torch")
  model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
  opt = torch.optim.Adam(model.parameters())
  model(torch.ones(1, 3)).sum().backward()
  opt.step()
  path = tmp_path / "ckpt.pt"
  torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}, path,
             _use_new_zipfile_serialization=zip_format)
  got = load_state_dict(path, key="model")
  assert list(got) == list(model.state_dict())
  torch.save(model.state_dict(), path, _use_new_zipfile_serialization=zip_format)
  assert list(load_state_dict(path)) == list(model.state_dict())


def test_reading_errors_are_one_line():
  """Exception text from numpy / zipfile can span lines (numpy's header-size error does): the
  reader's message keeps the type and the first line."""
  with pytest.raises(UnreadableFileError) as e:
    with untrusted.reading("f.npz", "an .npz archive"):
      raise ValueError("Header info length (99999) is large\nTo allow loading, adjust ...")
  assert str(e.value) == ("f.npz: not readable as an .npz archive (ValueError: Header info length "
                          "(99999) is large)")
