"""The documents that make promises name the tests that keep them: those tests must exist."""

import ast
import re
from pathlib import Path

from helpers import REPO

_NAMED = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


def test_every_test_security_md_names_exists():
    text = (REPO / "SECURITY.md").read_text(encoding="utf-8")
    named = _NAMED.findall(text)
    assert len(named) >= 40
    missing = [f"{file}::{name}" for file, name in named if name not in _tests_in(REPO / file)]
    assert missing == []


def test_every_row_of_security_md_names_a_test():
    """Every row of a table with a `test` column names at least one test."""
    rows, in_table = [], False
    for line in (REPO / "SECURITY.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("|") and line.rstrip().endswith("| test |"):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table and not line.startswith("|---"):
            rows.append(line)
    assert len(rows) >= 25
    assert [row for row in rows if "`tests/" not in row] == []
