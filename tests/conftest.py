"""Shared fixtures: a throw-away copy of the Kedro project to run pipelines in.

The suite runs in parallel pytest-xdist workers (``-n auto`` in pyproject.toml), one per core.
Every test process, and every ``kedro run`` it starts, therefore uses one torch thread: torch's
default of one thread per core, in several processes at once, makes the threads spin against each
other (measured on 2 cores: a 6 s training test took 74 s beside a second worker).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ["OMP_NUM_THREADS"] = "1"  # inherited by every subprocess a test starts
torch.set_num_threads(1)

PROJECT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str, module_name: str):
    """A script of benchmarks/ imported as a module, for tests of its functions."""
    spec = importlib.util.spec_from_file_location(module_name, PROJECT / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def make_project_copy(target: Path) -> Path:
    """Copy what ``kedro run`` needs (conf, pyproject, telemetry consent) and empty data folders."""
    shutil.copytree(PROJECT / "conf", target / "conf", ignore=shutil.ignore_patterns("local"))
    (target / "conf" / "local").mkdir()
    (target / "src").mkdir()  # kedro insists on a source folder; the package is installed
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy(PROJECT / name, target / name)
    for layer in sorted((PROJECT / "data").iterdir()):
        if layer.is_dir():
            (target / "data" / layer.name).mkdir(parents=True)
    return target


def run_kedro(project: Path, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``kedro run ARGS`` in ``project`` in a fresh interpreter; fail with its output."""
    # wide COLUMNS: rich wraps log lines at the terminal width, splitting the messages tests check
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "2000"}
    proc = subprocess.run(
        [sys.executable, "-m", "kedro", "run", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"kedro run {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture
def kedro_project(tmp_path: Path) -> Path:
    """A fresh copy of the project in a temporary folder."""
    return make_project_copy(tmp_path / "project")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep each test file on one xdist worker (``--dist loadgroup``), so its module-scoped fixtures
    (a trained model, a finished ``kedro run``) are built once, and keep the files that share the
    session's twin ``kedro run``s (tests/reliability/conftest.py) on one worker with them."""
    files_with_twins = {item.path for item in items if "twin_runs" in item.fixturenames}
    for item in items:
        group = "twin_runs" if item.path in files_with_twins else str(item.path.relative_to(PROJECT))
        item.add_marker(pytest.mark.xdist_group(group))
