"""Nodes of the ``inference`` pipeline."""

from __future__ import annotations

from typing import Any

import pandas as pd

from cimd_pipeline.errors import ConfigError
from cimd_pipeline.inference import InferenceParams, run_inference
from cimd_pipeline.models.trained import TrainedModel
from cimd_pipeline.training.loop import select_device


def predict_images(trained_model: TrainedModel, inference: dict[str, Any]) -> pd.DataFrame:
    """Sample masks and uncertainty maps for every image under ``inference.input``.

    The per-image files go to ``inference.output`` (a parameter, so that each batch of scans can
    get its own folder); the returned table, one row per input, is the run's record in MLflow.
    """
    params = InferenceParams.parse(inference)
    timesteps = trained_model.params.num_timesteps
    if params.steps > timesteps:
        raise ConfigError(f"inference.steps: {params.steps} exceeds the model's num_timesteps={timesteps}")
    return run_inference(trained_model, params, select_device(params.device))
