"""Kedro project settings: hooks, config loader and the ``project_root`` resolver.

The resolver anchors ``sqlite:///${project_root:}/mlflow.db`` and artefact folders at the project
root, so running from another directory never scatters a second MLflow store.
"""

from pathlib import Path

from kedro.config import OmegaConfigLoader

from cimd_pipeline.hooks import MlflowRunLabelHook, MlflowRunOwnerHook, ParameterValidationHook


def _project_root() -> str:
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").exists() and (folder / "conf").is_dir():
            return str(folder)
    return str(here)


# Called last-registered first: the MLflow hooks tag and name the run before validation can fail it.
HOOKS = (ParameterValidationHook(), MlflowRunLabelHook(), MlflowRunOwnerHook())

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "custom_resolvers": {"project_root": _project_root},
    # Environments (conf/test, conf/lidc, ...) override single keys, not whole parameter blocks.
    "merge_strategy": {"parameters": "soft", "catalog": "soft"},
}
