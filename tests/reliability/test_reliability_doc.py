"""docs/reliability.md names a test for every fault, and every test it names exists.

Tests are found in their file's syntax tree rather than by importing or collecting: several test
folders are not packages, and collecting the whole suite would cost more than this check.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"
TEST_REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def fault_rows() -> list[tuple[str, list[tuple[str, str]]]]:
    """(fault, [(test file, test name), ...]) for each row of the faults table."""
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 3 or cells[0] in ("Fault", "---"):
            continue
        rows.append((cells[0], TEST_REFERENCE.findall(cells[2])))
    return rows


def defined_tests(path: Path) -> set[str]:
    """Names of test functions at module level or in test classes."""
    tree = ast.parse(path.read_text())
    scopes = [tree, *(n for n in tree.body if isinstance(n, ast.ClassDef))]
    return {
        node.name
        for scope in scopes
        for node in scope.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")
    }


def test_every_fault_names_at_least_one_test():
    rows = fault_rows()
    assert len(rows) >= 12
    untested = [fault for fault, tests in rows if not tests]
    assert not untested, untested


def test_every_test_named_in_the_doc_exists():
    missing = []
    for _, tests in fault_rows():
        for file, name in tests:
            path = ROOT / file
            if not path.is_file() or name not in defined_tests(path):
                missing.append(f"{file}::{name}")
    assert not missing, missing
