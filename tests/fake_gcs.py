"""A local stand-in for a ``gs://`` bucket, for tests: every etils.epath operation on a
``gs://b/x`` path is redirected to ``ROOT/b/x``, and Orbax's CheckpointManager is handed the local
directory while the URL it was given is recorded. The code under test sees, builds and passes
around only the URL; a path that was rewritten into a local one (``$PWD/gs:/b/x``) would bypass the
redirect and land in the working directory instead, which the tests check is empty.
"""

import contextlib
import os
from unittest import mock

import orbax.checkpoint as ocp
from etils.epath import testing as epath_testing

PREFIX = "gs://"


def local(root, path):
  p = os.fspath(path)
  return os.path.join(root, p[len(PREFIX):]) if p.startswith(PREFIX) else p


@contextlib.contextmanager
def fake_gcs(root):
  """Context: gs:// -> ``root``; yields the list of directories handed to CheckpointManager."""
  one = lambda orig, path, *a, **k: orig(local(root, path), *a, **k)  # noqa: E731
  two = lambda orig, src, dst, *a, **k: orig(local(root, src), local(root, dst), *a, **k)  # noqa
  real_manager = ocp.CheckpointManager
  seen = []

  def manager(directory, *args, **kwargs):
    seen.append(os.fspath(directory))
    return real_manager(local(root, directory), *args, **kwargs)

  fns = {name: one for name in ("exists", "glob", "isdir", "listdir", "makedirs", "mkdir",
                                "open", "remove", "rmtree", "stat", "walk")}
  fns.update(copy=two, rename=two, replace=two)
  with epath_testing.mock_epath(**fns), mock.patch.object(ocp, "CheckpointManager", manager):
    yield seen
