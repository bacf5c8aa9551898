"""Imports point one way: read off the source with `ast`, not by importing.

At module level (imports inside functions run at call time, on purpose):
no module under perl/ imports the repository's `tasks` package, and perl/'s
modules import each other without a cycle. Through deferred imports too:
perl/data has no cycle, and nothing in perl/ imports `tasks`.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PERL = ROOT / "perl"


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PERL.rglob("*.py"))}


def _top_level_statements(body):
  """Statements run at import: module body, and the bodies of module-level
  if/try/with blocks (not `if TYPE_CHECKING:` or `if __name__ == ...:`),
  never def/class bodies."""
  for node in body:
    if isinstance(node, ast.If):
      test = ast.unparse(node.test)
      if "TYPE_CHECKING" in test or "__name__" in test:  # not run on import
        continue
      yield from _top_level_statements(node.body)
      yield from _top_level_statements(node.orelse)
    elif isinstance(node, ast.Try):
      for block in (node.body, node.orelse, node.finalbody,
                    *[h.body for h in node.handlers]):
        yield from _top_level_statements(block)
    elif isinstance(node, ast.With):
      yield from _top_level_statements(node.body)
    else:
      yield node


def imported_modules(module: str, path: pathlib.Path, *,
                     anywhere: bool = False) -> set:
  """Dotted names a module imports at module level (`anywhere`: in function
  bodies too); `from a import b` gives a.b where that is a module, else a."""
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  tree = ast.parse(path.read_text())
  out = set()
  nodes = ast.walk(tree) if anywhere else _top_level_statements(tree.body)
  for node in nodes:
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")[:len(package.split(".")) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
      else:
        source = node.module
      if source == "__future__":
        continue
      for alias in node.names:
        name = f"{source}.{alias.name}"
        out.add(name if name in MODULES else source)
  return out


GRAPH = {m: imported_modules(m, p) for m, p in MODULES.items()}


def test_the_graph_is_read():
  # Known edges, so an empty graph (a parsing slip) cannot pass the checks.
  assert "perl.data.registry" in GRAPH["perl.data.pipeline"]
  assert "perl.data.vocabulary_config" in GRAPH["perl.data.vocabularies"]
  assert len(GRAPH) > 40


def test_perl_never_imports_tasks_at_module_level():
  offenders = sorted((m, i) for m, imports in GRAPH.items() for i in imports
                     if i == "tasks" or i.startswith("tasks."))
  assert not offenders, (
      f"perl/ imports the tasks package at module level: {offenders}; look "
      "tasks up through perl.data.registry instead.")


def find_cycle(graph):
  """One import cycle among the graph's own nodes, as a list, or None."""
  state = {}

  def visit(node, stack):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if nxt not in graph:
        continue
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt, stack)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node, [])
      if found:
        return found
  return None


def test_find_cycle_finds_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"x"}, "c": {"a"}}) is None


def test_no_import_cycle_in_perl():
  cycle = find_cycle(GRAPH)
  assert cycle is None, f"module-level import cycle: {' -> '.join(cycle)}"


def test_perl_data_has_no_cycle_even_through_deferred_imports():
  data = {m: imported_modules(m, p, anywhere=True) for m, p in MODULES.items()
          if m.startswith("perl.data.")}
  cycle = find_cycle(data)
  assert cycle is None, f"import cycle in perl/data: {' -> '.join(cycle)}"


def test_perl_never_imports_tasks_anywhere():
  # Not even inside a function: the registry finds tasks through the
  # gin-bound modules, and the task-side tools (tasks.prepare) live in tasks/.
  offenders = sorted(
      (m, i) for m, p in MODULES.items()
      for i in imported_modules(m, p, anywhere=True) if i.split(".")[0] == "tasks")
  assert not offenders, f"perl/ imports the tasks package: {offenders}"
