"""Score a `SampleSet` against every rater of its cases: per-case table and aggregate summary.

On the synthetic benchmark each case also carries fresh draws from its true rater model; their
GED against the same raters (``ged_oracle``) is the floor a perfect model reaches with the same
N and R, printed beside the model's GED so that "0.2" can be read as good or bad. It uses the
first N oracle draws; when fewer were generated (``ingestion.synthetic.oracle_samples`` < N) it
uses them all, says so in the log, and ``ged_oracle_samples`` records the exact count (GED
grows as the count shrinks, so such a floor is too high).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import torch

from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.ensembles import SampleSet
from cimd_pipeline.metrics import METRIC_KEYS, evaluate_batch, ged_floor
from cimd_pipeline.uncertainty import bootstrap_intervals, interval_columns

logger = logging.getLogger(__name__)

#: Every per-case metric but ``d_max``, which is ``dice_max`` under its CI-score name.
SUMMARY_KEYS = tuple(k for k in METRIC_KEYS if k != "d_max")
#: From this many samples per image on, GED over the first 16 and the first 100 (``ged16``,
#: ``ged100``) is reported beside ``ged``: GED grows as the sample count shrinks, and papers
#: report both GED16 and GED100.
GED16_FROM = 100
#: Sample counts of the published GED figures; the perfect-sampler floor is reported for each
#: (``ged_floor_16``, ``ged_floor_100``) beside ``ged_floor`` for the N actually drawn.
PUBLISHED_N = (16, 100)
FLOOR_COLUMNS = tuple(f"ged_floor_{k}" for k in PUBLISHED_N)


def rows_for(case_ids: np.ndarray, data: AlignedSet) -> np.ndarray:
    """Row of each case id in ``data``; ValueError naming the ids it does not hold."""
    position = pd.Series(np.arange(len(data)), index=data.cases["case_id"].to_numpy())
    missing = [c for c in case_ids if c not in position.index]
    if missing:
        raise ValueError(f"samples for cases not in the aligned dataset: {missing[:5]}")
    return position.loc[list(case_ids)].to_numpy()


def score_samples(
    samples: SampleSet, data: AlignedSet, chunk: int = 64, device: str | torch.device = "cpu"
) -> pd.DataFrame:
    """One row per sampled case: ids, metadata, every metric, the perfect-sampler floor for 16
    and 100 samples (``ged_floor_16``, ``ged_floor_100``), ``ged_oracle`` where known, and
    ``ged16`` / ``ged100`` (GED of the first 16 / 100 samples) when at least `GED16_FROM`
    samples were drawn."""
    rows = rows_for(samples.case_ids, data)
    n = samples.binary.shape[1]
    records: list[dict[str, Any]] = []
    for start in range(0, len(rows), chunk):
        index = rows[start : start + chunk]
        raters = torch.as_tensor(np.asarray(data.masks[index]), device=device)
        valid = torch.as_tensor(np.asarray(data.rater_valid[index]), device=device)
        drawn = torch.as_tensor(samples.binary[start : start + chunk], device=device)
        scores = evaluate_batch(drawn, raters, valid, PUBLISHED_N if n >= GED16_FROM else ())
        for score, m in zip(scores, valid.sum(1).tolist()):
            for k in PUBLISHED_N:
                score[f"ged_floor_{k}"] = ged_floor(score["rater_distance"], k, m)
        if data.oracle is not None:
            oracle = torch.as_tensor(np.asarray(data.oracle[index])[:, :n], device=device)
            for score, truth in zip(scores, evaluate_batch(oracle, raters, valid)):
                score["ged_oracle"] = truth["ged"]
                score["ged_cross_oracle"] = truth["ged_cross"]
                score["diversity_oracle"] = truth["diversity_samples"]
                score["ged_oracle_samples"] = oracle.shape[1]
        records.extend(scores)
    if data.oracle is not None:
        drawn = min(n, int(data.oracle.shape[1]))
        log = logger.warning if drawn < n else logger.info
        log("ged_oracle from %d oracle draws per case against GED from %d samples", drawn, n)
    table = data.cases.iloc[rows].reset_index(drop=True).drop(columns=["split"], errors="ignore")
    return pd.concat([table, pd.DataFrame(records)], axis=1)


def summarise(
    per_case: pd.DataFrame, info: dict[str, Any], resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Aggregate means (over test images), each with its bootstrap 95 % interval over images
    (``<metric>_low95`` / ``<metric>_high95``, `cimd_pipeline.uncertainty`; ``resamples`` and
    ``seed`` fix it), plus the run's settings, as written to metrics.json."""
    summary: dict[str, Any] = {k: float(per_case[k].mean()) for k in SUMMARY_KEYS}
    # The floor is undefined for a case with fewer than two valid raters: it is left out of the
    # floor's mean (pandas skips NaN), and the count of cases that have one is reported.
    summary["ged_floor_cases"] = int(per_case["ged_floor"].notna().sum())
    if not summary["ged_floor_cases"]:  # no NaN in metrics.json: the floor is simply absent
        per_case = per_case.drop(columns=["rater_distance", "ged_floor", *FLOOR_COLUMNS])
        for key in ("rater_distance", "ged_floor"):
            del summary[key]
    for optional in ("ged16", "ged100", *FLOOR_COLUMNS, "ged_oracle", "ged_cross_oracle",
                     "diversity_oracle"):
        if optional in per_case:
            summary[optional] = float(per_case[optional].mean())
    if "ged_oracle_samples" in per_case:
        summary["ged_oracle_samples"] = int(per_case["ged_oracle_samples"].min())
    if "family" in per_case:
        for family, group in per_case.groupby("family"):
            for k in ("ged", "ged_floor", "hm_iou", "dice_max", "ci", "ci_var", "ged_oracle"):
                if k in group and group[k].notna().any():
                    summary[f"{k}_{family}"] = float(group[k].mean())
    overall = [k for k in (*SUMMARY_KEYS, "ged16", "ged100", *FLOOR_COLUMNS, "ged_oracle") if k in summary]
    summary |= interval_columns(bootstrap_intervals(per_case, overall, resamples, seed))
    summary["bootstrap_resamples"] = resamples
    summary["test_cases"] = len(per_case)
    summary.update(info)
    return summary


def to_mlflow_metrics(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The numeric entries of a summary in kedro-mlflow's ``{name: {value, step}}`` form."""
    return {
        k: {"value": float(v), "step": 0}
        for k, v in summary.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }

