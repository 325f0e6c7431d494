"""Bootstrap intervals over cases and paired comparisons (cimd_pipeline.uncertainty)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cimd_pipeline.ensembles import SampleSet
from cimd_pipeline.scoring import score_samples, summarise
from cimd_pipeline.uncertainty import (
    bootstrap_intervals,
    comparison_table,
    interval_columns,
    paired_comparison,
)
from tests.test_scoring import _data, _samples


def _table(values: dict[str, np.ndarray]) -> pd.DataFrame:
    n = len(next(iter(values.values())))
    return pd.DataFrame({"case_id": [f"c{i}" for i in range(n)], **values})


def _reference(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """The textbook loop: draw case indices with replacement, take the mean, read percentiles."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), size=(resamples, len(values)))
    means = [values[row].mean() for row in draws]
    return tuple(np.percentile(means, [2.5, 97.5]))


def test_intervals_equal_the_textbook_resampling_loop_for_every_metric_at_once():
    rng = np.random.default_rng(0)
    table = _table({"ged": rng.gamma(2, 0.1, 57), "hm_iou": rng.random(57)})
    got = bootstrap_intervals(table, ["ged", "hm_iou"], resamples=300, seed=7)
    for key in ("ged", "hm_iou"):
        low, high = _reference(table[key].to_numpy(), 300, 7)
        assert got[key].estimate == pytest.approx(table[key].mean(), abs=1e-12)
        assert (got[key].low, got[key].high) == pytest.approx((low, high), abs=1e-12)


def test_interval_width_matches_the_normal_theory_and_the_seed_fixes_it():
    # Mean of 400 standard-normal values: the 95 % interval is about +-1.96 / 20 = +-0.098.
    values = np.random.default_rng(1).standard_normal(400)
    table = _table({"ged": values})
    first = bootstrap_intervals(table, ["ged"], seed=3)["ged"]
    assert first.low < values.mean() < first.high
    assert (first.high - first.low) / 2 == pytest.approx(1.96 * values.std() / 20, rel=0.1)
    assert bootstrap_intervals(table, ["ged"], seed=3)["ged"] == first
    assert bootstrap_intervals(table, ["ged"], seed=4)["ged"] != first


def test_constant_values_have_a_zero_width_interval():
    got = bootstrap_intervals(_table({"dice_max": np.full(9, 0.25)}), ["dice_max"], resamples=50)
    assert got["dice_max"] == (0.25, 0.25, 0.25)
    assert interval_columns(got) == {"dice_max_low95": 0.25, "dice_max_high95": 0.25}


@pytest.mark.filterwarnings("error")  # NaN columns are expected input, not a numpy warning
def test_nan_cases_are_left_out_and_an_all_nan_column_is_dropped():
    values = np.array([0.1, np.nan, 0.3, 0.2, np.nan, 0.4])
    table = _table({"ged_floor": values, "rater_distance": np.full(6, np.nan)})
    got = bootstrap_intervals(table, ["ged_floor", "rater_distance"], resamples=400, seed=0)
    assert set(got) == {"ged_floor"}
    assert got["ged_floor"].estimate == pytest.approx(0.25)
    low, high = _reference(values[~np.isnan(values)], 400, 0)
    assert 0.1 <= got["ged_floor"].low <= low + 0.05 and high - 0.05 <= got["ged_floor"].high <= 0.4


def test_one_case_and_one_resample_are_enough():
    table = _table({"ged": np.array([0.3])})
    assert bootstrap_intervals(table, ["ged"], resamples=1)["ged"] == (0.3, 0.3, 0.3)
    two = _table({"ged": np.array([0.2, 0.4])})
    got = bootstrap_intervals(two, ["ged"], resamples=1, seed=5)["ged"]
    assert got.estimate == pytest.approx(0.3) and got.low == got.high == pytest.approx(_reference(two["ged"].to_numpy(), 1, 5)[0])


def test_defaults_are_2000_resamples_with_seed_0():
    table = _table({"ged": np.random.default_rng(6).random(30)})
    assert bootstrap_intervals(table, ["ged"]) == bootstrap_intervals(table, ["ged"], resamples=2000, seed=0)
    other = _table({"ged": np.random.default_rng(7).random(30)})
    assert paired_comparison(table, other, ["ged"]) == paired_comparison(table, other, ["ged"], resamples=2000, seed=0)


def test_bad_input_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"per-case table has no column\(s\) \['ci'\]"):
        bootstrap_intervals(_table({"ged": np.ones(3)}), ["ci"])
    with pytest.raises(ValueError, match=r"table a has no column\(s\) \['ci'\]"):
        paired_comparison(_table({"ged": np.ones(3)}), _table({"ci": np.ones(3)}), ["ci"])
    with pytest.raises(ValueError, match=r"table b has no column\(s\) \['ci'\]"):
        paired_comparison(_table({"ci": np.ones(3)}), _table({"ged": np.ones(3)}), ["ci"])
    with pytest.raises(ValueError, match="at least one case"):
        bootstrap_intervals(_table({"ged": np.ones(0)}), ["ged"])
    with pytest.raises(ValueError, match="resamples must be >= 1"):
        bootstrap_intervals(_table({"ged": np.ones(3)}), ["ged"], resamples=0)


def test_paired_comparison_sees_a_small_consistent_gain_that_separate_intervals_hide():
    # Images differ a lot (spread 0.1), model a is better by 0.01 on every image, +- 0.002.
    rng = np.random.default_rng(2)
    base = rng.uniform(0.1, 0.5, 200)
    noise = rng.normal(0, 0.002, 200)
    a = _table({"ged": base - 0.01 + noise, "hm_iou": base + 0.01, "diversity_samples": base + 0.3})
    b = _table({"ged": base, "hm_iou": base, "diversity_samples": base})
    alone_a = bootstrap_intervals(a, ["ged"])["ged"]
    alone_b = bootstrap_intervals(b, ["ged"])["ged"]
    assert alone_a.high > alone_b.low  # the two separate intervals overlap ...
    got = paired_comparison(a, b, ["ged", "hm_iou", "diversity_samples"])
    assert got["ged"].difference == pytest.approx(-0.01 + noise.mean())
    assert got["ged"].low < got["ged"].difference < got["ged"].high < 0  # ... the paired one does not
    assert (got["ged"].better, got["hm_iou"].better, got["diversity_samples"].better) == ("a", "a", "neither")
    assert got["ged"].cases == 200
    reverse = paired_comparison(b, a, ["ged"])["ged"]
    assert reverse.better == "b" and reverse.difference == pytest.approx(-got["ged"].difference)


def test_paired_comparison_matches_cases_by_id_and_says_neither_without_evidence():
    rng = np.random.default_rng(3)
    a = _table({"ged": rng.random(60), "ci": rng.random(60)})
    b = _table({"ged": rng.random(60), "ci": rng.random(60)})
    got = paired_comparison(a, b, ["ged", "ci"], seed=1)
    shuffled = paired_comparison(a.sample(frac=1, random_state=0), b, ["ged", "ci"], seed=1)
    assert shuffled == got
    assert got["ged"].better == "neither" and got["ged"].low < 0 < got["ged"].high
    table = comparison_table(got)
    assert list(table.columns) == ["metric", "difference", "low", "high", "cases", "better"]
    assert table["metric"].tolist() == ["ged", "ci"]


def test_paired_comparison_refuses_unpaired_or_duplicated_cases():
    a = _table({"ged": np.ones(8)})
    with pytest.raises(ValueError, match=r"only in a: \['c1', 'c2', 'c3', 'c4', 'c5'\], only in b: \[\]"):
        paired_comparison(a, a.iloc[[0, 6, 7]], ["ged"])
    with pytest.raises(ValueError, match=r"only in a: \[\], only in b: \['c1', 'c2', 'c3', 'c4', 'c5'\]$"):
        paired_comparison(a.iloc[[0, 6, 7]], a, ["ged"])
    many = pd.concat([a, a.iloc[:6]])
    with pytest.raises(ValueError, match=r"table a lists cases more than once: \['c0', 'c1', 'c2', 'c3', 'c4'\]$"):
        paired_comparison(many, a, ["ged"])
    with pytest.raises(ValueError, match="table b lists cases more than once"):
        paired_comparison(a, many, ["ged"])


def test_identical_sets_are_neither_better():
    a = _table({"ged": np.linspace(0.1, 0.5, 20), "hm_iou": np.linspace(0.2, 0.9, 20)})
    got = paired_comparison(a, a, ["ged", "hm_iou"])
    assert all(c.difference == c.low == c.high == 0 and c.better == "neither" for c in got.values())
    assert list(comparison_table({}).columns) == ["metric", "difference", "low", "high", "cases", "better"]


@pytest.mark.filterwarnings("error")
def test_nan_in_either_set_leaves_that_case_out_of_the_difference():
    a = _table({"ged_floor": np.array([0.2, np.nan, 0.4])})
    b = _table({"ged_floor": np.array([0.1, 0.3, np.nan])})
    got = paired_comparison(a, b, ["ged_floor"], resamples=20)["ged_floor"]
    assert got.cases == 1 and got.difference == pytest.approx(0.1) and (got.low, got.high) == pytest.approx((0.1, 0.1))


def test_summary_of_a_scored_sample_set_carries_an_interval_for_every_aggregate():
    rng = np.random.default_rng(4)
    data = _data(rng)
    per_case = score_samples(_samples(rng, data, 16), data)
    summary = summarise(per_case, {}, resamples=500, seed=2)
    for key in ("ged", "ged_floor", "ged_floor_100", "hm_iou", "dice_max", "ci", "ci_var"):
        assert summary[f"{key}_low95"] <= summary[key] <= summary[f"{key}_high95"], key
    assert summary["ged_low95"] < summary["ged_high95"]
    assert summary["bootstrap_resamples"] == 500
    assert summarise(per_case, {}, resamples=500, seed=2) == summary
    assert "test_cases_low95" not in summary and "ged_oracle_low95" not in summary


def test_paired_comparison_of_two_scored_sample_sets():
    # The same raters, one set of samples identical to the raters (GED 0) and one random set.
    rng = np.random.default_rng(5)
    data = _data(rng, cases=3)
    good = np.stack([np.asarray(data.masks[i])[[0, 0]] for i in range(len(data))])
    data.rater_valid[:] = [True, False, False]
    ids = data.cases["case_id"].to_numpy()
    perfect = SampleSet(ids, good, good.astype(np.float16), {})
    a, b = score_samples(perfect, data), score_samples(_samples(rng, data, 2), data)
    got = paired_comparison(a, b, ["ged", "dice_max"], resamples=200)
    assert a["ged"].tolist() == [0.0, 0.0, 0.0]
    assert got["ged"].difference == pytest.approx(-b["ged"].mean())
    assert got["ged"].better == "a" and got["dice_max"].better == "a"
