"""Reads PyTorch checkpoints (``torch.save`` files) into numpy arrays WITHOUT importing torch.

``load_state_dict(path)`` -> ``{name: np.ndarray}`` from

* ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``: either of PyTorch's two ``torch.save`` formats:

  - zip (torch >= 1.6, the default): ``<archive>/data.pkl`` is the object pickle; its tensors
    point, through persistent ids ``('storage', storage_type, key, location, numel)``, at the raw
    storages ``<archive>/data/<key>`` (byte order in ``<archive>/byteorder``);
  - legacy (``_use_new_zipfile_serialization=False``, and torch < 1.6): a sequence of pickles
    (magic number, protocol version, sys info, the object pickle whose persistent ids are
    ``('storage', storage_type, key, location, numel, view_metadata)``, the sorted storage keys),
    then per key an 8-byte little-endian element count and the storage's raw bytes;

* ``.npz``: the same state_dict saved with ``np.savez(path, **state_dict)`` (name -> array).

Pickles are read by a restricted unpickler: only the globals a state_dict needs resolve
(``collections.OrderedDict``, ``torch._utils._rebuild_tensor``/``_v2``/``_v3``,
``_rebuild_parameter``, the typed storage classes such as ``torch.FloatStorage``,
``torch.UntypedStorage``, dtypes such as ``torch.float32``), each to an inert stand-in defined
here; nothing named in the file is ever imported or run. Any other global is refused with a
CheckpointError naming it, except when ``key=`` selects one entry of a wrapping dict (e.g.
``{'model': state_dict, 'args': Namespace(...)}``): then other globals load as inert placeholders
and only one that lands inside the selected entry is an error.

Tensors come back as C-contiguous numpy arrays holding torch's values: strides and storage
offsets applied (tensors sharing a storage each get their own copy), bfloat16 widened exactly to
float32, big-endian files swapped to native order. 0-d tensors are 0-d arrays.

A crafted file cannot take the machine down (docs/reliability.md): each pickle is first walked
opcode by opcode, running nothing, and refused if it nests deeper than ``_MAX_DEPTH``, builds more
objects than ``_MAX_OBJECTS`` (+ 1 per 4 bytes) or makes dict keys and call arguments hash more than
``_MAX_HASHED`` (+ 4 per byte) nodes once shared references are expanded, or makes a dict key or set
item of a kind that can be made to collide (only str, bytes, None, bool and ints of |k| < 2**61 - 1
pass); tensor sizes, strides and offsets are ints in [0, 2**63), at most 64 of them; zip records
must be stored (torch.save never compresses) and unencrypted, and only the ``numel x itemsize``
bytes a storage declares are read; the storages read may not exceed the file's size and the arrays
produced ``_EXPANSION`` x the file's size + ``untrusted.SLACK`` (zero strides and views sharing a
storage are copied out); messages show file content through ``untrusted.short_repr``.

``save_state_dict(path, state_dict)`` is the way back, also without torch: ``{name: array}`` ->
a zip-format ``torch.save`` file that ``torch.load`` (``weights_only=True`` too) reads as an
OrderedDict of CPU tensors, same names, order, dtypes, shapes and values. Its pickle is written
opcode by opcode (the ones torch.save emits: ``_rebuild_tensor_v2`` on persistent-id storages, one
storage per tensor), its storages stored uncompressed and 64-byte aligned, the file replaced
atomically.
"""

import collections
import collections.abc
import io
import math
import os
import pickle
import pickletools
import struct
import tarfile
import zipfile

import numpy as np

from farmer_jax import untrusted
from farmer_jax.artifacts import storage
from farmer_jax.untrusted import short_repr


class CheckpointError(untrusted.UnreadableFileError):
  """A file that cannot be read as a state_dict; the message names the file and the problem."""


EXTENSIONS = (".pth", ".pt", ".bin", ".ckpt", ".npz")

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001

# What one pickle may build. A state_dict pickle builds ~6 objects per tensor in ~100 bytes, nests
# ~5 deep and hashes short strings; but the memo lets a few hundred bytes stand for a tree of
# 2**60 nodes that hashing it as a dict key (or printing it) would walk.
_MAX_DEPTH = 100
_MAX_OBJECTS = 1_000_000  # plus 1 per 4 bytes of pickle: ~100 bytes of memory each at most
_MAX_HASHED = 1_000_000  # plus 4 per byte: expanded nodes of dict keys, set items, call arguments
# The arrays produced may take this many times the file's size (+ untrusted.SLACK): bfloat16 is
# widened to float32 (2x), tied weights are copied out once per name.
_EXPANSION = 4
_MAX_OPAQUE = 1000  # different unknown globals loaded as placeholders (with key=)
_MAX_INT = 2 ** 63  # tensor sizes, strides, offsets and storage sizes lie in [0, _MAX_INT)
_MAX_NDIM = 64  # torch's own limit on a tensor's dimensions
# dict keys and set items may be str, bytes, None, bool or ints of |k| < _MAX_KEY_INT (each hashes
# to itself: no two collide); floats, bigger ints, tuples... can be chosen to share one hash,
# which makes building the dict quadratic.
_MAX_KEY_INT = 2 ** 61 - 1

# torch dtype name -> numpy dtype of the stored elements (bfloat16: its raw uint16 bits)
_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8,
    "uint64": np.uint64, "uint32": np.uint32, "uint16": np.uint16, "uint8": np.uint8,
    "bool": np.bool_, "complex64": np.complex64, "complex128": np.complex128,
}
_DTYPE_ALIASES = {"double": "float64", "float": "float32", "half": "float16", "long": "int64",
                  "int": "int32", "short": "int16", "cfloat": "complex64",
                  "cdouble": "complex128"}
_STORAGES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}


class _Frozen:
  """Base of the stand-ins the unpickler hands out: a pickle's BUILD cannot modify them."""
  __slots__ = ()

  def __init__(self, **fields):
    for k, v in fields.items():
      object.__setattr__(self, k, v)

  def __setattr__(self, name, value):
    raise AttributeError(f"{type(self).__name__} is read-only")

  def __delattr__(self, name):
    raise AttributeError(f"{type(self).__name__} is read-only")


class _DType(_Frozen):
  """Stand-in for ``torch.<dtype>``."""
  __slots__ = ("name",)


class _StorageType(_Frozen):
  """Stand-in for a storage class; ``dtype`` None for ``torch.UntypedStorage`` (bytes)."""
  __slots__ = ("qualname", "dtype")


class _Function(_Frozen):
  """Stand-in for an allowed function: calls our own implementation."""
  __slots__ = ("qualname", "fn")

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)


class _StorageRef(_Frozen):
  """A storage in the file: root storage ``key``, dtype name (None: untyped bytes), and the
  ``offset``/``numel`` (in its elements) of the part it covers (legacy storage views)."""
  __slots__ = ("key", "dtype", "offset", "numel")


class _Tensor(_Frozen):
  """A tensor to build once the storages are read: elements ``storage[offset + sum(i * stride)]``
  for indices i of ``size``; ``dtype`` None means the storage's."""
  __slots__ = ("storage", "offset", "size", "stride", "dtype", "metadata")


class _Opaque:
  """Inert placeholder for a global outside the allow list (only with ``key=``): records its
  arguments and state, runs nothing. A fresh subclass per global carries ``qualname``."""
  qualname = "?"

  def __new__(cls, *args, **kwargs):
    return object.__new__(cls)

  def __init__(self, *args, **kwargs):
    self.__dict__["_args"] = args

  def __setstate__(self, state):
    self.__dict__["_state"] = state

  def __setitem__(self, k, v):
    pass

  def append(self, v):
    pass

  def extend(self, vs):
    pass


def _is_int(v):
  return isinstance(v, int) and not isinstance(v, bool)


def _index(v):
  """Whether ``v`` is an int in [0, _MAX_INT): a size, stride, offset or element count."""
  return _is_int(v) and 0 <= v < _MAX_INT


def _ints(value, what):
  if not isinstance(value, (tuple, list)) or not all(_index(v) for v in value):
    raise CheckpointError(f"tensor {what} {short_repr(value)} is not a tuple of ints in "
                          f"[0, 2**63)")
  if len(value) > _MAX_NDIM:
    raise CheckpointError(f"tensor {what} has {len(value)} dimensions, more than {_MAX_NDIM}")
  return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, dtype=None, metadata=None):
  if not isinstance(storage, _StorageRef):
    raise CheckpointError(f"tensor storage is {_describe(storage)}, expected a storage")
  if not _index(storage_offset):
    raise CheckpointError(f"tensor storage offset {short_repr(storage_offset)} is not an int in "
                          f"[0, 2**63)")
  size, stride = _ints(size, "size"), _ints(stride, "stride")
  if len(size) != len(stride):
    raise CheckpointError(f"tensor size {size} and stride {stride} differ in length")
  if metadata is not None and not isinstance(metadata, dict):
    raise CheckpointError(f"tensor metadata {short_repr(metadata)} is not a dict")
  return _Tensor(storage=storage, offset=storage_offset, size=size, stride=stride, dtype=dtype,
                 metadata=metadata or {})


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       metadata=None):
  return _rebuild_tensor(storage, storage_offset, size, stride, metadata=metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  if not isinstance(dtype, _DType):
    raise CheckpointError(f"tensor dtype is {_describe(dtype)}, expected a torch dtype")
  return _rebuild_tensor(storage, storage_offset, size, stride, dtype.name, metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
  return data


def _codecs_encode(text, encoding="utf-8"):
  # how protocol-2 pickles written by python 3 spell a bytes object
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "ascii"):
    raise CheckpointError(f"refusing _codecs.encode({short_repr(text, 40)}, "
                          f"{short_repr(encoding, 40)})")
  return text.encode(encoding)


def _key_ok(k):
  return (k is None or isinstance(k, (str, bytes, bool))
          or (_is_int(k) and abs(k) < _MAX_KEY_INT))


def _ordered_dict(items=()):
  """``collections.OrderedDict(items)``: python 3 pickles an OrderedDict as ``OrderedDict()`` and
  SETITEMS (keys checked by ``_check_pickle``), python 2 as ``OrderedDict([[k, v], ...])``, whose
  keys are checked here, before hashing, as the walker checks the others."""
  if not isinstance(items, dict):
    if not isinstance(items, (list, tuple)) or not all(
        isinstance(kv, (list, tuple)) and len(kv) == 2 for kv in items):
      raise CheckpointError(f"OrderedDict of {_describe(items)}, expected (key, value) pairs")
    bad = next((kv[0] for kv in items if not _key_ok(kv[0])), None)
    if bad is not None:
      raise CheckpointError(f"OrderedDict key {short_repr(bad)} ({type(bad).__name__}); only "
                            f"str, bytes, None, bool and ints of less than 2**61 - 1 are read "
                            f"as keys")
  return collections.OrderedDict(items)


def _allowed_globals():
  allowed = {("collections", "OrderedDict"): _Function(qualname="collections.OrderedDict",
                                                       fn=_ordered_dict),
             ("torch", "Size"): _Function(qualname="torch.Size", fn=tuple),
             ("_codecs", "encode"): _Function(qualname="_codecs.encode", fn=_codecs_encode),
             ("torch", "UntypedStorage"): _StorageType(qualname="torch.UntypedStorage",
                                                       dtype=None)}
  for fn, name in ((_rebuild_tensor, "_rebuild_tensor"), (_rebuild_tensor_v2, None),
                   (_rebuild_tensor_v3, None), (_rebuild_parameter, None),
                   (_rebuild_parameter, "_rebuild_parameter_with_state")):
    name = name or fn.__name__
    allowed[("torch._utils", name)] = _Function(qualname="torch._utils." + name, fn=fn)
  for name, dtype in _STORAGES.items():
    for module in ("torch", "torch.cuda"):  # torch.cuda.*: legacy files saved from a GPU
      allowed[(module, name)] = _StorageType(qualname=f"{module}.{name}", dtype=dtype)
  for name in list(_DTYPES) + list(_DTYPE_ALIASES):
    allowed[("torch", name)] = _DType(name=_DTYPE_ALIASES.get(name, name))
  return allowed


_ALLOWED = _allowed_globals()


class _Unpickler(pickle.Unpickler):
  """Resolves only ``_ALLOWED`` globals (others: error, or ``_Opaque`` placeholders when
  ``lenient``); persistent ids go to ``persistent`` (None: a persistent id is an error)."""

  def __init__(self, file, persistent=None, lenient=False):
    super().__init__(file, encoding="utf-8")
    self._persistent = persistent
    self._lenient = lenient
    self._opaque = {}  # qualname -> its placeholder class (a class costs ~1 KB: one per name)

  def find_class(self, module, name):
    found = _ALLOWED.get((module, name))
    if found is not None:
      return found
    qualname = f"{module}.{name}"
    if not self._lenient:
      raise CheckpointError(
          f"refusing to load the global {short_repr(qualname, 120)}: a state_dict pickle only "
          f"needs tensors, dicts and OrderedDicts (nothing from the file is imported or run); if "
          f"the state_dict sits under one key of a bigger dict, pass key=")
    if qualname not in self._opaque:
      if len(self._opaque) >= _MAX_OPAQUE:
        raise CheckpointError(f"more than {_MAX_OPAQUE} different globals besides tensors")
      self._opaque[qualname] = type("Opaque", (_Opaque,), {"qualname": qualname, "__slots__": ()})
    return self._opaque[qualname]

  def persistent_load(self, pid):
    if self._persistent is None:
      raise CheckpointError(f"unexpected persistent id {short_repr(pid)}")
    return self._persistent(pid)


# opcodes that hash what they take (dict keys, set items; a call may hash its arguments) ->
# the slice of the items they pop that is hashed
_HASHES = {"SETITEM": slice(1, 2), "SETITEMS": slice(1, None, 2), "DICT": slice(0, None, 2),
           "ADDITEMS": slice(1, None), "FROZENSET": slice(None), "REDUCE": slice(None),
           "NEWOBJ": slice(None), "NEWOBJ_EX": slice(None), "OBJ": slice(None),
           "INST": slice(None), "BUILD": slice(1, None)}
# opcodes that add to the object below their arguments rather than make a new one
_IN_PLACE = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}
# opcodes that make dict keys or set items of what they take -> the slice of the items they pop
_KEYS = {"SETITEM": slice(1, 2), "SETITEMS": slice(1, None, 2), "DICT": slice(0, None, 2),
         "ADDITEMS": slice(1, None), "FROZENSET": slice(None)}
_KEY_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE",
            "BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "NONE",
            "NEWTRUE", "NEWFALSE"}  # push a str, bytes, None or bool: always a fine key
_INT_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
_KINDS = {"FLOAT": "a float", "BINFLOAT": "a float", "FROZENSET": "a frozenset",
          **{op: "a tuple" for op in ("TUPLE", "EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3")}}


def _key_kind(name, arg):
  """None if what opcode ``name`` (argument ``arg``) pushes may be a dict key or set item, else
  what it is (for the message)."""
  if name in _KEY_OPS:
    return None
  if name in _INT_OPS:  # INT also spells True/False
    return None if abs(arg) < _MAX_KEY_INT else f"an int of {int(arg).bit_length()} bits"
  return _KINDS.get(name, f"an object made by {name}")


def _check_pickle(f):
  """Walks the pickle at ``f``'s position opcode by opcode, running nothing, and refuses it if it
  nests objects deeper than ``_MAX_DEPTH``, builds more than ``_MAX_OBJECTS`` (+ 1 per 4 bytes),
  or would hash more than ``_MAX_HASHED`` (+ 4 per byte) nodes of dict keys, set items and call
  arguments, counting shared references (the memo) as the copies they stand for, or if a dict key
  or set item is of a kind that can be made to collide (not str, bytes, None, bool or an int of
  |k| < ``_MAX_KEY_INT``: a dict of keys sharing one hash is quadratic to build). A tuple's count
  is exact (tuples are immutable); a list grown after being shared is undercounted, harmlessly:
  lists cannot be hashed, and messages print through ``short_repr``. Leaves ``f`` where it was."""
  start = f.tell()
  stack, marks, memo = [], [], {}  # (expanded size, depth, key kind) per object on the stack
  objects = hashed = 0
  for op, arg, pos in pickletools.genops(f):
    name, size = op.name, pos - start
    if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
      index = len(memo) if name == "MEMOIZE" else arg
      if not stack or index > len(memo):  # the unpickler would allocate a memo up to the index
        raise CheckpointError(f"pickle memo index {short_repr(index)} out of sequence at byte "
                              f"{size}")
      memo[index] = stack[-1]
      continue
    if name in ("GET", "BINGET", "LONG_BINGET"):
      if arg not in memo:
        raise CheckpointError(f"pickle memo index {short_repr(arg)} read before written")
      stack.append(memo[arg])
      continue
    if name == "MARK":
      marks.append(len(stack))
      continue
    if pickletools.markobject in op.stack_before:
      first = (marks.pop() if marks else -1) - op.stack_before.index(pickletools.markobject)
    else:
      first = len(stack) - len(op.stack_before)
    if first < 0:
      raise CheckpointError(f"pickle opcode {name} at byte {size} pops an empty stack")
    popped = stack[first:]
    del stack[first:]
    if name in _HASHES:
      hashed += sum(w for w, _, _ in popped[_HASHES[name]])
    bad_key = next((k for _, _, k in popped[_KEYS[name]] if k), None) if name in _KEYS else None
    if name == "DUP":
      stack += popped * 2
    elif name in _IN_PLACE:
      (weight, depth, kind), added = popped[0], popped[1:]
      stack.append((weight + sum(w for w, _, _ in added),
                    max([depth] + [d + 1 for _, d, _ in added]), kind))
    elif op.stack_after:
      objects += 1
      stack.append((1 + sum(w for w, _, _ in popped),
                    1 + max((d for _, d, _ in popped), default=-1), _key_kind(name, arg)))
    if stack and stack[-1][1] > _MAX_DEPTH:
      raise CheckpointError(f"pickle objects nested more than {_MAX_DEPTH} deep (at byte {size})")
    if objects > _MAX_OBJECTS + size // 4:
      raise CheckpointError(f"pickle builds more than {_MAX_OBJECTS} + 1 per 4 bytes objects "
                            f"({objects} in its first {size} bytes)")
    if hashed > _MAX_HASHED + 4 * size:
      raise CheckpointError(f"pickle of {size} bytes has dict keys or call arguments that expand "
                            f"to {hashed} objects through shared references (more than "
                            f"{_MAX_HASHED} + 4 per byte): hashing or printing them would not end")
    if bad_key:
      raise CheckpointError(f"pickle has a dict key or set item that is {bad_key} (at byte "
                            f"{size}); only str, bytes, None, bool and ints of less than 2**61 - 1 "
                            f"are read as keys (others can be made to collide, which makes "
                            f"loading take quadratic time)")
  f.seek(start)


def _unpickle(f, persistent=None, lenient=False):
  """The object of the pickle at ``f``'s position (``_Unpickler``) once ``_check_pickle`` passed
  it."""
  _check_pickle(f)
  return _Unpickler(f, persistent, lenient).load()


def _describe(v):
  if isinstance(v, _Opaque):
    return f"an unloaded {v.qualname} object"
  if isinstance(v, (_StorageRef, _StorageType)):
    return "a bare storage"
  if isinstance(v, _Frozen):
    return f"a {type(v).__name__.strip('_')}"
  if isinstance(v, dict):
    return f"a dict of {len(v)} entries"
  if isinstance(v, (list, tuple)):
    return f"a {type(v).__name__} of {len(v)} items"
  return f"{type(v).__name__} {short_repr(v, 40)}"


def _storage_id(pid, legacy):
  """(root key, dtype name or None, numel, view offset, view numel) of a storage persistent id."""
  n = 6 if legacy else 5
  if not isinstance(pid, tuple) or len(pid) != n or pid[0] not in ("storage", b"storage"):
    raise CheckpointError(f"unsupported persistent id {short_repr(pid)} (expected a {n}-tuple "
                          f"('storage', ...): was the whole module pickled, not its state_dict?)")
  storage_type, key, numel = pid[1], pid[2], pid[4]
  if not isinstance(storage_type, _StorageType):
    raise CheckpointError(f"storage type is {_describe(storage_type)}, expected a storage class")
  if isinstance(key, bytes):
    key = key.decode("ascii")
  if not isinstance(key, str) or not _index(numel):
    raise CheckpointError(f"bad storage key/size {short_repr(key)}/{short_repr(numel)}")
  offset, count = 0, numel
  if legacy and pid[5] is not None:
    view = pid[5]
    if (not isinstance(view, tuple) or len(view) != 3 or not _index(view[1])
        or not _index(view[2])):
      raise CheckpointError(f"bad storage view {short_repr(view)}")
    offset, count = view[1], view[2]
    if offset < 0 or count < 0 or offset + count > numel:
      raise CheckpointError(f"storage view {short_repr(view)} outside its storage of {numel} "
                            f"elements")
  return key, storage_type.dtype, numel, offset, count


def _itemsize(dtype):
  return 1 if dtype is None else np.dtype(_DTYPES[dtype]).itemsize


def _read_zip(zf, path, lenient):
  """(object, {key: bytes reader}, big_endian) of a zip-format checkpoint. Every record read must
  be stored (torch.save never compresses: a compressed record could inflate a thousandfold) and
  unencrypted; of a storage record only the bytes its persistent id declares are read."""
  names = zf.namelist()
  pickles = sorted((n for n in names if n == "data.pkl" or n.endswith("/data.pkl")), key=len)
  if not pickles:
    raise CheckpointError("a zip file without data.pkl: not a torch.save checkpoint")
  prefix = pickles[0][:-len("data.pkl")]
  big_endian = False
  if prefix + "byteorder" in names:
    with untrusted.open_member(zf, prefix + "byteorder", path) as f:
      order = f.read(16).decode("ascii", "replace").strip()
    if order not in ("little", "big"):
      raise CheckpointError(f"unknown byteorder record {short_repr(order)}")
    big_endian = order == "big"
  roots = {}

  def persistent(pid):
    key, dtype, numel, _, _ = _storage_id(pid, legacy=False)
    roots.setdefault(key, (dtype, numel))
    return _StorageRef(key=key, dtype=dtype, offset=0, numel=numel)

  with untrusted.open_member(zf, pickles[0], path) as f:
    obj = _unpickle(io.BytesIO(f.read()), persistent, lenient)

  def read(key):
    dtype, numel = roots[key]
    name = f"{prefix}data/{key}"
    if name not in names:
      raise CheckpointError(f"storage record {short_repr(name)} is missing")
    nbytes = numel * _itemsize(dtype)
    with untrusted.open_member(zf, name, path) as f:
      data = f.read(nbytes)
    if len(data) < nbytes:
      raise CheckpointError(f"storage record {short_repr(name)} holds {len(data)} bytes, "
                            f"expected {numel} x {_itemsize(dtype)}")
    return np.frombuffer(data, np.uint8)

  return obj, read, big_endian


def _read_legacy(f, lenient):
  """(object, bytes reader, big_endian) of a legacy-format checkpoint (open file ``f``)."""
  magic = _unpickle(f)
  if magic != _LEGACY_MAGIC:
    raise CheckpointError(f"wrong magic number {short_repr(magic, 40)}: not a torch.save "
                          f"checkpoint")
  protocol = _unpickle(f)
  if protocol != _LEGACY_PROTOCOL:
    raise CheckpointError(f"unsupported legacy protocol version {short_repr(protocol, 40)}")
  sys_info = _unpickle(f)
  big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian", True) is False
  roots = {}

  def persistent(pid):
    key, dtype, numel, offset, count = _storage_id(pid, legacy=True)
    roots.setdefault(key, (dtype, numel))
    return _StorageRef(key=key, dtype=roots[key][0], offset=offset, numel=count)

  obj = _unpickle(f, persistent, lenient)
  keys = _unpickle(f)
  if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
    raise CheckpointError(f"storage key list is {_describe(keys)}, expected a list of str")
  where = {}
  end = os.fstat(f.fileno()).st_size
  for key in keys:
    head = f.read(8)
    if len(head) != 8:
      raise CheckpointError(f"file ends before storage {short_repr(key)}")
    (numel,) = struct.unpack(">q" if big_endian else "<q", head)
    if key not in roots:
      raise CheckpointError(f"storage {short_repr(key)} is listed but no tensor uses it")
    nbytes = numel * _itemsize(roots[key][0])
    if numel < 0 or f.tell() + nbytes > end:
      raise CheckpointError(f"storage {short_repr(key)} of {numel} elements runs past the end of "
                            f"the file")
    where[key] = (f.tell(), nbytes, numel)
    f.seek(nbytes, os.SEEK_CUR)

  def read(key):
    if key not in where:
      raise CheckpointError(f"storage {short_repr(key)} has no data in the file")
    pos, nbytes, numel = where[key]
    if numel < roots[key][1]:
      raise CheckpointError(f"storage {short_repr(key)} holds {numel} elements, expected "
                            f"{roots[key][1]}")
    f.seek(pos)
    return np.frombuffer(f.read(nbytes), np.uint8)

  return obj, read, big_endian


def _materialize(t, read, big_endian):
  """np.ndarray of the _Tensor ``t``; ``read(key)`` -> the root storage's bytes."""
  ref = t.storage
  dtype = t.dtype or ref.dtype
  if dtype is None:
    raise CheckpointError("a tensor on an untyped storage without a dtype")
  np_dtype = np.dtype(_DTYPES[dtype])
  stored = np_dtype.newbyteorder(">") if big_endian else np_dtype
  start = ref.offset * _itemsize(ref.dtype)
  buf = read(ref.key)[start:start + ref.numel * _itemsize(ref.dtype)]
  n = len(buf) // np_dtype.itemsize
  size, stride = t.size, t.stride
  if any(s < 0 for s in size) or any(s < 0 for s in stride) or t.offset < 0:
    raise CheckpointError(f"negative tensor size {size} / stride {stride} / offset {t.offset}")
  if 0 in size:
    out = np.zeros(size, np_dtype)
  else:
    last = t.offset + sum((a - 1) * s for a, s in zip(size, stride))
    if last >= n:
      raise CheckpointError(f"tensor of size {size}, stride {stride}, offset {t.offset} reads "
                            f"element {last} of a storage of {n}")
    elems = buf[:n * np_dtype.itemsize].view(stored)[t.offset:]
    if size:
      elems = np.lib.stride_tricks.as_strided(
          elems, size, [s * np_dtype.itemsize for s in stride], writeable=False)
    else:  # 0-d (as_strided would read an empty shape as 'keep the shape')
      elems = elems[0]
    out = np.array(elems, dtype=np_dtype, order="C")
  if dtype == "bfloat16":  # the high half of a float32: exact
    out = out.astype(np.uint32)
    out <<= 16
    out = out.view(np.float32)
  for flag, value in t.metadata.items():  # in place: ufuncs would turn 0-d arrays into scalars
    if not value:
      continue
    if flag == "neg":
      np.negative(out, out=out)
    elif flag == "conj":
      np.conjugate(out, out=out)
    else:
      raise CheckpointError(f"unsupported tensor metadata {short_repr(flag)}")
  return out


def _select(obj, key):
  """The state_dict (a dict of str -> tensor) inside the loaded object: ``obj[key]`` when key is
  given."""
  if key is not None:
    if not isinstance(obj, dict):
      raise CheckpointError(f"key={key!r} given but the checkpoint holds {_describe(obj)}, "
                            f"not a dict")
    if key not in obj:
      entries = sorted(k for k in obj if isinstance(k, str))
      raise CheckpointError(f"no entry {key!r} at the top level; entries: "
                            f"{short_repr(entries, 200)}")
    obj = obj[key]
  where = "the checkpoint" if key is None else f"entry {key!r}"
  if not isinstance(obj, dict):
    raise CheckpointError(f"{where} holds {_describe(obj)}, expected a state_dict (a dict of "
                          f"tensors)")
  for k in obj:
    if not isinstance(k, str):
      raise CheckpointError(f"{where} has the key {short_repr(k)} ({type(k).__name__}); a "
                            f"state_dict's keys are str (tensor names)")
  bad = [f"{short_repr(k)} ({_describe(v)})" for k, v in obj.items() if not isinstance(v, _Tensor)]
  if bad:
    wraps = [k for k, v in obj.items() if isinstance(v, dict)]
    hint = (f"; it looks like a wrapper: pass key= one of {short_repr(wraps, 200)}"
            if wraps and key is None else "")
    raise CheckpointError(f"entries that are not tensors: {', '.join(bad[:20])}"
                          f"{' ...' if len(bad) > 20 else ''}{hint}")
  return obj


def _load_npz(path, key):
  arrays = untrusted.load_npz(path)
  if key is not None:
    prefix = key + "."
    arrays = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    if not arrays:
      raise CheckpointError(f"{path}: no arrays named {prefix!r}... for key={key!r}")
  return arrays


def load_state_dict(path, key=None):
  """Reads a ``torch.save``-d state_dict (zip or legacy format) or an ``.npz`` of one, without
  torch, into ``{name: np.ndarray}`` (file order). ``key``: the checkpoint is a dict wrapping the
  state_dict under ``key`` (e.g. 'state_dict', 'model', 'ema'); for an .npz, the arrays named
  '<key>.<name>'. Raises CheckpointError (a ValueError) naming the file: missing file, unknown
  extension or format, a disallowed class in the pickle, entries that are not tensors, a file
  built to exhaust memory or time (see the module docstring)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"checkpoint file {path!r} not found")
  ext = os.path.splitext(path)[1].lower()
  if ext not in EXTENSIONS:
    raise CheckpointError(f"{path}: unknown checkpoint extension {ext!r}; expected one of "
                          f"{', '.join(EXTENSIONS)} (a torch.save file or an np.savez of one)")
  lenient = key is not None
  with untrusted.reading(path, "a torch.save checkpoint", CheckpointError), open(path, "rb") as f:
    head = f.read(8)
    f.seek(0)
    size = os.fstat(f.fileno()).st_size
    if head.startswith(b"PK\x03\x04"):  # the zip format (or an .npz named .pth)
      with zipfile.ZipFile(f) as zf:
        names = zf.namelist()
        if names and all(n.endswith(".npy") for n in names):
          return _load_npz(path, key)
        obj, read, big_endian = _read_zip(zf, path, lenient)
        return _build(obj, key, read, big_endian, size)
    if head.startswith(b"\x80"):  # a pickle stream: the legacy format
      obj, read, big_endian = _read_legacy(f, lenient)
      return _build(obj, key, read, big_endian, size)
    if tarfile.is_tarfile(f):
      raise CheckpointError("the tar format of torch < 0.4 is not supported: load it with "
                            "that torch and torch.save it again")
    raise CheckpointError(f"not a torch.save checkpoint (neither a zip archive nor a pickle "
                          f"stream; starts with {head!r})")


def _out_nbytes(t):
  """Bytes of the array ``_materialize(t)`` returns (0 if its dtype is unknown: an error there)."""
  dtype = t.dtype or t.storage.dtype
  if dtype is None:
    return 0
  itemsize = 4 if dtype == "bfloat16" else np.dtype(_DTYPES[dtype]).itemsize
  return math.prod(max(n, 0) for n in t.size) * itemsize


def _build(obj, key, read, big_endian, file_size):
  """{name: array} of the state_dict in ``obj``; what it reads and produces is bounded by the
  file's size ``file_size``: storages (distinct regions of the file) at most the file's size in
  all, arrays at most ``_EXPANSION`` x the file's size + ``untrusted.SLACK``."""
  state = _select(obj, key)
  cache, read_bytes, out_bytes = {}, 0, 0
  allowed = _EXPANSION * file_size + untrusted.SLACK

  def cached(k):
    nonlocal read_bytes
    if k not in cache:
      cache[k] = read(k)
      read_bytes += cache[k].nbytes
      if read_bytes > file_size:
        raise CheckpointError(f"its storages hold {read_bytes} bytes in all, more than the file's "
                              f"{file_size}: records overlap")
    return cache[k]

  out = {}
  for name, t in state.items():
    nbytes = _out_nbytes(t)
    if out_bytes + nbytes > allowed:
      raise CheckpointError(
          f"tensor {short_repr(name)} of size {short_repr(t.size)} would bring the arrays read to "
          f"{out_bytes + nbytes} bytes, more than {_EXPANSION} x the file's {file_size} bytes + "
          f"{untrusted.SLACK}: tensors with zero strides or sharing a storage are each copied out")
    out_bytes += nbytes
    try:
      out[name] = _materialize(t, cached, big_endian)
    except CheckpointError as e:
      raise CheckpointError(f"tensor {short_repr(name)}: {e}") from None
  return out


# ---------------------------------------------------------------------------------------------
# Writing: save_state_dict

# numpy dtype name -> the torch storage class torch.save names for it (bfloat16: ml_dtypes')
_STORAGE_OF = {dtype: name for name, dtype in _STORAGES.items()}
_ALIGNMENT = 64  # torch aligns every record's data to 64 bytes (its .storage_alignment)
_PAD_ID = b"FB"  # the zip extra-field id torch uses for the alignment padding


def _op_int(v):
  """Pickle opcodes pushing the int ``v``."""
  if 0 <= v < 0x100:
    return b"K" + bytes([v])  # BININT1
  if 0 <= v < 0x10000:
    return b"M" + struct.pack("<H", v)  # BININT2
  if -0x80000000 <= v < 0x80000000:
    return b"J" + struct.pack("<i", v)  # BININT
  data = v.to_bytes(v.bit_length() // 8 + 1, "little", signed=True)
  return b"\x8a" + bytes([len(data)]) + data  # LONG1


def _op_str(s):
  data = s.encode("utf-8", "surrogatepass")
  return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _op_tuple(*items):
  """Pickle opcodes pushing a tuple of ``items`` (each the opcodes pushing one element)."""
  if len(items) <= 3:  # EMPTY_TUPLE, TUPLE1, TUPLE2, TUPLE3
    return b"".join(items) + (b")", b"\x85", b"\x86", b"\x87")[len(items)]
  return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _op_global(module, name):
  return b"c" + module.encode("ascii") + b"\n" + name.encode("ascii") + b"\n"  # GLOBAL


_OP_ORDERED_DICT = _op_global("collections", "OrderedDict") + b")R"  # OrderedDict()


def _torch_strides(shape):
  """The strides (in elements) torch gives a contiguous tensor of ``shape`` (a 0 size counts as
  1, so e.g. (2, 0, 3) -> (3, 3, 1))."""
  strides, step = [], 1
  for n in reversed(shape):
    strides.append(step)
    step *= max(n, 1)
  return tuple(reversed(strides))


def _state_dict_pickle(entries):
  """``data.pkl`` of a zip checkpoint holding ``OrderedDict(name: tensor)``, entries ``(name,
  storage class, shape, numel)``; tensor i lives in the storage with key ``str(i)``."""
  out = [b"\x80\x02", _OP_ORDERED_DICT]  # PROTO 2
  if entries:
    out.append(b"(")  # MARK
    for i, (name, storage_class, shape, numel) in enumerate(entries):
      pid = _op_tuple(_op_str("storage"), _op_global("torch", storage_class), _op_str(str(i)),
                      _op_str("cpu"), _op_int(numel))
      args = _op_tuple(pid + b"Q",  # BINPERSID: the storage
                       _op_int(0),  # storage offset
                       _op_tuple(*map(_op_int, shape)),
                       _op_tuple(*map(_op_int, _torch_strides(shape))),
                       b"\x89",  # NEWFALSE: requires_grad
                       _OP_ORDERED_DICT)  # backward hooks
      out += [_op_str(name), _op_global("torch._utils", "_rebuild_tensor_v2"), args, b"R"]
    out.append(b"u")  # SETITEMS
  out.append(b".")  # STOP
  return b"".join(out)


def _arrays_to_save(state_dict):
  """[(name, numpy array, torch storage class)] of a state_dict to save; CheckpointError for
  anything torch.load would not read back as the same tensor."""
  if not isinstance(state_dict, collections.abc.Mapping):
    raise CheckpointError(f"the state_dict is {_describe(state_dict)}, expected a mapping "
                          f"name -> array")
  supported = ", ".join(_STORAGE_OF)
  arrays = []
  for name, value in state_dict.items():
    if not isinstance(name, str):
      raise CheckpointError(f"key {name!r} ({type(name).__name__}) is not a str: state_dict "
                            f"names are strings such as 'layer.weight' (convert the keys with "
                            f"str())")
    if not isinstance(value, (np.ndarray, np.generic)) and not hasattr(value, "__array__"):
      raise CheckpointError(f"entry {name!r} is {_describe(value)}, not an array: pass "
                            f"np.asarray(value, dtype=...) with the dtype it should have")
    try:
      array = np.asarray(value)
    except Exception as e:  # a foreign __array__ may raise anything
      raise CheckpointError(f"entry {name!r}: cannot convert {type(value).__name__} to a numpy "
                            f"array ({type(e).__name__}: {e})") from None
    storage = _STORAGE_OF.get(array.dtype.name) if array.dtype.names is None else None
    if storage is None:
      raise CheckpointError(f"entry {name!r} has dtype {array.dtype}, which a torch state_dict "
                            f"cannot hold; supported: {supported} (cast it with "
                            f".astype(...) first)")
    arrays.append((name, array, storage))
  return arrays


def _archive_name(path):
  """The folder torch.save puts the records in: the file's name without its extension (torch
  falls back to 'archive' for names that are not ASCII)."""
  stem = os.path.splitext(os.path.basename(path))[0]
  return stem if stem and stem.isascii() and stem.isprintable() else "archive"


def _write_record(zf, f, name, data):
  """Stores ``data`` (bytes, or a contiguous uint8 array) as record ``name`` of the open zip
  ``zf`` writing to ``f``, padding the local header so that the data starts 64-byte aligned."""
  info = zipfile.ZipInfo(name)  # dated 1980-01-01: the same arrays give the same file
  info.compress_type = zipfile.ZIP_STORED
  info.file_size = len(data) if isinstance(data, bytes) else data.nbytes
  zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT  # then zipfile adds a 20-byte extra
  header = 30 + len(name.encode("ascii")) + (20 if zip64 else 0) + 4
  pad = -(f.tell() + header) % _ALIGNMENT
  info.extra = _PAD_ID + struct.pack("<H", pad) + b"Z" * pad
  with zf.open(info, "w", force_zip64=zip64) as w:
    w.write(data)


def save_state_dict(path, state_dict):
  """Writes ``state_dict`` (a mapping name -> numpy array or array-like, e.g. a jax array; its
  order is kept) as a zip-format ``torch.save`` file at ``path`` without torch:
  ``torch.load(path, weights_only=True)`` gives an OrderedDict of CPU tensors with the same
  names, order, dtypes, shapes and values, and ``load_state_dict(path)`` the same arrays (bfloat16
  widened to float32 as always). dtypes: float16/32/64, bfloat16 (ml_dtypes), int8/16/32/64,
  uint8, bool, complex64/128. Arrays are written C-contiguous and little-endian, each in its own
  storage. The file is written next to ``path`` under a temporary name and renamed into place: on
  any error ``path`` is left as it was. Raises CheckpointError (a ValueError) naming the file for
  a non-str key, a value that is not an array, a dtype torch has no storage for, an extension
  ``load_state_dict`` does not read as a torch file."""
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in EXTENSIONS or ext == ".npz":
    raise CheckpointError(f"{path}: a torch.save file is named {', '.join(EXTENSIONS[:-1])} "
                          f"(got {ext or 'no extension'!r}; for an .npz use np.savez)")
  if os.path.isdir(path):
    raise CheckpointError(f"{path}: is a directory")
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise CheckpointError(f"{path}: directory {directory!r} does not exist")
  try:
    arrays = _arrays_to_save(state_dict)
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None
  archive = _archive_name(path)
  with storage.atomic_file(path) as f:
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
      pkl = _state_dict_pickle([(n, s, tuple(map(int, a.shape)), int(a.size))
                                for n, a, s in arrays])
      for name, data in (("data.pkl", pkl), (".format_version", b"1"),
                         (".storage_alignment", str(_ALIGNMENT).encode("ascii")),
                         ("byteorder", b"little")):
        _write_record(zf, f, f"{archive}/{name}", data)
      for i, (_, array, _) in enumerate(arrays):
        little = np.asarray(array, array.dtype.newbyteorder("<"), order="C")  # copy if needed
        _write_record(zf, f, f"{archive}/data/{i}", little.reshape(-1).view(np.uint8))
      _write_record(zf, f, f"{archive}/version", b"3\n")
