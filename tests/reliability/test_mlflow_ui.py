"""Runs a person can tell apart: names, experiment kind and dataset inputs, through MLflow's API
and in ``mlflow ui`` in a real browser.

The MLflow UI is a JavaScript app, so the page is rendered by headless Chromium (Debian's
``chromium``, installed by ``.ci/run``); ``--virtual-time-budget`` lets its requests finish before
the DOM is dumped. The server gets one worker and no job runner (≈ 0.6 GB instead of ≈ 3.5 GB) and
is stopped by its process group in every case.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from cimd_pipeline.io.aligned_dataset import AlignedDataset
from cimd_pipeline.run_labels import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    RUNS_VIEW_QUERY,
    AlignedDatasetInput,
)
from tests.reliability.conftest import EXPERIMENT, mlflow_client, require_tool, runs_of, wait_for

pytestmark = pytest.mark.slow

NAMES = ["cimd_aa · test/synthetic · seed 0 · 12 steps", "ddpm_det · test/synthetic · seed 0 · 6 steps"]


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
        require_tool("chromium", "chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--dump-dom", url,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True).stdout


def test_runs_are_named_by_what_differs_and_carry_their_dataset(labelled_runs):
    first, second = runs_of(labelled_runs)
    assert [first.info.run_name, second.info.run_name] == NAMES
    client = mlflow_client(labelled_runs)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    inputs = [run.inputs.dataset_inputs for run in (first, second)]
    assert [len(i) for i in inputs] == [1, 1]
    datasets = [i[0].dataset for i in inputs]
    assert [d.name for d in datasets] == ["test/synthetic aligned"] * 2
    assert datasets[0].digest != datasets[1].digest  # ingestion seeds 0 and 1
    assert [t.value for i in inputs for t in i[0].tags if t.key == "mlflow.data.context"] == ["aligned"] * 2
    # the second run's input describes the aligned data on disk: same digest, its split sizes
    aligned = labelled_runs / "data" / "03_primary" / "aligned"
    data = AlignedDataset(str(aligned)).load()
    assert datasets[1].digest == AlignedDatasetInput(data, aligned, "x").digest
    splits = data.cases["split"].value_counts()
    profile = json.loads(datasets[1].profile)
    assert profile == {"cases": 40, "train": splits["train"], "val": splits["val"], "test": splits["test"],
                       "raters": 4, "channels": 1, "image_size": "16x16"}
    assert json.loads(datasets[1].source) == {"uri": str(aligned.resolve())}
    # runs on the same data are found by its digest
    found = client.search_runs([experiment.experiment_id], f"dataset.digest = '{datasets[1].digest}'")
    assert [r.info.run_id for r in found] == [second.info.run_id]


@pytest.mark.ui
def test_mlflow_ui_opens_the_experiment_on_its_runs_list_in_headless_chromium(labelled_runs, tmp_path):
    project = labelled_runs
    runs = runs_of(project)
    experiment_id = runs[0].info.experiment_id
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
        search = _get(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})
        assert {r["info"]["run_id"] for r in json.loads(search)["runs"]} == {r.info.run_id for r in runs}
        # the link README gives: the experiment in the model-training view
        dom = _render(f"{base}/#/experiments/{experiment_id}?{RUNS_VIEW_QUERY}", tmp_path / "chromium")
        # it lands on the runs table: every run's name, linked to its page, and the dataset column
        for run in runs:
            assert run.info.run_name in dom and f"runs/{run.info.run_id}" in dom, dom[-3000:]
        assert "test/synthetic aligned" in dom, dom[-3000:]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
