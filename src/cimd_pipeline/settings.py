"""Kedro project settings: hooks, config loader and the ``project_root``/``required_env`` resolvers.

The resolver anchors ``sqlite:///${project_root:}/mlflow.db`` and artefact folders at the project
root, so running from another directory never scatters a second MLflow store.
"""

import os
from pathlib import Path

from kedro.config import OmegaConfigLoader

from cimd_pipeline.hooks import (
    ExternalSamplesHook,
    MlflowRunLabelHook,
    MlflowRunOwnerHook,
    ParameterValidationHook,
    SystemMetricsHook,
    TrackingServerHook,
)
from cimd_pipeline.tracking_server import required_env


def _project_root() -> str:
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").exists() and (folder / "conf").is_dir():
            return str(folder)
    return str(here)


# Called last-registered first: the MLflow hooks tag and name the run before validation can fail it,
# and external samples are wired in after it. TrackingServerHook runs first of all (tryfirst),
# before kedro-mlflow connects.
HOOKS = (
    ExternalSamplesHook(),
    ParameterValidationHook(),
    MlflowRunLabelHook(),
    MlflowRunOwnerHook(),
    SystemMetricsHook(),
    TrackingServerHook(),
)

# Under torchrun (docs/scaling.md) only rank 0 tracks the run in MLflow; the other ranks train
# or sample their share and leave before any output is written.
if int(os.environ.get("RANK", "0")) > 0:
    DISABLE_HOOKS_FOR_PLUGINS = ("kedro-mlflow",)

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # ${required_env:NAME}: conf/team/mlflow.yml's server address, a clear error when unset
    "custom_resolvers": {"project_root": _project_root, "required_env": required_env},
    # Environments (conf/test, conf/lidc, conf/team ...) override single keys, not whole blocks.
    "merge_strategy": {"parameters": "soft", "catalog": "soft", "mlflow": "soft"},
}
