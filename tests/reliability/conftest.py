"""Helpers for the reliability tests: background ``kedro run``s, an offline guard, MLflow queries.

Subprocess runs inherit ``OMP_NUM_THREADS=1`` from tests/conftest.py: on a machine whose two cores
other jobs share, torch's default two threads spin against each other (measured: 1.6 s instead of
0.07 s per training step of the test model), and the determinism tests compare runs made with the
same thread count.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from tests.conftest import make_project_copy

EXPERIMENT = "cimd_pipeline"

# Loaded by every interpreter that has its folder on PYTHONPATH: refuses any connection that is
# not loopback or a unix socket, and any DNS lookup, and logs that it was active.
NETWORK_GUARD = textwrap.dedent(
    '''
    """No network for this interpreter (written by tests/reliability/conftest.py)."""
    import errno
    import os
    import socket

    _LOG = os.environ["NETWORK_GUARD_LOG"]
    _LOCAL = ("127.0.0.1", "::1", "localhost", None, "")


    def _note(line):
        with open(_LOG, "a") as handle:
            handle.write(f"{os.getpid()} {line}\\n")


    def _refuse(what):
        _note(f"blocked {what!r}")
        raise OSError(errno.ENETUNREACH, f"network access disabled by the test guard: {what!r}")


    def _guard(method):
        def guarded(sock, address, *args):
            host = address[0] if isinstance(address, tuple) else None
            if sock.family != socket.AF_UNIX and host not in _LOCAL:
                _refuse(address)
            return method(sock, address, *args)
        return guarded


    def _getaddrinfo(host, *args, _original=socket.getaddrinfo, **kwargs):
        if host not in _LOCAL:
            _refuse(host)
        return _original(host, *args, **kwargs)


    socket.socket.connect = _guard(socket.socket.connect)
    socket.socket.connect_ex = _guard(socket.socket.connect_ex)
    socket.getaddrinfo = _getaddrinfo
    _note("guard loaded")
    '''
)


def kedro_env(**extra: str) -> dict[str, str]:
    """Environment of a test ``kedro run`` (see the module docstring for the thread count)."""
    return {
        **os.environ,
        "KEDRO_DISABLE_TELEMETRY": "1",
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "2000",  # rich wraps log lines at the terminal width, splitting checked messages
        **extra,
    }


def offline_env(folder: Path) -> dict[str, str]:
    """A `kedro_env` whose interpreters load `NETWORK_GUARD`; attempts go to ``folder/network.log``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(NETWORK_GUARD)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return kedro_env(PYTHONPATH=path, NETWORK_GUARD_LOG=str(folder / "network.log"))


@dataclass
class KedroRun:
    """A ``kedro run`` started in the background; output goes to a log file, not a pipe."""

    project: Path
    process: subprocess.Popen
    log: Path

    def wait(self, timeout: float = 600) -> "KedroRun":
        self.process.wait(timeout=timeout)
        return self

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def check(self, timeout: float = 600) -> "KedroRun":
        """Wait and fail with the run's output unless it succeeded."""
        if self.wait(timeout).returncode != 0:
            raise AssertionError(f"kedro run failed ({self.returncode}):\n{self.output[-6000:]}")
        return self


def start_kedro(
    project: Path, *args: str, env: dict[str, str] | None = None, log: str = "kedro"
) -> KedroRun:
    """Start ``kedro run ARGS`` in ``project`` in its own process group (so it can be killed whole)."""
    path = project / f"{log}.log"
    with path.open("w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "kedro", "run", *args],
            cwd=project,
            env=env or kedro_env(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return KedroRun(project, process, path)


def wait_for(predicate, timeout: float, what: str, run: KedroRun | None = None, poll: float = 0.05):
    """Poll ``predicate()`` until it returns something truthy; fail early if ``run`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if run is not None and run.process.poll() is not None:
            raise AssertionError(f"kedro run ended before {what}:\n{run.output[-6000:]}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def mlflow_client(project: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def runs_of(project: Path) -> list[Run]:
    """The project's MLflow runs, oldest first."""
    client = mlflow_client(project)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return list(client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]))


@dataclass
class TwinRuns:
    """Two identical offline ``kedro run --env test`` in two fresh project copies."""

    projects: tuple[Path, Path]
    runs: tuple[KedroRun, KedroRun]
    guard_logs: tuple[Path, Path]


@pytest.fixture(scope="session")
def twin_runs(tmp_path_factory: pytest.TempPathFactory) -> TwinRuns:
    """Run the default chain twice, side by side, with network access disabled in both processes.

    Shared by the determinism tests (same seed and configuration, same results) and the offline
    test, so the cost of the two runs is paid once.
    """
    root = tmp_path_factory.mktemp("twins")
    projects = tuple(make_project_copy(root / name) for name in ("first", "second"))
    envs = [offline_env(root / f"guard_{name}") for name in ("first", "second")]
    runs = tuple(start_kedro(p, "--env", "test", env=e) for p, e in zip(projects, envs))
    for run in runs:
        run.wait()
    return TwinRuns(projects, runs, tuple(root / f"guard_{n}" / "network.log" for n in ("first", "second")))


def require_tool(name: str, package: str) -> str:
    """Path of the executable ``name``; skip without it, but FAIL in CI (``CI=true``), whose
    ``.ci/run`` installs the Debian ``package`` that provides it."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found: install Debian's {package} (apt-get install -y {package})"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path


#: The second run of `labelled_runs`: another variant, trained on other data, for fewer steps.
OTHER_RUN_PARAMS = "model.variant=ddpm_det,ingestion.seed=1,training.max_steps=6"


@pytest.fixture(scope="session")
def labelled_runs(twin_runs: TwinRuns, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose MLflow store holds the first twin's run (cimd_aa, ingestion seed 0) and
    a ``kedro run --env test`` of another variant on other data (`OTHER_RUN_PARAMS`).

    The twin's store is copied, not shared, so the determinism tests keep their one-run stores.
    """
    twin_runs.runs[0].check()
    project = make_project_copy(tmp_path_factory.mktemp("labelled") / "project")
    shutil.copy(twin_runs.projects[0] / "mlflow.db", project / "mlflow.db")
    start_kedro(project, "--env", "test", "--params", OTHER_RUN_PARAMS, log="other").check()
    return project
