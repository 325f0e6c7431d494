"""Nodes of the ``evaluation`` pipeline: glue around `cimd_pipeline.evaluate`."""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from cimd_pipeline.config import EvaluationParams
from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.data.external_samples import ExternalSamples
from cimd_pipeline.data.rater_sets import ALL
from cimd_pipeline.ensembles import SampleSet
from cimd_pipeline.evaluate import matched_samples, metric_histogram_figure, sample_grid_figure
from cimd_pipeline.models.trained import TrainedModel
from cimd_pipeline.scoring import score_samples, summarise, to_mlflow_metrics


def samples_to_score(
    samples: SampleSet | ExternalSamples, data: AlignedSet, evaluation: dict[str, Any]
) -> SampleSet | ExternalSamples:
    """The sampling pipeline's samples as drawn; samples read from ``evaluation.samples``
    matched to the raters of ``evaluation.split`` (every case needs samples, sizes must agree)."""
    if not isinstance(samples, ExternalSamples):
        return samples
    params = EvaluationParams.model_validate(evaluation)
    raters = data if params.split == ALL else data.subset(params.split)
    return matched_samples(samples, raters, resize=params.resize)[0]


def evaluate_samples(
    samples: SampleSet | ExternalSamples, data: AlignedSet, trained_model: TrainedModel | None
) -> tuple[dict[str, Any], pd.DataFrame, dict[str, dict[str, float]]]:
    """metrics.json content, the per-case table, and the numeric summary for MLflow.

    ``trained_model`` is None for samples drawn elsewhere (``evaluation.samples``)."""
    per_case = score_samples(samples, data)
    info: dict[str, Any] = {"num_samples": int(samples.binary.shape[1])}
    if isinstance(samples, ExternalSamples):
        info.update(samples.info)
    else:
        info.update(
            sampling_method=samples.info.get("method"),
            sampling_steps=int(samples.info.get("steps", 0)),
            sampling_seconds=float(samples.info.get("seconds", float("nan"))),
        )
    if trained_model is not None:
        info.update(
            variant=trained_model.model.get("variant"),
            train_steps=int(trained_model.info.get("steps", 0)),
            train_seconds=float(trained_model.info.get("train_seconds", float("nan"))),
        )
    summary = summarise(per_case, info)
    return summary, per_case, to_mlflow_metrics(summary)


def plot_samples(samples: SampleSet | ExternalSamples, data: AlignedSet, evaluation: dict[str, Any]) -> Figure:
    """Sample grids for a spread of test cases: the most and least ambiguous and some between."""
    return sample_grid_figure(samples, data, EvaluationParams.model_validate(evaluation).figure_cases)


def plot_metric_distribution(per_case: pd.DataFrame) -> Figure:
    """Histograms of the per-case metrics."""
    return metric_histogram_figure(per_case)
