"""Apply a trained model to new, unlabelled images: samples, mean and uncertainty maps.

Importing this package needs no Kedro: ``nodes`` holds plain functions (a GPU node with only
torch can call them), and the Kedro pipeline is built, with Kedro imported, when Kedro asks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kedro.pipeline import Pipeline


def create_pipeline(**kwargs: Any) -> Pipeline:
    """The Kedro pipeline of ``pipeline.py`` (found by `kedro.framework.project.find_pipelines`)."""
    from cimd_pipeline.pipelines.inference.pipeline import create_pipeline as create

    return create(**kwargs)


__all__ = ["create_pipeline"]
