"""hbd/ stays a house of small rooms: no class over MAX_CLASS_LINES lines (issue 11). A class that
grows past it is split by job, handing dependencies down (see the README's "Code layout")."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hbd"
MAX_CLASS_LINES = 250
# Still to split (add a class here only with a plan to split it, and drop it when it is): none now.
EXEMPT: set[tuple[str, str]] = set()


def class_sizes(path: Path) -> list[tuple[str, int]]:
    """(name, lines) of every class in ``path``, nested ones included, decorators counted."""
    sizes = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ClassDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            assert node.end_lineno is not None
            sizes.append((node.name, node.end_lineno - first + 1))
    return sizes


def test_the_measure_counts_a_class_from_its_decorator_to_its_last_line(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import dataclasses\n\n@dataclasses.dataclass\nclass A:\n    x: int\n\n    class B:\n        pass\n")
    assert sorted(class_sizes(f)) == [("A", 6), ("B", 2)]


def test_no_class_in_hbd_is_over_the_limit() -> None:
    found = {(p.name, name): n for p in sorted(PACKAGE.glob("*.py")) for name, n in class_sizes(p)}
    assert ("client.py", "Link") in found  # the package is really read
    too_big = {k: n for k, n in found.items() if n > MAX_CLASS_LINES and k not in EXEMPT}
    assert not too_big, f"classes over {MAX_CLASS_LINES} lines (split them by job): {too_big}"


# Rooms split out of a big class get what they need handed down; none imports the module it left
# (or any daemon), which is what keeps them from calling back into it.
DAEMONS = {"daemon", "server", "client", "workers", "ops", "cli"}
ROOMS = ("hook_queue", "hooks", "worker_pool", "reloading", "client_session", "status_doc")


def hbd_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hbd."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "hbd":
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("hbd."))
    return found


def test_the_rooms_import_no_daemon() -> None:
    assert "loop" in hbd_imports(PACKAGE / "worker_pool.py")  # the imports are really read
    for room in ROOMS:
        assert not hbd_imports(PACKAGE / f"{room}.py") & DAEMONS, room
