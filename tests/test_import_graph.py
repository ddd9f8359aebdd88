"""No import cycle among the first-party modules (normkit and its three plugins), at module or function level.

The graph is read from the source with ``ast`` (nothing is imported). Its edges are every import a module can
execute: ``import`` and ``from ... import`` statements anywhere (module level, in functions, in methods, in
``try`` blocks), relative imports resolved, and ``importlib.import_module("literal")`` calls. An edge goes to the
module that provides the name: ``from pkg import sub`` where ``pkg.sub`` is a module goes to ``pkg.sub``;
``from pkg import name`` otherwise goes to ``pkg`` (its ``__init__``). Importing ``a.b.c`` also runs ``a.b``'s
``__init__`` on first use, but a submodule never depends on its ancestors' ``__init__`` that way (the parent is
already in ``sys.modules``), so no implicit edge goes to a parent package.

``if TYPE_CHECKING:`` blocks never execute: their imports count only in a package's ``__init__``, where they
declare the names its ``__getattr__`` loads lazily from the submodules (the run-time edges that
``importlib.import_module(variable)`` hides). So a submodule that imports its own package to reach a re-exported
name closes a cycle (``pkg.__init__ -> pkg._a -> pkg.__init__``): the fix is importing from the defining module.
A cycle is a piece in the wrong module; a function-level import that only hides one is still a cycle here.
"""

from __future__ import annotations

import ast
import textwrap
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "normkit": ROOT / "src" / "normkit",
    "normkit_torch": ROOT / "plugins" / "normkit-torch" / "src" / "normkit_torch",
    "normkit_keras": ROOT / "plugins" / "normkit-keras" / "src" / "normkit_keras",
    "normkit_flax": ROOT / "plugins" / "normkit-flax" / "src" / "normkit_flax",
}

Edge = tuple[str, str]  # (target module, "file:line" of the import)


def find_modules(packages: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file under each package directory."""
    found: dict[str, Path] = {}
    for name, directory in packages.items():
        assert (directory / "__init__.py").is_file(), f"package {name!r}: no __init__.py in {directory}"
        for path in sorted(directory.rglob("*.py")):
            parts = [name, *path.relative_to(directory).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.Module, keep_type_checking: bool) -> list[ast.stmt | ast.Call]:
    """Every import statement and ``import_module("literal")`` call in the tree, ``if TYPE_CHECKING:`` bodies
    included only when ``keep_type_checking`` (their ``else`` branches always count: they execute)."""
    nodes: list[ast.stmt | ast.Call] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test) and not keep_type_checking:
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            nodes.append(node)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called == "import_module" and isinstance(node.args[0].value, str):
                nodes.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return nodes


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of dotted ``name`` that is a first-party module (None: not first-party)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_edges(module: str, modules: dict[str, Path]) -> list[Edge]:
    """The first-party modules ``module``'s imports can execute, each with where the import is."""
    path = modules[module]
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    edges: list[Edge] = []
    for node in _import_nodes(tree, keep_type_checking=is_package):
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{node.lineno}"
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.Call):
            targets = [node.args[0].value]
        else:
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in modules else base)
        for target in targets:
            known = _known(target, modules)
            if known is not None:
                edges.append((known, where))
    return edges


def import_graph(packages: dict[str, Path]) -> dict[str, dict[str, str]]:
    """module -> {imported first-party module: where (the first import of it)}."""
    modules = find_modules(packages)
    graph: dict[str, dict[str, str]] = {}
    for module in modules:
        targets: dict[str, str] = {}
        for target, where in import_edges(module, modules):
            targets.setdefault(target, where)
        graph[module] = targets
    return graph


def strongly_connected(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), keeping those that hold a cycle: more than one module,
    or one module that imports itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
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
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    found.append(sorted(component))
    return sorted(found)


def shortest_cycle(graph: dict[str, dict[str, str]], component: list[str], start: str) -> list[str]:
    """A shortest cycle through ``start``, staying inside its strongly connected ``component`` (BFS)."""
    members = set(component)
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node]):
            if child not in members:
                continue
            if child == start:
                chain = [node]
                while chain[-1] != start:
                    chain.append(parent[chain[-1]])
                return [*reversed(chain), start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    raise AssertionError(f"no cycle through {start} in {component}")


def describe(graph: dict[str, dict[str, str]], component: list[str]) -> str:
    """A component's cycles as readable chains, each edge with the import that makes it: the shortest cycle through
    its first module, then through each module no chain shown yet passes (every module of the component appears)."""
    lines: list[str] = []
    shown: set[str] = set()
    for start in component:
        if start in shown:
            continue
        chain = shortest_cycle(graph, component, start)
        shown.update(chain)
        lines.append(" -> ".join(chain))
        lines += [f"    {a} -> {b}  ({graph[a][b]})" for a, b in zip(chain, chain[1:])]
    return "\n".join(lines)


def cycles(packages: dict[str, Path]) -> list[str]:
    graph = import_graph(packages)
    return [describe(graph, component) for component in strongly_connected(graph)]


def test_first_party_packages_have_no_import_cycle():
    graph = import_graph(PACKAGES)
    assert len(graph) > 60, f"expected the four packages' modules, found {len(graph)}"
    # the graph sees function-level, relative and lazy (TYPE_CHECKING re-export) imports
    assert "normkit._moments" in graph["normkit"]
    assert "normkit_torch._batchnorm" in graph["normkit_torch"]
    found = [describe(graph, component) for component in strongly_connected(graph)]
    assert not found, (f"{len(found)} import cycle(s); move the piece to the module both sides can import, or import"
                       " a name from the module that defines it, not from a package that re-exports it:\n\n"
                       + "\n\n".join(found))


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.mark.parametrize("planted, chain", [
    # a function-level import of the package in a submodule the package re-exports lazily (TYPE_CHECKING)
    ({"pkg/_b.py": "def f():\n    import pkg\n    return pkg.A\n"}, "pkg -> pkg._b -> pkg"),
    # two submodules importing each other, one of them inside a function, through a relative import
    ({"pkg/_b.py": "def f():\n    from ._a import A\n    return A\n"}, "pkg._a -> pkg._b -> pkg._a"),
    # importlib with a literal name, in a nested subpackage
    ({"pkg/sub/__init__.py": "", "pkg/sub/m.py": "from pkg import _a\n",
      "pkg/_b.py": "import importlib\n\ndef f():\n    return importlib.import_module('pkg.sub.m')\n"},
     "pkg._a -> pkg._b -> pkg.sub.m -> pkg._a"),
    # a module importing itself
    ({"pkg/_b.py": "from pkg._b import f as g\n\ndef f():\n    pass\n"}, "pkg._b -> pkg._b"),
])
def test_detector_finds_a_planted_cycle(tmp_path, planted, chain):
    base = {
        "pkg/__init__.py": """\
            from typing import TYPE_CHECKING
            from pkg._a import A
            if TYPE_CHECKING:
                from pkg._b import f as f
            """,
        "pkg/_a.py": "from pkg import _b\nfrom . import _c\n\nA = 1\n",
        "pkg/_b.py": "def f():\n    pass\n",
        "pkg/_c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg._a import A\n",
    }
    _write(tmp_path, base)
    clean = cycles({"pkg": tmp_path / "pkg"})
    assert clean == [], "a package importing its submodules, or a TYPE_CHECKING import in a submodule, is no cycle"
    _write(tmp_path, planted)
    found = cycles({"pkg": tmp_path / "pkg"})
    assert len(found) == 1 and found[0].splitlines()[0] == chain, found
