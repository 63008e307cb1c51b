"""The package's import graph: no circles, and experiments/ stands alone."""

import ast
from pathlib import Path

from jax_oneclass import methods
from tests.conftest import REPO


def _module_name(path: Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _imports(path: Path) -> set[str]:
  """Every module a file imports, at the top or inside functions."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      found.add(node.module)
      found |= {f"{node.module}.{alias.name}" for alias in node.names}
  return found


def _graph() -> dict[str, set[str]]:
  files = sorted((REPO / "jax_oneclass").rglob("*.py"))
  names = {_module_name(f) for f in files}
  graph = {}
  for f in files:
    module = _module_name(f)
    # A package's own __init__ does not count as importing its modules.
    graph[module] = {
      m
      for m in _imports(f)
      if m in names and m != module and not m.startswith(module + ".")
    }
    # Importing `a.b.c` runs `a.b`'s __init__ too.
    for m in list(graph[module]):
      parent = m.rpartition(".")[0]
      if (
        parent in names
        and parent != module
        and not module.startswith(parent + ".")
      ):
        graph[module].add(parent)
  return graph


def _cycle(graph):
  """One import cycle as a list of modules, or None."""
  state = {}

  def visit(node, path):
    state[node] = "open"
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return path[path.index(nxt) :] + [nxt]
      if nxt not in state:
        found = visit(nxt, path + [nxt])
        if found:
          return found
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node, [node])
      if found:
        return found
  return None


def test_the_package_has_no_import_cycle():
  graph = _graph()
  assert "jax_oneclass.train" in graph["jax_oneclass.main"]
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_lower_layers_do_not_import_upper_ones():
  graph = _graph()
  upper = {
    "jax_oneclass.main",
    "jax_oneclass.train",
    "jax_oneclass.evaluate",
    "jax_oneclass.run",
  }
  for module, imported in graph.items():
    if module.startswith(
      ("jax_oneclass.components", "jax_oneclass.methods", "jax_oneclass.data")
    ):
      assert not imported & upper, (module, imported & upper)


def test_experiments_do_not_import_tests():
  for path in (REPO / "experiments").rglob("*.py"):
    assert not {m for m in _imports(path) if m.startswith("tests")}, path


def test_every_registered_method_has_a_config_and_a_method_class():
  for name in methods.available_methods():
    assert (REPO / "configs" / f"{name}.py").is_file()
    assert hasattr(methods.method_module(name), "Method")
