"""Score any model's samples against multi-rater masks: metrics, per-case table, figures, MLflow.

The ``evaluation`` pipeline and the command ``cimd-pipeline evaluate`` run this same code, so a
number from either compares with the other. Without a Kedro project::

    from cimd_pipeline.evaluate import evaluate

    result = evaluate("my_samples/", "LIDC-IDRI-slices/", out="scores/")
    result.summary["ged"], result.per_case.head()

``samples`` is any format of `cimd_pipeline.data.external_samples`; ``raters`` an aligned dataset
or a rater tree (`cimd_pipeline.data.rater_sets`). Sample case ids must equal the raters' case ids
(for a folder of PNGs: the case folder's path below the samples folder). MLflow is imported only
when a run is logged, so the ``evaluation`` nodes import on a machine without it.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.data.external_samples import ExternalSamples, match_to_raters, read_samples
from cimd_pipeline.data.rater_sets import LEFT_OUT, load_raters
from cimd_pipeline.io.atomic import atomic_write
from cimd_pipeline.plots import metric_histograms, sample_grids
from cimd_pipeline.scoring import score_samples, summarise, to_mlflow_metrics
from cimd_pipeline.uncertainty import (
    HIGHER_IS_BETTER,
    LOWER_IS_BETTER,
    comparison_table,
    paired_comparison,
)

logger = logging.getLogger(__name__)

#: What `write_outputs` writes, as the ``evaluation`` pipeline's catalog names its files.
SUMMARY_FILE = "metrics.json"
PER_CASE_FILE = "per_case_metrics.csv"
SAMPLE_GRID_FILE = "sample_grid.png"
HISTOGRAM_FILE = "metric_histograms.png"
#: With a second sample set: the paired comparison, and the second set's own outputs in a folder.
COMPARISON_FILE = "comparison.csv"
COMPARED_FOLDER = "compared"
#: MLflow metrics of the paired comparison: ``paired.ged_difference``, ``paired.ged_low95`` ...
PAIRED_PREFIX = "paired"
#: The experiment conf/base/mlflow.yml names, so standalone scores sit beside pipeline runs;
#: MLFLOW_EXPERIMENT_NAME overrides it.
EXPERIMENT = "cimd_pipeline"
#: kedro-mlflow's prefix of the evaluation metrics (conf/base/catalog.yml ``evaluation_metrics``).
METRIC_PREFIX = "test"


@dataclass
class Evaluation:
    """What one evaluation produced.

    Attributes:
        summary: aggregate metrics and settings (the content of metrics.json).
        per_case: one row per scored case: ids, metadata and every metric.
        figures: file name -> figure (the sample grid and the metric histograms).
        run_id: the MLflow run it was logged in, if any.
        compared: the second sample set's evaluation, when one was compared.
        comparison: per metric, the paired difference (this set - the second), its 95 %
            interval, the cases and which set is better (`cimd_pipeline.uncertainty`).
    """

    summary: dict[str, Any]
    per_case: pd.DataFrame
    figures: dict[str, Figure] = field(default_factory=dict)
    run_id: str | None = None
    compared: Evaluation | None = None
    comparison: pd.DataFrame | None = None


def sample_grid_figure(samples: Any, data: AlignedSet, figure_cases: int) -> Figure:
    """Sample grids for a spread of scored cases (first, last and evenly between)."""
    lookup = pd.Series(np.arange(len(data)), index=data.cases["case_id"].to_numpy())
    count = min(figure_cases, len(samples.case_ids))
    picks = np.unique(np.linspace(0, len(samples.case_ids) - 1, max(count, 1)).astype(int))
    entries = []
    for i in picks:
        row = int(lookup[samples.case_ids[i]])
        raters = np.asarray(data.masks[row])[np.asarray(data.rater_valid[row])]
        family = data.cases.iloc[row].get("family", "")
        label = f"{samples.case_ids[i]} {family if isinstance(family, str) else ''}".strip()
        entries.append((np.asarray(data.images[row]), raters, samples.binary[i], label))
    return sample_grids(entries)


def metric_histogram_figure(per_case: pd.DataFrame) -> Figure:
    """Histograms of the per-case metrics."""
    columns = [c for c in ("ged", "ged_oracle", "hm_iou", "dice_max", "ci") if c in per_case]
    return metric_histograms(per_case, columns)


def score(samples: Any, data: AlignedSet, info: dict[str, Any], figure_cases: int = 4) -> Evaluation:
    """Score ``samples`` (a `SampleSet` or `ExternalSamples` of cases in ``data``) against every
    valid rater: the summary (``info`` added), the per-case table and the figures."""
    per_case = score_samples(samples, data)
    summary = summarise(per_case, {"num_samples": int(samples.binary.shape[1]), **info})
    figures = {HISTOGRAM_FILE: metric_histogram_figure(per_case)}
    if figure_cases > 0:
        figures[SAMPLE_GRID_FILE] = sample_grid_figure(samples, data, figure_cases)
    return Evaluation(summary, per_case, figures)


def matched_samples(
    samples: ExternalSamples,
    data: AlignedSet,
    resize: bool = False,
    only_sampled: bool = False,
) -> tuple[ExternalSamples, AlignedSet]:
    """The samples of ``data``'s cases at the raters' size, and the rater cases they cover."""
    matched = match_to_raters(
        samples, list(data.cases["case_id"]), data.masks.shape[2:], resize=resize, allow_missing=only_sampled
    )
    if len(matched.case_ids) < len(data):
        rows = pd.Series(np.arange(len(data)), index=data.cases["case_id"].to_numpy())
        data = data.take(rows.loc[list(matched.case_ids)].to_numpy())
    return matched, data


def compare(a: Evaluation, b: Evaluation, seed: int = 0) -> pd.DataFrame:
    """Paired bootstrap comparison of two evaluations on the same cases: a - b per metric with a
    better direction (GED lower; HM-IoU, Dice_max, CI higher)."""
    keys = [k for k in a.per_case if k in b.per_case and k in LOWER_IS_BETTER | HIGHER_IS_BETTER]
    return comparison_table(paired_comparison(a.per_case, b.per_case, keys, seed=seed))


def write_outputs(result: Evaluation, out: str | Path, dpi: int = 100) -> list[Path]:
    """Write metrics.json, the per-case CSV and the figures into ``out``, each file atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / SUMMARY_FILE, out / PER_CASE_FILE]
    atomic_write(written[0], lambda tmp: tmp.write_text(json.dumps(result.summary, indent=2)))
    atomic_write(written[1], lambda tmp: result.per_case.to_csv(tmp, index=False))
    for name, figure in result.figures.items():
        atomic_write(out / name, lambda tmp, f=figure: f.savefig(tmp, dpi=dpi, format="png"))
        written.append(out / name)
    if result.comparison is not None:
        written.append(out / COMPARISON_FILE)
        atomic_write(written[-1], lambda tmp: result.comparison.to_csv(tmp, index=False))
    if result.compared is not None:
        written += write_outputs(result.compared, out / COMPARED_FOLDER, dpi)
    return written


def log_result(result: Evaluation, params: dict[str, Any]) -> None:
    """Into the active MLflow run: the parameters, the ``test.*`` metrics, metrics.json, the
    per-case table and the figures (where the ``evaluation`` pipeline's catalog puts them)."""
    import mlflow

    mlflow.log_params({k: str(v) for k, v in params.items()})
    metrics = to_mlflow_metrics(result.summary)
    mlflow.log_metrics({f"{METRIC_PREFIX}.{k}": v["value"] for k, v in metrics.items()})
    mlflow.log_dict(result.summary, f"reports/{SUMMARY_FILE}")
    table = io.StringIO()
    result.per_case.to_csv(table, index=False)
    mlflow.log_text(table.getvalue(), f"reports/{PER_CASE_FILE}")
    for name, figure in result.figures.items():
        mlflow.log_figure(figure, f"figures/{name}")
    if result.comparison is not None:
        mlflow.log_text(result.comparison.to_csv(index=False), f"reports/{COMPARISON_FILE}")
        for row in result.comparison.itertuples():
            for part, name in (("difference", "difference"), ("low", "low95"), ("high", "high95")):
                mlflow.log_metric(f"{PAIRED_PREFIX}.{row.metric}_{name}", getattr(row, part))
    if result.compared is not None:
        metrics = to_mlflow_metrics(result.compared.summary)
        mlflow.log_metrics({f"{COMPARED_FOLDER}.{k}": v["value"] for k, v in metrics.items()})


@contextmanager
def tracked_run(uri: str | None, run_name: str | None) -> Iterator[str | None]:
    """An MLflow run with system metrics at ``uri`` (its id), or nothing when ``uri`` is None."""
    if not uri:
        yield None
        return
    import mlflow

    from cimd_pipeline.system_metrics import system_metrics

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT)
    run = mlflow.start_run(run_name=run_name or "evaluate", log_system_metrics=False)
    with run, system_metrics(run.info.run_id):
        yield run.info.run_id
    logger.info("MLflow run %s at %s", run.info.run_id, uri)


def evaluate(
    samples: str | Path,
    raters: str | Path,
    out: str | Path | None = None,
    *,
    split: str = "test",
    resize: bool = False,
    threshold: float | None = None,
    only_sampled: bool = False,
    reader_options: dict[str, Any] | None = None,
    figure_cases: int = 4,
    tracking_uri: str | None = None,
    run_name: str | None = None,
    compare_with: str | Path | None = None,
) -> Evaluation:
    """Score the samples at ``samples`` against the raters at ``raters``.

    Every input is read and checked before anything is written, so a bad file leaves ``out`` and
    the tracking store as they were.

    Args:
        samples: ``.npz``/``.npy`` file, folder of per-case PNG folders, or NIfTI file(s).
        raters: an aligned dataset folder (its ``split`` is scored) or a rater tree (all cases).
        out: folder for metrics.json, per_case_metrics.csv and the figures; None writes nothing.
        resize: resize samples of another size than the raters (nearest neighbour) instead of
            refusing them.
        threshold: binarise soft samples at ``value > threshold``; None requires binary masks.
        only_sampled: score the rater cases that have samples instead of refusing missing ones.
        reader_options: ``folders`` reader options for a rater tree that is not LIDC's slice tree.
        figure_cases: cases shown in the sample grid (0: none).
        tracking_uri: MLflow tracking URI; None uses MLFLOW_TRACKING_URI, and without either
            nothing is logged.
        compare_with: a second sample set (same formats) for the same cases: it is scored too,
            and the paired comparison (samples - compare_with, bootstrap 95 % interval) is
            returned in ``comparison`` and written to comparison.csv.

    Returns:
        The summary, the per-case table and the figures.

    Raises:
        DataError: a file that cannot be scored, named with the problem.
    """
    read = read_samples(samples, threshold=threshold)
    wanted = list(read.case_ids) if only_sampled else None
    data = load_raters(raters, split=split, reader_options=reader_options, case_ids=wanted)
    matched, data = matched_samples(read, data, resize=resize, only_sampled=only_sampled)
    matched.info["rater_cases_without_samples"] += data.cases.attrs.get(LEFT_OUT, 0)
    other = None
    if compare_with is not None:
        other, _ = matched_samples(read_samples(compare_with, threshold=threshold), data, resize=resize)
    params = {"samples": str(samples), "raters": str(raters), "split": split, "resize": resize,
              "threshold": threshold, "num_samples": int(matched.binary.shape[1]),
              "compare_with": None if compare_with is None else str(compare_with)}
    with tracked_run(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"), run_name) as run_id:
        result = score(matched, data, {**matched.info, "raters_path": str(raters)}, figure_cases)
        result.run_id = run_id
        if other is not None:
            result.compared = score(other, data, {**other.info, "raters_path": str(raters)}, 0)
            result.comparison = compare(result, result.compared)
        if out is not None:
            for path in write_outputs(result, out):
                logger.info("wrote %s", path)
        if run_id is not None:
            log_result(result, params)
    return result
