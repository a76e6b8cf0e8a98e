"""Library code reports through logging or the progress reporter (``qgraph.progress``); only the CLI and the demo
print. A ``print`` anywhere else in the package would write to a user's terminal whether they asked or not."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"qgraph/cli.py", "qgraph/demo.py"}


def print_calls(path: Path) -> list[int]:
    """Lines of every ``print(...)`` call in ``path``."""
    tree = ast.parse(path.read_text())
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    ]


def test_no_print_in_the_library_outside_the_cli_and_the_demo():
    found = {
        path.relative_to(ROOT).as_posix(): print_calls(path)
        for directory in ("qgraph", "passes", "backends")
        for path in sorted((ROOT / directory).rglob("*.py"))
        if path.relative_to(ROOT).as_posix() not in ALLOWED
    }
    assert {k: v for k, v in found.items() if v} == {}


def test_the_check_sees_a_print(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    print('x')\n    log = print\n")
    assert print_calls(source) == [2]
