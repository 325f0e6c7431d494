"""Bootstrap 95 % intervals of aggregate metrics over test cases, and paired comparisons.

A mean over a few hundred test images moves by more than the gap between two published methods
when the images are redrawn, so every aggregate comes with a percentile-bootstrap interval over
cases (resampling images with replacement; Efron & Tibshirani 1993, ch. 13), and two sample sets
scored on the *same* images are compared by bootstrapping the per-image differences: the
image-to-image spread, which both share, cancels, so a real difference shows long before the two
separate intervals stop overlapping. docs/metrics.md explains how to read both.

API (pure functions of per-case values; nothing here knows about Kedro or files):

* ``bootstrap_intervals(per_case, keys) -> {key: Interval(estimate, low, high)}``: the mean of
  each column over cases and its interval. NaN entries (e.g. the GED floor of an image with one
  rater) are left out of the mean, in the estimate and in every resample.
* ``interval_columns(intervals) -> {"<key>_low95": .., "<key>_high95": ..}``: flat entries for
  metrics.json and MLflow.
* ``paired_comparison(a, b, keys) -> {key: Comparison(difference, low, high, cases, better)}``:
  mean of a - b over the images both score, its interval, and ``better`` = "a", "b" or "neither"
  (the interval contains 0, or the metric has no better direction).
* ``comparison_table(comparisons) -> DataFrame``: one row per metric, for a report or CSV.

The resampling is seeded (``seed``), so the same inputs give the same intervals on every run;
``resamples`` (default 2,000) sets the Monte-Carlo error of the interval ends (about 0.5 % of the
interval's width for a 95 % interval at 2,000).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

__all__ = [
    "HIGHER_IS_BETTER",
    "LOWER_IS_BETTER",
    "Comparison",
    "Interval",
    "bootstrap_intervals",
    "comparison_table",
    "interval_columns",
    "paired_comparison",
]

#: Metrics where a smaller mean is the better model (the GED family: a distance).
LOWER_IS_BETTER = frozenset({"ged", "ged16", "ged100"})
#: Metrics where a larger mean is the better model (overlap and CI scores). The rest (diversity
#: terms, the floor) describe the data or the sample set and get no verdict.
HIGHER_IS_BETTER = frozenset(
    {"hm_iou", "dice_max", "ci", "ci_hm", "ci_var", "ci_hm_var", "s_c", "d_a", "d_a_var"}
)
LEVEL = 0.95


class Interval(NamedTuple):
    """Mean over cases and the bootstrap percentile interval around it."""

    estimate: float
    low: float
    high: float


class Comparison(NamedTuple):
    """Mean paired difference a - b over the shared cases, its interval, and the verdict."""

    difference: float
    low: float
    high: float
    cases: int
    better: str


def _resample_counts(cases: int, resamples: int, seed: int) -> np.ndarray:
    """How often each case is drawn in each resample, [resamples, cases] (rows sum to ``cases``).

    Counts turn every resampled mean into one matrix product, for all metrics at once.
    """
    if cases < 1:
        raise ValueError("bootstrap needs at least one case")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, cases, size=(resamples, cases))
    flat = (draws + cases * np.arange(resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * cases).reshape(resamples, cases).astype(np.float64)


def _means(values: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of each column over the non-NaN cases: as given, and for each resample."""
    present = ~np.isnan(values)
    filled = np.where(present, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        estimate = filled.sum(0) / present.sum(0)
        resampled = (counts @ filled) / (counts @ present)
    return estimate, resampled


def _percentiles(resampled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The interval ends; a resample that drew only NaN cases of a column has no mean and is
    left out (a column that is NaN everywhere gets NaN ends, and its caller drops it)."""
    tail = (1 - LEVEL) / 2 * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's "All-NaN slice"
        low, high = np.nanpercentile(resampled, [tail, 100 - tail], axis=0)
    return low, high


def _columns(table: pd.DataFrame, keys: Iterable[str], name: str) -> list[str]:
    keys = list(keys)
    missing = [k for k in keys if k not in table]
    if missing:
        raise ValueError(f"{name} has no column(s) {missing}")
    return keys


def bootstrap_intervals(
    per_case: pd.DataFrame, keys: Sequence[str], resamples: int = 2000, seed: int = 0
) -> dict[str, Interval]:
    """Mean over cases of each column in ``keys`` with its 95 % percentile-bootstrap interval.

    All columns share the same resampled cases, so intervals of related metrics are consistent.
    A column that is NaN for every case is left out of the result.
    """
    keys = _columns(per_case, keys, "per-case table")
    values = per_case[keys].to_numpy(dtype=np.float64)
    estimate, resampled = _means(values, _resample_counts(len(values), resamples, seed))
    low, high = _percentiles(resampled)
    return {
        k: Interval(float(estimate[i]), float(low[i]), float(high[i]))
        for i, k in enumerate(keys)
        if not np.isnan(estimate[i])
    }


def interval_columns(intervals: dict[str, Interval]) -> dict[str, float]:
    """Flat ``<key>_low95`` / ``<key>_high95`` entries for metrics.json and MLflow."""
    flat: dict[str, float] = {}
    for key, interval in intervals.items():
        flat[f"{key}_low95"] = interval.low
        flat[f"{key}_high95"] = interval.high
    return flat


def _verdict(key: str, low: float, high: float) -> str:
    if key in LOWER_IS_BETTER:
        low, high = -high, -low  # a - b < 0 means a is better
    elif key not in HIGHER_IS_BETTER:
        return "neither"
    return "a" if low > 0 else "b" if high < 0 else "neither"


def paired_comparison(
    a: pd.DataFrame,
    b: pd.DataFrame,
    keys: Sequence[str],
    resamples: int = 2000,
    seed: int = 0,
    on: str = "case_id",
) -> dict[str, Comparison]:
    """Paired bootstrap of mean(a - b) over the cases both tables score (matched on ``on``).

    ``a`` and ``b`` are per-case tables of two sample sets (two models, two seeds, two samplers)
    on the same images. The difference of each metric is taken per image and then resampled over
    images; a case where either value is NaN is left out of that metric. Cases in only one table
    are an error: a comparison on different images is not paired.
    """
    _columns(a, [on, *keys], "table a")
    _columns(b, [on, *keys], "table b")
    for name, table in (("a", a), ("b", b)):
        duplicated = table[on][table[on].duplicated()].tolist()
        if duplicated:
            raise ValueError(f"table {name} lists cases more than once: {duplicated[:5]}")
    only_a = sorted(set(a[on]) - set(b[on]))
    only_b = sorted(set(b[on]) - set(a[on]))
    if only_a or only_b:
        raise ValueError(
            f"paired comparison needs the same cases; only in a: {only_a[:5]}, only in b: {only_b[:5]}"
        )
    # Sorted by case id, so the result does not depend on the order the tables list cases in.
    merged = a[[on, *keys]].merge(b[[on, *keys]], on=on, suffixes=("_a", "_b")).sort_values(on)
    diffs = np.stack([merged[f"{k}_a"].to_numpy(float) - merged[f"{k}_b"].to_numpy(float) for k in keys], 1)
    estimate, resampled = _means(diffs, _resample_counts(len(merged), resamples, seed))
    low, high = _percentiles(resampled)
    cases = (~np.isnan(diffs)).sum(0)
    return {
        k: Comparison(float(estimate[i]), float(low[i]), float(high[i]), int(cases[i]),
                      _verdict(k, float(low[i]), float(high[i])))
        for i, k in enumerate(keys)
        if cases[i]
    }


def comparison_table(comparisons: dict[str, Comparison]) -> pd.DataFrame:
    """One row per metric: difference a - b, its 95 % interval, cases, and which set is better."""
    return pd.DataFrame(
        [{"metric": k, **c._asdict()} for k, c in comparisons.items()],
        columns=["metric", *Comparison._fields],
    )
