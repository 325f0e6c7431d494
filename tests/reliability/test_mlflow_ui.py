"""``mlflow ui`` on the project's store shows a ``kedro run`` in a real browser.

The MLflow UI is a JavaScript app, so the page is rendered by headless Chromium (Debian's
``chromium``); ``--virtual-time-budget`` lets its requests finish before the DOM is dumped. The
server gets one worker and no job runner (≈ 0.6 GB instead of ≈ 3.5 GB) and is stopped by its
process group in every case.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.reliability.conftest import runs_of, wait_for

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.ui,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed"),
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str, data: dict | None = None) -> str | None:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return None


def _render(url: str, profile: Path) -> str:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--dump-dom", url,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True).stdout


def test_mlflow_ui_lists_the_kedro_run_in_headless_chromium(twin_runs, tmp_path):
    project = twin_runs.projects[0]
    twin_runs.runs[0].check()
    (run,) = runs_of(project)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "ui",
            "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: _get(f"{base}/health") == "OK", 180, "the MLflow server", poll=0.5)
        assert server.poll() is None
        search = _get(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [run.info.experiment_id]})
        assert [r["info"]["run_id"] for r in json.loads(search)["runs"]] == [run.info.run_id]
        dom = _render(f"{base}/#/experiments/{run.info.experiment_id}/runs", tmp_path / "chromium")
        # the runs table: the run's name, linked to its page
        assert run.info.run_name in dom and f"runs/{run.info.run_id}" in dom, dom[-3000:]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
