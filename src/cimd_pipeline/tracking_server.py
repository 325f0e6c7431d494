"""Talking to a shared MLflow tracking server (``conf/team``): its address, reachability, experiment.

A team server is named by an environment variable (never a committed file: the address may carry
a host name people should not see in the repository, and credentials travel as MLflow's own
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``). Two faults get a clear message before
kedro-mlflow touches the server: the variable is not set, or the server does not answer. Several
people starting their first run at once must not fail on creating the same experiment twice.
docs/scaling.md ("Team MLflow server") shows the server side.
"""

from __future__ import annotations

import os
import urllib.request

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cimd_pipeline.errors import ConfigError

#: Environment variable with the team server's address (MLflow's own name for it).
TRACKING_URI_VARIABLE = "MLFLOW_TRACKING_URI"


def required_env(name: str) -> str:
    """Value of the environment variable ``name``; a `ConfigError` saying how to set it if absent.

    Registered as the ``required_env`` resolver: ``${required_env:MLFLOW_TRACKING_URI}``.
    """
    value = os.environ.get(name, "").strip()
    if not value:
        raise ConfigError(
            f"environment variable {name} is not set: conf/team/mlflow.yml sends runs to the team "
            f"MLflow server at that address, e.g. export {name}=http://mlflow.example.org:5000 "
            "(docs/scaling.md, 'Team MLflow server')"
        )
    return value


def is_remote(uri: str | None) -> bool:
    return bool(uri) and str(uri).startswith(("http://", "https://"))


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Ask a tracking server's ``/health``; a `ConfigError` naming the address if it does not answer."""
    url = f"{uri.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = response.status
    except OSError as error:
        status = error
    if status != 200:
        raise ConfigError(
            f"MLflow tracking server {uri} is unreachable ({status}): check {TRACKING_URI_VARIABLE} "
            "and that `mlflow server` runs there (docs/scaling.md, 'Team MLflow server')"
        )


def ensure_experiment(
    client: MlflowClient, name: str, artifact_location: str | None = None, tags: dict | None = None
) -> str:
    """Id of experiment ``name``, created if missing; another process creating it first is fine."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location, tags=tags)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id
