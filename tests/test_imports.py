"""hbd/ has no import cycles, counting imports inside functions too (a lazy import still ties the
two modules together: lower floors must never import the floors above them)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hbd"


def imports_of(path: Path) -> set[str]:
    """The hbd modules ``path`` imports, at any depth of the file (functions, TYPE_CHECKING blocks)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("hbd."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "hbd":  # from hbd import metrics
                found.update(a.name for a in node.names)
            elif node.module.startswith("hbd."):
                found.add(node.module.split(".")[1])
    return found


def graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path a -> b -> ... -> a, or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_checker_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_parser_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text(
        "from typing import TYPE_CHECKING\nimport hbd.loop\nfrom hbd import metrics, tls\n"
        "if TYPE_CHECKING:\n    from hbd.workers import X\n"
        "def f():\n    from hbd.server import Server\n"
    )
    assert imports_of(f) == {"loop", "metrics", "tls", "workers", "server"}


def test_no_import_cycles_in_hbd() -> None:
    edges = graph()
    assert "loop" in edges["accept"] and "server_tls" in edges["server"]  # the graph is really read
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
