"""Which MLflow runs count as abandoned: only those whose owner process on this host is gone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from cimd_pipeline.hooks import MlflowRunOwnerHook
from cimd_pipeline.mlflow_runs import (
    TAG_HOST,
    TAG_PID,
    TAG_START,
    close_dead_runs,
    is_alive,
    owner_tags,
    process_start,
)
from tests.reliability.conftest import require_tool


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_liveness_sees_dead_zombie_and_reused_pids():
    me = owner_tags()
    assert me[TAG_HOST] == socket.gethostname() and is_alive(os.getpid(), me.get(TAG_START))
    assert not is_alive(_dead_pid(), None)
    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = process_start(zombie.pid)
        assert is_alive(zombie.pid, start)
        os.kill(zombie.pid, signal.SIGKILL)
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # dead, not yet reaped
        assert not is_alive(zombie.pid, start)
    finally:
        zombie.kill()
        zombie.wait()
    if start is not None:  # Linux: a live process with another start time is a reused PID
        assert not is_alive(os.getpid(), start)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the module: creating its tables takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def tracking(store, tmp_path, request):
    """A fresh experiment in `store`, set as MLflow's global tracking target for the test."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store)
    experiment = mlflow.create_experiment(request.node.name, artifact_location=str(tmp_path / "artefacts"))
    # Earlier tests in the same process may have set another active experiment, which
    # mlflow.start_run(run_id=...) would refuse to resume a run from.
    mlflow.set_experiment(experiment_id=experiment)
    yield experiment
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)


def test_only_dead_owners_on_this_host_lose_their_runs(tracking):
    client = MlflowClient()
    experiment = tracking
    host = socket.gethostname()
    owners = {
        "dead": {TAG_HOST: host, TAG_PID: str(_dead_pid())},
        "alive": owner_tags(),
        "elsewhere": {TAG_HOST: f"not-{host}", TAG_PID: str(_dead_pid())},
        "untagged": {},
        "current": {TAG_HOST: host, TAG_PID: str(_dead_pid())},
    }
    ids = {
        name: client.create_run(experiment, tags=tags, run_name=name).info.run_id
        for name, tags in owners.items()
    }
    assert close_dead_runs(client, experiment, ids["current"]) == [ids["dead"]]
    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {"dead": "KILLED", **{name: "RUNNING" for name in owners if name != "dead"}}


def test_run_open_at_exit_is_marked_killed_not_finished(tracking):
    """Ctrl-C: neither after_pipeline_run nor on_pipeline_error runs before the exit handler."""
    hook = MlflowRunOwnerHook()
    run = mlflow.start_run(experiment_id=tracking)
    hook.before_pipeline_run(run_params={}, pipeline=None, catalog=None)
    assert mlflow.get_run(run.info.run_id).data.tags[TAG_PID] == str(os.getpid())
    mlflow.start_run(run_id=run.info.run_id, nested=True)  # as kedro-mlflow does before each node
    hook._close_interrupted_run()
    assert mlflow.active_run() is None and mlflow.get_run(run.info.run_id).info.status == "KILLED"


def test_run_closed_by_the_pipeline_is_left_alone_at_exit(tracking):
    hook = MlflowRunOwnerHook()
    run = mlflow.start_run(experiment_id=tracking)
    hook.before_pipeline_run(run_params={}, pipeline=None, catalog=None)
    hook.after_pipeline_run(run_params={}, run_result={})
    hook._close_interrupted_run()  # a run the user opened before kedro stays theirs to close
    assert mlflow.active_run().info.run_id == run.info.run_id


def test_missing_browser_or_database_tool_skips_locally_but_fails_in_ci(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y chromium"):
        require_tool("chromium", "chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="chromium not found"):
        require_tool("chromium", "chromium")
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    assert require_tool("chromium", "chromium") == "/usr/bin/chromium"
