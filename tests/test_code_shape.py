"""Code shape: no function in src/bdscan or bench/ is longer than 80 lines (STYLE: small functions, one
idea each). A failure names each function, its file and line, and its length."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "bdscan"
BENCH = Path(__file__).resolve().parents[1] / "bench"
MAX_LINES = 80
# Being rewritten on another branch (detect v2 and its error channel, issue 14); the lead
# deletes the entry when that lands (the second test fails once it is short, to say so).
PENDING: set[str] = set()


def long_functions(root: Path = SRC, limit: int = MAX_LINES) -> list[tuple[str, str]]:
    """(``file function`` key, message) of every function over ``limit`` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                length = node.end_lineno - start + 1
                if length > limit:
                    found.append((f"{path.relative_to(root.parent)} {node.name}",
                                  f"{path.relative_to(root.parent)}:{node.lineno} {node.name}() is {length} lines"))
    return found


def test_no_function_is_longer_than_80_lines():
    too_long = [message for key, message in long_functions() + long_functions(BENCH) if key not in PENDING]
    assert not too_long, f"functions over {MAX_LINES} lines (split them):\n" + "\n".join(too_long)


def test_pending_exemptions_are_still_needed():
    still_long = {key for key, _ in long_functions()}
    assert PENDING <= still_long, f"now short, remove from PENDING: {sorted(PENDING - still_long)}"


def test_the_checker_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(f"def short():\n    return 1\n\n\ndef too_long():\n{body}\n")
    assert [m for _, m in long_functions(tmp_path)] == [f"{tmp_path.name}/m.py:5 too_long() is {MAX_LINES + 1} lines"]
