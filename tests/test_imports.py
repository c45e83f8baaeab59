"""The package's import graph has no cycles: every ``import`` of a harness module, at module level or
inside a function (lazy imports count: a lazy cycle is still a cycle in the design), is an edge, and
importing ``a.b.c`` also depends on the packages ``a.b`` and ``a`` (their ``__init__`` runs first)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "harness"


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of a file under ``root``'s parent (``pkg/__init__.py`` names ``pkg``)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Edges from each module of the package under ``root`` to the package modules it imports."""
    top = root.name
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target != top and not target.startswith(top + "."):
                    continue
                parts = target.split(".")
                for i in range(1, len(parts) + 1):  # a.b.c imports run a/__init__, a/b/__init__ too
                    dep = ".".join(parts[:i])
                    if dep in modules and dep != name and not name.startswith(dep + "."):
                        graph[name].add(dep)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_harness_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("lazy", [False, True])
def test_a_planted_cycle_is_found(tmp_path, lazy):
    pkg = tmp_path / "harness"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from harness.sub import b\n")
    body = "def f():\n    from harness import a\n" if lazy else "from . import c\n"
    (pkg / "sub" / "b.py").write_text(body)
    (pkg / "sub" / "c.py").write_text("import harness.a\n")
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None and cycle[0] == cycle[-1] and "harness.a" in cycle


def test_a_package_init_counts_as_a_dependency(tmp_path):
    pkg = tmp_path / "harness"
    (pkg / "p").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "p" / "__init__.py").write_text("from harness.x import y\n")
    (pkg / "p" / "leaf.py").write_text("")
    (pkg / "x.py").write_text("from harness.p.leaf import z\n")
    graph = import_graph(pkg)
    assert "harness.p" in graph["harness.x"]
    assert find_cycle(graph) is not None
