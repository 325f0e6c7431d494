"""Nodes of the ``evaluation`` pipeline."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cimd_pipeline.config import EvaluationParams
from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.ensembles import SampleSet
from cimd_pipeline.models.trained import TrainedModel
from cimd_pipeline.plots import metric_histograms, sample_grids
from cimd_pipeline.scoring import score_samples, summarise, to_mlflow_metrics


def evaluate_samples(
    samples: SampleSet, data: AlignedSet, trained_model: TrainedModel
) -> tuple[dict[str, Any], pd.DataFrame, dict[str, dict[str, float]]]:
    """metrics.json content, the per-case table, and the numeric summary for MLflow."""
    per_case = score_samples(samples, data)
    info = {
        "num_samples": int(samples.binary.shape[1]),
        "sampling_method": samples.info.get("method"),
        "sampling_steps": int(samples.info.get("steps", 0)),
        "sampling_seconds": float(samples.info.get("seconds", float("nan"))),
        "variant": trained_model.model.get("variant"),
        "train_steps": int(trained_model.info.get("steps", 0)),
        "train_seconds": float(trained_model.info.get("train_seconds", float("nan"))),
    }
    summary = summarise(per_case, info)
    return summary, per_case, to_mlflow_metrics(summary)


def plot_samples(samples: SampleSet, data: AlignedSet, evaluation: dict[str, Any]) -> Figure:
    """Sample grids for a spread of test cases: the most and least ambiguous and some between."""
    params = EvaluationParams.model_validate(evaluation)
    lookup = pd.Series(np.arange(len(data)), index=data.cases["case_id"].to_numpy())
    count = min(params.figure_cases, len(samples.case_ids))
    picks = np.unique(np.linspace(0, len(samples.case_ids) - 1, max(count, 1)).astype(int))
    entries = []
    for i in picks:
        row = int(lookup[samples.case_ids[i]])
        raters = np.asarray(data.masks[row])[np.asarray(data.rater_valid[row])]
        family = data.cases.iloc[row].get("family", "")
        entries.append((np.asarray(data.images[row]), raters, samples.binary[i], f"{samples.case_ids[i]} {family}".strip()))
    return sample_grids(entries)


def plot_metric_distribution(per_case: pd.DataFrame) -> Figure:
    """Histograms of the per-case metrics."""
    columns = [c for c in ("ged", "ged_oracle", "hm_iou", "dice_max", "ci") if c in per_case]
    return metric_histograms(per_case, columns)
