"""Project pipelines: every folder under ``pipelines/`` plus ``__default__`` (all of them)."""

from __future__ import annotations

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

DEFAULT_ORDER = ("data_ingestion", "mask_alignment", "training", "sampling", "evaluation")


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines; ``__default__`` chains the five main stages."""
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum(pipelines[name] for name in DEFAULT_ORDER if name in pipelines)
    return pipelines
