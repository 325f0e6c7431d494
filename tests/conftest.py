"""Shared fixtures: a throw-away copy of the Kedro project to run pipelines in."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]


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
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
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
