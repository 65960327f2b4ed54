"""A local stand-in for a ``gs://`` bucket, for tests: every etils.epath operation on a
``gs://b/x`` path is redirected to ``ROOT/b/x``, and Orbax's CheckpointManager is handed the local
directory while the URL it was given is recorded; so is StandardCheckpointer (exports), whose
array data tensorstore would otherwise send to the real service. The code under test sees,
builds and passes around only the URL; a path that was rewritten into a local one
(``$PWD/gs:/b/x``) would bypass the redirect and land in the working directory instead, which the
tests check is empty.

The workdir lock talks to the bucket through google-cloud-storage (conditional writes, which epath
does not offer); ``FakeGcsClient`` stands in for its object API, with generations and
``if_generation_match`` preconditions, over the same local directory.
"""

import contextlib
import datetime
import os
import threading
from unittest import mock

import orbax.checkpoint as ocp
from etils.epath import testing as epath_testing
from google.api_core import exceptions as gexc

PREFIX = "gs://"


def local(root, path):
  p = os.fspath(path)
  return os.path.join(root, p[len(PREFIX):]) if p.startswith(PREFIX) else p


@contextlib.contextmanager
def fake_gcs(root):
  """Context: gs:// -> ``root``; yields the list of directories handed to CheckpointManager and
  to StandardCheckpointer.save."""
  one = lambda orig, path, *a, **k: orig(local(root, path), *a, **k)  # noqa: E731
  two = lambda orig, src, dst, *a, **k: orig(local(root, src), local(root, dst), *a, **k)  # noqa
  real_manager = ocp.CheckpointManager
  seen = []

  def manager(directory, *args, **kwargs):
    seen.append(os.fspath(directory))
    return real_manager(local(root, directory), *args, **kwargs)

  class Checkpointer(ocp.StandardCheckpointer):
    """Saves, restores and describes the local stand-in of the URL it is given."""

    def save(self, directory, *args, **kwargs):
      seen.append(os.fspath(directory))
      return super().save(local(root, directory), *args, **kwargs)

    def restore(self, directory, *args, **kwargs):
      return super().restore(local(root, directory), *args, **kwargs)

    def metadata(self, directory, *args, **kwargs):
      return super().metadata(local(root, directory), *args, **kwargs)

  fns = {name: one for name in ("exists", "glob", "isdir", "listdir", "makedirs", "mkdir",
                                "open", "remove", "rmtree", "stat", "walk")}
  fns.update(copy=two, rename=two, replace=two)
  client = FakeGcsClient(root)
  with epath_testing.mock_epath(**fns), mock.patch.object(ocp, "CheckpointManager", manager), \
      mock.patch.object(ocp, "StandardCheckpointer", Checkpointer), \
      mock.patch("farmer_jax.artifacts.lock._gcs_client", lambda: client):
    yield seen


class FakeGcsClient:
  """google.cloud.storage.Client's object API as the workdir lock uses it: ``bucket(b).blob(n)``
  and ``bucket(b).get_blob(n)``; blobs with ``generation``, ``updated``, ``upload_from_string``,
  ``download_as_bytes`` and ``delete`` honouring ``if_generation_match`` (0: must not exist),
  raising PreconditionFailed / NotFound as the service does. Objects are files under ``root``."""

  def __init__(self, root):
    self.root = root
    self.generations = {}          # file path -> generation of its current content
    self.mutex = threading.Lock()  # each call is atomic, as a request to the service is
    self.last = 0

  def bucket(self, name):
    return _FakeBucket(self, name)


class _FakeBucket:

  def __init__(self, client, name):
    self.client, self.name = client, name

  def blob(self, name):
    return _FakeBlob(self.client, os.path.join(self.client.root, self.name, name))

  def get_blob(self, name):
    blob = self.blob(name)
    with self.client.mutex:
      if blob.current() == 0:
        return None
      blob.generation = blob.current()
      blob.updated = datetime.datetime.fromtimestamp(os.stat(blob.path).st_mtime,
                                                     datetime.timezone.utc)
    return blob


class _FakeBlob:

  def __init__(self, client, path):
    self.client, self.path = client, path
    self.generation = self.updated = None

  def current(self):
    """The stored generation; 0 if there is no object."""
    if not os.path.exists(self.path):
      return 0
    return self.client.generations.get(self.path, 1)

  def _check(self, if_generation_match):
    if if_generation_match is not None and if_generation_match != self.current():
      raise gexc.PreconditionFailed(f"{self.path}: generation {self.current()}, "
                                    f"precondition {if_generation_match}")

  def upload_from_string(self, data, content_type=None, if_generation_match=None):
    del content_type
    with self.client.mutex:
      self._check(if_generation_match)
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      with open(self.path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
      self.client.last = max(self.client.last, self.current()) + 1
      self.client.generations[self.path] = self.generation = self.client.last

  def download_as_bytes(self, if_generation_match=None):
    with self.client.mutex:
      if self.current() == 0:
        raise gexc.NotFound(self.path)
      self._check(if_generation_match)
      with open(self.path, "rb") as f:
        return f.read()

  def delete(self, if_generation_match=None):
    with self.client.mutex:
      if self.current() == 0:
        raise gexc.NotFound(self.path)
      self._check(if_generation_match)
      os.remove(self.path)
      self.client.generations.pop(self.path, None)
