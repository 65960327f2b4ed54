"""The package's import graph: no cycles, and no library module imports a command module.

Read from the source with ``ast`` (nothing is imported): every ``import`` / ``from ... import`` of a
farmer_jax module counts, at module level or inside a function, since a function-level import
still ties the two modules together."""

import ast
import os

import pytest

PACKAGE = "farmer_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)
# the entry points and the modules that run a command: the top layer, which nothing below imports
COMMANDS = ("farmer_jax.__main__", "farmer_jax.cli", "farmer_jax.commands")


def _modules(root):
  """{dotted module name: source path} of every .py file under ``root`` (a package's
  ``__init__.py`` under the package's name)."""
  out = {}
  base = os.path.dirname(root)
  for folder, _, files in os.walk(root):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, base)[:-3].split(os.sep)
        if parts[-1] == "__init__":
          parts.pop()
        out[".".join(parts)] = path
  return out


def _imported_names(module, path, tree):
  """Dotted names that ``module``'s imports refer to: ``import a.b`` gives a.b; ``from a import
  b`` gives a and a.b (b may be a submodule); relative imports are resolved against ``module``."""
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
      yield base
      yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph(root=ROOT):
  """{module: set of the package's modules it imports} (the package's own ``__init__`` left out:
  every module imports it implicitly)."""
  modules = _modules(root)
  package = os.path.basename(root)
  graph = {}
  for module, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    deps = set()
    for name in _imported_names(module, path, tree):
      while name and name not in modules:      # a.b.func -> the module a.b that defines it
        name = name.rpartition(".")[0]
      if name and name not in (module, package):
        deps.add(name)
    graph[module] = deps
  return graph


def strongly_connected(graph):
  """The strongly connected components of ``graph`` (Tarjan's algorithm, iterative)."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []
  for start in sorted(graph):
    if start in index:
      continue
    work = [(start, iter(sorted(graph[start])))]
    index[start] = low[start] = len(index)
    stack.append(start)
    on_stack.add(start)
    while work:
      node, edges = work[-1]
      child = next(edges, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = len(index)
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph[child]))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        parent = work[-1][0]
        low[parent] = min(low[parent], low[node])
      if low[node] == index[node]:
        component = set()
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.add(member)
          if member == node:
            break
        out.append(component)
  return out


def _is_command(module):
  return any(module == c or module.startswith(c + ".") for c in COMMANDS)


def test_no_import_cycle():
  cycles = [sorted(c) for c in strongly_connected(import_graph()) if len(c) > 1]
  assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_library_modules_do_not_import_commands():
  graph = import_graph()
  bad = sorted(f"{m} imports {d}" for m, deps in graph.items() if not _is_command(m)
               for d in deps if _is_command(d))
  assert not bad, bad


# What each layer may import, lowest first (a module may import its own layer and those below).
# The network (model.py and what builds it, the distilled student included) stands on the
# foundation only; artifacts (what runs leave on disk) on the network; eval never imports train.
FOUNDATION = ("farmer_jax.errors", "farmer_jax.config.schema", "farmer_jax.config.rules",
              "farmer_jax.conventions",
              "farmer_jax.untrusted", "farmer_jax.sharding", "farmer_jax.flops",
              "farmer_jax.host_memory", "farmer_jax.host_cpu", "farmer_jax.distributed",
              "farmer_jax.xla_options")
NETWORK = ("farmer_jax.nn", "farmer_jax.flow", "farmer_jax.prior", "farmer_jax.reduction",
           "farmer_jax.model", "farmer_jax.distill.student")


# packages whose __init__ any layer may import (a docstring; its modules have their own layer)
PACKAGES = ("farmer_jax", "farmer_jax.config", "farmer_jax.distill")


def _in(module, prefixes):
  return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("layer,allowed", [
    (FOUNDATION, FOUNDATION),
    (NETWORK, FOUNDATION + NETWORK),
    (("farmer_jax.artifacts",), FOUNDATION + NETWORK + (
        "farmer_jax.artifacts", "farmer_jax.config.parse", "farmer_jax.config.resume")),
], ids=["foundation", "network", "artifacts"])
def test_layers_import_only_what_is_below_them(layer, allowed):
  graph = import_graph()
  bad = sorted(f"{m} imports {d}" for m, deps in graph.items() if _in(m, layer)
               for d in deps if d not in PACKAGES and not _in(d, allowed))
  assert not bad, bad


def test_eval_does_not_import_train():
  graph = import_graph()
  bad = sorted(f"{m} imports {d}" for m, deps in graph.items() if _in(m, ("farmer_jax.eval",))
               for d in deps if _in(d, ("farmer_jax.train", "farmer_jax.distill")))
  assert not bad, bad


def _write(root, name, text):
  path = os.path.join(root, *name.split("/"))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


@pytest.mark.parametrize("import_b", ["from pkg import b", "from . import b",
                                      "def f():\n  import pkg.b\n", "from .b import thing"])
def test_a_planted_cycle_is_found(tmp_path, import_b):
  """A two-module cycle in a throwaway package, whichever import form closes it (absolute,
  relative, inside a function, a name from the module)."""
  root = tmp_path / "pkg"
  _write(root, "__init__.py", "")
  _write(root, "a.py", import_b + "\n")
  _write(root, "b.py", "from pkg.sub import c\nthing = 1\n")
  _write(root, "sub/__init__.py", "")
  _write(root, "sub/c.py", "from ..a import f\n")
  graph = import_graph(str(root))
  assert graph["pkg.sub.c"] == {"pkg.a"}
  cycles = [c for c in strongly_connected(graph) if len(c) > 1]
  assert cycles == [{"pkg.a", "pkg.b", "pkg.sub.c"}]


def test_a_chain_is_not_a_cycle(tmp_path):
  root = tmp_path / "pkg"
  _write(root, "__init__.py", "")
  _write(root, "a.py", "import pkg.b\nfrom pkg import c\n")
  _write(root, "b.py", "from pkg.c import x\n")
  _write(root, "c.py", "import os\nx = 1\n")
  graph = import_graph(str(root))
  assert graph == {"pkg": set(), "pkg.a": {"pkg.b", "pkg.c"}, "pkg.b": {"pkg.c"}, "pkg.c": set()}
  assert all(len(c) == 1 for c in strongly_connected(graph))
