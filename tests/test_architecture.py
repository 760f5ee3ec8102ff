"""Structure checks: no import cycle inside verigrad/ (every run-time import counted, function-level
ones too; ``if TYPE_CHECKING:`` blocks are annotations only), and every operator kind registered
with its rules."""
from __future__ import annotations

import ast
from pathlib import Path

from verigrad.operators import OPS
from verigrad.operators.base import Node

PKG = Path(__file__).resolve().parents[1] / "verigrad"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """verigrad modules imported anywhere in the file (``from a.b import c`` counts a.b.c when
    that is a module, else a.b)."""
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        out.update(n for n in names if n in modules)
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only, never imported)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def import_graph() -> dict[str, set[str]]:
    files = {(_module_name(p)): p for p in PKG.rglob("*.py")}
    modules = set(files)
    graph = {m: _imports(p, modules) - {m} for m, p in files.items()}
    # importing a submodule runs its package's __init__ (parent packages are not edges of their own)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle_inside_verigrad():
    graph = import_graph()
    assert len(graph) > 30
    cycle = _cycle(graph)
    assert cycle is None, " → ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_every_registered_kind_has_its_rules():
    rules = ("forward", "vjp", "ibp_forward", "ibp_vjp")
    for kind, cls in OPS.items():
        assert cls.op == kind
        missing = [r for r in rules if getattr(cls, r) is getattr(Node, r)]
        assert not missing, f"operator {kind!r} lacks {missing}"
