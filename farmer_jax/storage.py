"""Paths that are local or object-store URLs (``gs://bucket/run``), through ``etils.epath`` (the
path library Orbax and grain use), so a workdir in a bucket is written to the bucket by every host
and never rewritten into a local path (``os.path.abspath('gs://b/w')`` would give ``$PWD/gs:/b/w``).

Local paths are made absolute; URLs are kept exactly as given. Object stores have no atomic rename
and no append: a whole-object write is atomic (a reader sees the old or the new object), so
``write_text`` writes URLs directly and local files through a temporary file + ``os.replace``.
"""

import contextlib
import os
import posixpath
import uuid

from etils import epath


def is_url(path) -> bool:
  """'gs://b/x', 's3://...' -> True; local paths -> False."""
  return "://" in os.fspath(path)


def absolute(path) -> str:
  """A local path made absolute; a URL unchanged."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def join(path, *names) -> str:
  """``os.path.join`` for local paths, '/'-joining for URLs (never normalised into a local
  path)."""
  path = os.fspath(path)
  return posixpath.join(path, *names) if is_url(path) else os.path.join(path, *names)


def parent(path) -> str:
  path = os.fspath(path).rstrip("/")
  return posixpath.dirname(path) if is_url(path) else os.path.dirname(path)


def P(path) -> epath.Path:
  """The epath.Path of a local path or URL."""
  return epath.Path(os.fspath(path))


def exists(path) -> bool:
  return P(path).exists()


def isdir(path) -> bool:
  return P(path).is_dir()


def makedirs(path):
  """Creates a directory (and parents); on object stores directories are implicit (a no-op there
  unless the backend keeps markers)."""
  P(path).mkdir(parents=True, exist_ok=True)


def read_text(path) -> str:
  return P(path).read_text()


def write_text(path, text):
  """Writes ``text`` so that a reader sees the old or the complete new content (see module doc)."""
  write_bytes(path, text.encode())


@contextlib.contextmanager
def atomic_path(path):
  """Local files: yields a unique temporary path next to ``path``; on success it replaces ``path``
  (os.replace), on any failure it is removed, so ``path`` is either the complete new file or
  untouched and no temporary file is left."""
  d, base = os.path.split(os.path.abspath(os.fspath(path)))
  tmp = os.path.join(d, f".{base}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_bytes(path, data: bytes):
  """Atomic whole-file write (see module doc)."""
  path = os.fspath(path)
  if is_url(path):
    P(path).write_bytes(data)
    return
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)


def remove(path):
  """Removes a file; a missing one is not an error."""
  try:
    P(path).unlink()
  except FileNotFoundError:
    pass


def rename(src, dst):
  P(src).rename(P(dst))


def listdir(path):
  return sorted(p.name for p in P(path).iterdir())


def copy_tree(src_dir, dst_dir):
  """Copies every file under the local ``src_dir`` to ``dst_dir`` (local or URL), overwriting."""
  for root, _, files in os.walk(src_dir):
    rel = os.path.relpath(root, src_dir)
    target = dst_dir if rel == "." else join(dst_dir, *rel.split(os.sep))
    makedirs(target)
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        P(join(target, name)).write_bytes(f.read())
