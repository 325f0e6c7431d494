"""A team MLflow server: ``mlflow server`` on a real PostgreSQL with a served artefact folder, two
``kedro run --env test`` with conf/team's tracking settings writing to it at once, and its UI.

PostgreSQL is Debian's (``postgresql``, installed by ``.ci/run``), started from its binaries in a
temporary folder; as root, its tools run as the ``postgres`` user, since ``initdb`` refuses root.
The database password is generated per test session and reaches the MLflow server through
``PGPASSWORD``, never on a command line or in a file of the project. Every process is started in
its own session and stopped by its process group.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cimd_pipeline.run_labels import RUNS_VIEW_QUERY
from tests.conftest import PROJECT, make_project_copy
from tests.reliability.conftest import (
    EXPERIMENT,
    OTHER_RUN_PARAMS,
    kedro_env,
    require_tool,
    start_kedro,
    wait_for,
)
from tests.reliability.test_mlflow_ui import _free_port, _get, _render

pytestmark = pytest.mark.slow


def _postgres_bin() -> Path:
    """Folder of Debian's PostgreSQL server binaries (the newest installed major version)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    return Path(require_tool("initdb", "postgresql")).parent  # skips without it, fails in CI


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class Postgres:
    uri: str  # without the password, which is in `password`
    password: str


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server on 127.0.0.1 with a password-protected database ``mlflow``."""
    binaries = _postgres_bin()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="cimd-postgres-"))
    password = secrets.token_hex(16)
    (folder / "password").write_text(password)
    if as_postgres:
        shutil.chown(folder, "postgres")
        shutil.chown(folder / "password", "postgres")
    def tool(name: str, *args: str) -> None:
        env = {**os.environ, "PGPASSWORD": password}
        subprocess.run([*as_postgres, str(binaries / name), *args], check=True, capture_output=True,
                       env=env, cwd=folder, timeout=120)
    tool("initdb", "-D", str(folder / "data"), "-U", "mlflow", "--auth=scram-sha-256",
         f"--pwfile={folder / 'password'}", "--no-sync", "-E", "UTF8")
    port = _free_port()
    log = (folder / "postgres.log").open("w")
    server = subprocess.Popen(
        [*as_postgres, str(binaries / "postgres"), "-D", str(folder / "data"), "-p", str(port),
         "-h", "127.0.0.1", "-k", str(folder), "-c", "fsync=off"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        def ready() -> bool:
            probe = subprocess.run([str(binaries / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                                   capture_output=True, check=False)
            if server.poll() is not None:
                raise AssertionError((folder / "postgres.log").read_text())
            return probe.returncode == 0
        wait_for(ready, 60, "PostgreSQL", poll=0.2)
        tool("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow")
        yield Postgres(f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow", password)
    finally:
        _stop(server)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class TeamServer:
    uri: str
    artefacts: Path


@pytest.fixture(scope="module")
def team_server(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeamServer]:
    """``mlflow server`` on the PostgreSQL store, serving artefacts from its own folder."""
    folder = tmp_path_factory.mktemp("team_server")
    port = _free_port()
    log = (folder / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres.uri,
         "--artifacts-destination", str(folder / "artefacts"), "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, "PGPASSWORD": postgres.password, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            if server.poll() is not None:
                raise AssertionError((folder / "server.log").read_text()[-4000:])
            return _get(f"{uri}/health") == "OK"
        wait_for(healthy, 240, "the MLflow server", poll=0.5)
        yield TeamServer(uri, folder / "artefacts")
    finally:
        _stop(server)
        log.close()


def _team_project(target: Path) -> Path:
    """A project copy whose `test` environment uses conf/team's tracking settings."""
    project = make_project_copy(target)
    shutil.copy(PROJECT / "conf" / "team" / "mlflow.yml", project / "conf" / "test" / "mlflow.yml")
    return project


@pytest.fixture(scope="module")
def team_runs(team_server: TeamServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two ``kedro run --env test`` against the team server, started at once, both on a new server."""
    root = tmp_path_factory.mktemp("team")
    projects = (_team_project(root / "first"), _team_project(root / "second"))
    env = kedro_env(MLFLOW_TRACKING_URI=team_server.uri)
    runs = [
        start_kedro(projects[0], "--env", "test", env=env),
        start_kedro(projects[1], "--env", "test", "--params", OTHER_RUN_PARAMS, env=env),
    ]
    for run in runs:
        run.check()
    return projects


def test_two_simultaneous_runs_reach_the_team_server_with_params_metrics_and_artefacts(team_server, team_runs):
    client = MlflowClient(tracking_uri=team_server.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], order_by=["params.`model.variant` ASC"])
    assert [r.data.params["model.variant"] for r in runs] == ["cimd_aa", "ddpm_det"]
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert [r.data.params["training.max_steps"] for r in runs] == ["12", "6"]
    for run, project in zip(runs, team_runs):
        local = json.loads((project / "data" / "08_reporting" / "metrics.json").read_text())
        assert run.data.metrics["test.ged"] == pytest.approx(local["ged"])
        assert len(client.get_metric_history(run.info.run_id, "train.loss")) >= 2
        # artefacts travel through the server into its folder, not into the project
        listed = {a.path for folder in ("reports", "figures") for a in client.list_artifacts(run.info.run_id, folder)}
        assert {"reports/metrics.json", "figures/sample_grid.png"} <= listed
        fetched = client.download_artifacts(run.info.run_id, "reports/metrics.json", str(project / "fetched"))
        assert json.loads(Path(fetched).read_text()) == local
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert not (project / "mlartifacts").exists() and not (project / "mlflow.db").exists()
    stored = {p.name for p in team_server.artefacts.rglob("metrics.json")}
    assert stored == {"metrics.json"} and len(list(team_server.artefacts.rglob("metrics.json"))) == 2


@pytest.mark.ui
def test_team_server_ui_lists_both_runs_in_headless_chromium(team_server, team_runs, tmp_path):
    client = MlflowClient(tracking_uri=team_server.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    dom = _render(f"{team_server.uri}/#/experiments/{experiment.experiment_id}?{RUNS_VIEW_QUERY}", tmp_path / "chromium")
    for run in runs:
        assert run.info.run_name in dom and f"runs/{run.info.run_id}" in dom, dom[-3000:]


def test_missing_address_or_unreachable_server_stops_the_run_before_any_data(tmp_path):
    project = _team_project(tmp_path / "project")
    without = {k: v for k, v in kedro_env().items() if k != "MLFLOW_TRACKING_URI"}
    missing = start_kedro(project, "--env", "test", env=without, log="missing").wait(300)
    assert missing.returncode != 0
    assert "environment variable MLFLOW_TRACKING_URI is not set" in missing.output, missing.output[-3000:]
    closed = f"http://127.0.0.1:{_free_port()}"
    unreachable = start_kedro(project, "--env", "test", env=kedro_env(MLFLOW_TRACKING_URI=closed), log="closed").wait(300)
    assert unreachable.returncode != 0
    assert f"MLflow tracking server {closed} is unreachable" in unreachable.output, unreachable.output[-3000:]
    assert not any((project / "data").rglob("*.*"))  # nothing ingested, nothing written
