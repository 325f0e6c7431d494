"""The package's imports point one way: no module imports, even lazily, one that imports it back.

A cycle hidden by an import inside a function works until someone moves the import up; and a
model module that reaches into training makes every reader of a model file load the training
loop. Read from the source (every ``import`` statement, at any depth), not from sys.modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cimd_pipeline"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package modules that ``path`` imports anywhere in its body (``from a import b``
    counts as ``a.b`` when that is a module, else as ``a``)."""
    found = set()
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, known) - {module_name(p)} for p in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_sees_a_lazy_import_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back():
    assert cycles(import_graph()) == []


def test_models_and_io_do_not_reach_up_into_training_or_pipelines():
    graph = import_graph()
    lower = [m for m in graph if m.startswith(("cimd_pipeline.models", "cimd_pipeline.io"))]
    upward = {
        m: sorted(t for t in graph[m] if t.startswith(("cimd_pipeline.training", "cimd_pipeline.pipelines")))
        for m in lower
    }
    assert {m: t for m, t in upward.items() if t} == {}


def test_sampling_in_one_process_and_in_workers_shares_one_home():
    graph = import_graph()
    assert "cimd_pipeline.sample_rows" in graph["cimd_pipeline.sharded_sampling"]
    assert "cimd_pipeline.ensembles" not in graph["cimd_pipeline.sharded_sampling"]
