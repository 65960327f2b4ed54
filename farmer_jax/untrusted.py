"""Reading files that may be crafted to exhaust memory or time (checkpoints, weights, reference
statistics): a bounded ``repr`` for messages built from file content, zip members read within what
the file holds, and the package's one ``.npz`` / ``.npy`` reader.

What a reader built on these promises (docs/reliability.md): nothing in the file is run, the
memory it takes is bounded by a small multiple of the file's size, and a bad file is ONE
``UnreadableFileError`` (a ValueError) naming the file and the problem, never a hang.
"""

import contextlib
import io
import itertools
import math
import os
import pickle
import struct
import zipfile
import zlib

import numpy as np
from etils import epath

from farmer_jax.errors import UserError, brief

class UnreadableFileError(UserError):
  """A file that cannot be read safely; the message names the file and the problem."""


# A compressed .npz member may inflate to at most this many times the file's size (plus SLACK):
# float weights and statistics compress by ~1.1x, images by a few x; a deflate bomb by ~1000x.
DEFLATE_EXPANSION = 32
SLACK = 16 << 20  # bytes any file may produce beyond its multiple of the file size

_REPR_ITEMS = 6  # items shown per container
_REPR_DEPTH = 3  # container levels shown
_NPY_HEADER_LIMIT = 10000  # numpy's own default for the header's Python literal
_NPY_KINDS = "biufc"  # dtype kinds read: bool, int, uint, float, complex (not bytes, str, void...)


def short_repr(obj, limit=80):
  """``repr(obj)`` cut to at most ``limit`` characters, at a cost bounded whatever ``obj`` holds:
  containers show their first items down to a few levels, other objects only their type name. File
  content enters messages this way: a plain ``repr`` of a pickle's shared references (a tuple of
  two references to one tuple of two references to ...) would run for ever."""
  parts, size = [], 0

  def emit(s):
    nonlocal size
    parts.append(s)
    size += len(s)

  def walk(o, depth):
    if size > limit:
      return
    if o is None or isinstance(o, (bool, float, complex)):
      emit(repr(o))
    elif isinstance(o, int):  # huge ints: repr is quadratic and capped by Python
      emit(repr(o) if o.bit_length() <= 64 else f"<int of {o.bit_length()} bits>")
    elif isinstance(o, (str, bytes, bytearray)):
      emit(repr(o[:limit]) + ("..." if len(o) > limit else ""))
    elif isinstance(o, (tuple, list, set, frozenset, dict)):
      if depth >= _REPR_DEPTH:
        emit(f"<{type(o).__name__} of {len(o)}>")
        return
      left, right = {tuple: "()", list: "[]"}.get(type(o), "{}")
      emit(left)
      items = o.items() if isinstance(o, dict) else o
      for i, item in enumerate(itertools.islice(items, _REPR_ITEMS)):
        if size > limit:
          return
        if i:
          emit(", ")
        if isinstance(o, dict):
          walk(item[0], depth + 1)
          emit(": ")
          walk(item[1], depth + 1)
        else:
          walk(item, depth + 1)
      emit(", ..." if len(o) > _REPR_ITEMS else "," if type(o) is tuple and len(o) == 1 else "")
      emit(right)
    else:
      emit(f"<{type(o).__name__}>")

  walk(obj, 0)
  text = "".join(parts)
  return text if len(text) <= limit else text[:max(limit - 3, 0)] + "..."


def open_member(zf, name, path, methods=(zipfile.ZIP_STORED,)):
  """The zip member ``name`` of ``zf`` opened for reading, after checking that it is neither
  encrypted nor compressed other than by ``methods``. A stored member yields at most the bytes it
  occupies in the file; a compressed one as many as its decompressor produces, so its reader must
  bound what it reads."""
  info = zf.getinfo(name)
  if info.flag_bits & 0x1:
    raise UnreadableFileError(f"{path}: member {short_repr(name)} is encrypted")
  if info.compress_type not in methods:
    allowed = " or ".join(_METHOD_NAMES.get(m, str(m)) for m in methods)
    got = _METHOD_NAMES.get(info.compress_type, f"method {info.compress_type}")
    raise UnreadableFileError(f"{path}: member {short_repr(name)} is compressed with {got}; "
                              f"expected {allowed}")
  return zf.open(info)


_METHOD_NAMES = {zipfile.ZIP_STORED: "stored (uncompressed)", zipfile.ZIP_DEFLATED: "deflate",
                 zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}


@contextlib.contextmanager
def reading(path, what, error=UnreadableFileError):
  """Inside it, whatever a malformed file makes a reader raise (a bad pickle, zip or header, a
  bad CRC, a decompression error, running out of memory or recursion) becomes ONE ``error`` (an
  UnreadableFileError subclass) whose message starts with ``path``; ``what`` is what the file
  should be, e.g. 'an .npz archive'."""
  try:
    yield
  except UnreadableFileError as e:
    if isinstance(e, error) and str(e).startswith(path):
      raise
    raise error(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
  except MemoryError:
    raise error(f"{path}: not enough memory to read it as {what} (the file declares more data "
                f"than fits)") from None
  except RecursionError:
    raise error(f"{path}: nested too deeply to read as {what}") from None
  except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError,
          KeyError, struct.error, zipfile.BadZipFile, zlib.error, NotImplementedError,
          OverflowError) as e:
    raise error(f"{path}: not readable as {what} ({brief(e)})") from None


def _npy_header(f, path, name):
  """(shape, dtype, nbytes) of the .npy stream ``f`` (positioned at its start). The header's
  length is checked before the header is read (numpy reads all the bytes it declares, up to
  4 GiB, before checking its own limit), and only numeric and bool dtypes pass."""
  version = np.lib.format.read_magic(f)
  if version not in ((1, 0), (2, 0)):
    raise UnreadableFileError(f"{path}: array {short_repr(name)} has .npy format version "
                              f"{version}; expected 1.0 or 2.0 (what np.save writes)")
  length_bytes = f.read(2 if version == (1, 0) else 4)
  if len(length_bytes) not in (2, 4):
    raise UnreadableFileError(f"{path}: array {short_repr(name)} ends inside its header")
  (length,) = struct.unpack("<H" if version == (1, 0) else "<I", length_bytes)
  if length > _NPY_HEADER_LIMIT:
    raise UnreadableFileError(f"{path}: array {short_repr(name)} declares a header of {length} "
                              f"bytes; np.save writes a few hundred (at most "
                              f"{_NPY_HEADER_LIMIT} are read)")
  header = io.BytesIO(length_bytes + f.read(length))
  read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                 else np.lib.format.read_array_header_2_0)
  shape, _, dtype = read_header(header, _NPY_HEADER_LIMIT)
  if dtype.hasobject:
    raise UnreadableFileError(f"{path}: array {short_repr(name)} holds Python objects (dtype "
                              f"{dtype}); only plain numeric arrays are read (no pickles)")
  if dtype.kind not in _NPY_KINDS or dtype.itemsize == 0:
    raise UnreadableFileError(f"{path}: array {short_repr(name)} has dtype "
                              f"{short_repr(str(dtype))}; only bool, integer, float and complex "
                              f"arrays are read")
  if any(n < 0 for n in shape):
    raise UnreadableFileError(f"{path}: array {short_repr(name)} has a negative dimension "
                              f"{shape}")
  return shape, dtype, math.prod(shape) * dtype.itemsize


class Npz:
  """The arrays of an ``.npz`` file, each read on demand: ``npz.files`` (names), ``npz[name]``. Only
  bool, int, uint, float and complex arrays are read (object, string, void dtypes are refused);
  an .npy header may declare at most ``_NPY_HEADER_LIMIT`` bytes; stored members yield at most
  the file's size in all, compressed ones at most ``DEFLATE_EXPANSION`` x the file's size +
  ``SLACK`` (checked against each array's header before its data is read). Use as a context
  manager."""

  def __init__(self, path):
    self.path = os.fspath(path)
    self._file = open(self.path, "rb")
    try:
      with reading(self.path, "an .npz archive"):
        if self._file.read(4) != b"PK\x03\x04":
          raise UnreadableFileError(f"{self.path}: not an .npz archive (a zip of .npy arrays, "
                                    f"as np.savez writes)")
        self._file.seek(0)
        self._zip = zipfile.ZipFile(self._file)
        self._members = {n[:-len(".npy")]: n for n in self._zip.namelist() if n.endswith(".npy")}
    except BaseException:
      self._file.close()
      raise
    self.files = list(self._members)
    size = os.fstat(self._file.fileno()).st_size
    self._left = {zipfile.ZIP_STORED: size, zipfile.ZIP_DEFLATED: DEFLATE_EXPANSION * size + SLACK}

  def __contains__(self, name):
    return name in self._members

  def __getitem__(self, name):
    if name not in self._members:
      raise KeyError(f"{name!r} is not an array of {self.path}")
    member = self._members[name]
    with reading(self.path, "an .npz archive"):
      methods = tuple(self._left)
      with open_member(self._zip, member, self.path, methods) as f:
        shape, dtype, nbytes = _npy_header(f, self.path, name)
      method = self._zip.getinfo(member).compress_type
      if nbytes > self._left[method]:
        hint = ""
        if method == zipfile.ZIP_DEFLATED:  # also a real np.savez_compressed of, e.g., zeros
          hint = (f": its deflated data would expand more than {DEFLATE_EXPANSION}x, more than "
                  f"real weights or statistics compress (a possible deflate bomb); if the file "
                  f"is yours, save it uncompressed with np.savez")
        raise UnreadableFileError(
            f"{self.path}: array {short_repr(name)} declares shape {short_repr(shape)} of "
            f"{dtype} ({nbytes} bytes), more than the file can hold ({self._left[method]} "
            f"bytes left for {_METHOD_NAMES[method]} members){hint}")
      self._left[method] -= nbytes
      with open_member(self._zip, member, self.path, methods) as f:
        return np.lib.format.read_array(f, allow_pickle=False,
                                        max_header_size=_NPY_HEADER_LIMIT)

  def close(self):
    self._zip.close()
    self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def load_npz(path):
  """{name: np.ndarray} of every array of an ``.npz`` file (file order), read within bounds."""
  with Npz(path) as z:
    return {k: z[k] for k in z.files}


def load_npy(path):
  """The array of an ``.npy`` file, local or in a bucket (``gs://...``); its header must not
  declare more data than the file holds."""
  path = os.fspath(path)
  with epath.Path(path).open("rb") as f, reading(path, "an .npy array"):
    _, _, nbytes = _npy_header(f, path, os.path.basename(path))
    start = f.tell()
    left = f.seek(0, os.SEEK_END) - start
    if nbytes > left:
      raise UnreadableFileError(f"{path}: declares {nbytes} bytes of data but holds {left}")
    f.seek(0)
    return np.lib.format.read_array(f, allow_pickle=False, max_header_size=_NPY_HEADER_LIMIT)
