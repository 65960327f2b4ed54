"""Paths that are local or object-store URLs (``gs://bucket/run``), through ``etils.epath`` (the
path library Orbax and grain use), so a workdir in a bucket is written to the bucket by every host
and never rewritten into a local path (``os.path.abspath('gs://b/w')`` would give ``$PWD/gs:/b/w``).

Local paths are made absolute; URLs are kept exactly as given. Object stores have no atomic rename
and no append: a whole-object write is atomic (a reader sees the old or the new object), so
``write_text`` writes URLs directly and local files through a temporary file + ``os.replace``.
"""

import contextlib
import errno
import os
import posixpath
import secrets
import shutil

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


def within(path, parent) -> bool:
  """True if ``path`` is ``parent`` or inside it (both real, absolute local paths, or both URLs)."""
  return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def missing_dirs(path) -> list:
  """The absolute local ``path`` and those of its ancestors that do not exist, deepest first (empty
  if ``path`` exists): the folders ``makedirs(path)`` would create."""
  out, path = [], os.path.abspath(os.fspath(path))
  while not os.path.exists(path):
    out.append(path)
    path = os.path.dirname(path)
  return out


def nearest_existing(path) -> str:
  """The absolute local ``path`` if it exists, else its nearest existing ancestor: the folder a
  missing path would be created under, so the one to check (a file there, no write permission)."""
  missing = missing_dirs(path)
  return os.path.dirname(missing[-1]) if missing else os.path.abspath(os.fspath(path))


def remove_empty_dirs(dirs):
  """Removes the folders ``dirs`` (deepest first, e.g. what ``missing_dirs`` listed before they
  were made) while they are empty: stops at the first one that cannot be removed."""
  for d in dirs:
    try:
      os.rmdir(d)
    except OSError:
      return


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
def atomic_file(path, mode="wb", sync=True):
  """Writes the local file ``path`` all at once: yields a file object open on a new temporary file
  beside it; when the block ends normally the data is flushed (and fsync-ed with ``sync``) and the
  file renamed over ``path``; on any failure it is removed. A reader sees the old or the complete
  new file; no temporary is left.

  The temporary has a random name and is created with O_EXCL | O_NOFOLLOW, so nothing planted at a
  guessed name (a file, a symbolic link to a file elsewhere) is ever opened or overwritten; a
  symbolic link at ``path`` itself is replaced, not followed.
  """
  path = os.path.abspath(os.fspath(path))
  directory, base = os.path.split(path)
  flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
           | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
  while True:
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
    try:
      fd = os.open(tmp, flags, 0o666)
      break
    except FileExistsError:
      continue
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      if sync:
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise
  if sync:
    _fsync_dir(directory)


def _fsync_tree(root):
  """fsyncs every file and folder under ``root`` (what a rename then publishes is on disk)."""
  for d, _, files in os.walk(root):
    for name in files:
      path = os.path.join(d, name)
      if os.path.islink(path):
        continue
      fd = os.open(path, os.O_RDONLY)
      try:
        os.fsync(fd)
      except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):   # a file system without fsync
          raise
      finally:
        os.close(fd)
    _fsync_dir(d)


def _fsync_dir(directory):
  """Makes a rename in ``directory`` durable (where the platform can open a directory)."""
  try:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_bytes(path, data: bytes):
  """Atomic whole-file write (see module doc)."""
  path = os.fspath(path)
  if is_url(path):
    P(path).write_bytes(data)
    return
  with atomic_file(path) as f:
    f.write(data)


def remove(path):
  """Removes a file; a missing one is not an error."""
  try:
    P(path).unlink()
  except FileNotFoundError:
    pass


def rmtree(path):
  """Removes a directory and everything under it (on an object store: every object under the
  prefix); a missing one is not an error."""
  if P(path).exists():
    P(path).rmtree()


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


@contextlib.contextmanager
def staged_dir(out, may_replace):
  """Builds the local directory ``out`` aside and moves it into place all at once.

  Yields a new, empty temporary sibling of ``out`` (hidden, random name) to fill. When the block
  ends normally and ``out`` exists, ``may_replace(out)`` is called first (it raises to refuse:
  ``out`` may have changed while the block ran), ``out`` is renamed aside, the new directory renamed
  to ``out``, and only then is the old one deleted. On a failure or an interruption at any point
  ``out`` is what it was (put back from aside if needed), the temporary is deleted, and parent
  folders this call created are removed again while empty.
  """
  out = os.path.abspath(os.fspath(out))
  parent, name = os.path.split(out)
  created = missing_dirs(parent)   # made here, removed again on failure while empty
  os.makedirs(parent, exist_ok=True)
  tag = secrets.token_hex(6)
  tmp, aside, done = os.path.join(parent, f".{name}.tmp-{tag}"), None, False
  try:
    os.mkdir(tmp)
    yield tmp
    _fsync_tree(tmp)   # the new directory is durable before the old one can go
    if os.path.lexists(out):
      may_replace(out)
      aside = os.path.join(parent, f".{name}.old-{tag}")
      os.rename(out, aside)
    os.rename(tmp, out)
    done = True
    _fsync_dir(parent)
  finally:
    if aside is not None and os.path.lexists(aside):
      if done:
        shutil.rmtree(aside, ignore_errors=True)   # the new directory is in place
      elif not os.path.lexists(out):
        os.rename(aside, out)                      # interrupted between the renames: put it back
    if os.path.lexists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.lexists(out):
      remove_empty_dirs(created)
