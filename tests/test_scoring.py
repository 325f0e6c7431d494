"""Scoring a sample set: per-case rows, aggregates, and GED16 beside GED for large ensembles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.ensembles import SampleSet
from cimd_pipeline.metrics import ci_score, evaluate_case, ged
from cimd_pipeline.models.trained import TrainedModel
from cimd_pipeline.pipelines.evaluation.nodes import evaluate_samples
from cimd_pipeline.scoring import GED16_FROM, score_samples, summarise


def _data(rng: np.random.Generator, cases: int = 3) -> AlignedSet:
    masks = (rng.random((cases, 3, 6, 6)) < 0.3).astype(np.uint8)
    valid = np.array([[True, True, True], [True, False, True], [True, True, False]])[:cases]
    table = pd.DataFrame({"case_id": [f"c{i}" for i in range(cases)], "group_id": "g", "split": "test"})
    return AlignedSet(rng.random((cases, 1, 6, 6), dtype=np.float32), masks, valid, table)


def _samples(rng: np.random.Generator, data: AlignedSet, n: int) -> SampleSet:
    # Later samples are denser than the first 16, so GED over all and over the first 16 differ.
    density = np.where(np.arange(n) < 16, 0.3, 0.7)[None, :, None, None]
    binary = (rng.random((len(data), n, 6, 6)) < density).astype(np.uint8)
    info = {"method": "ddim", "steps": 5, "seconds": 1.0}
    return SampleSet(data.cases["case_id"].to_numpy(), binary, binary.astype(np.float16), info)


def _model() -> TrainedModel:
    return TrainedModel({"variant": "cimd_aa"}, 1, (6, 6), {}, {}, {"steps": 3, "train_seconds": 1.0})


def _raters(data: AlignedSet, row: int) -> np.ndarray:
    return data.masks[row][data.rater_valid[row]]


def test_evaluation_reports_ged16_of_the_first_16_samples_from_100_samples():
    rng = np.random.default_rng(0)
    data = _data(rng)
    samples = _samples(rng, data, GED16_FROM)
    summary, per_case, metrics = evaluate_samples(samples, data, _model())
    want = [ged(samples.binary[i, :16], _raters(data, i)) for i in range(len(data))]
    assert per_case["ged16"].to_numpy() == pytest.approx(want)
    assert summary["ged16"] == pytest.approx(np.mean(want))
    assert metrics["ged16"]["value"] == pytest.approx(np.mean(want))
    full = [ged(samples.binary[i], _raters(data, i)) for i in range(len(data))]
    assert summary["ged"] == pytest.approx(np.mean(full)) and abs(summary["ged"] - summary["ged16"]) > 0.05


def test_no_ged16_below_100_samples():
    rng = np.random.default_rng(1)
    data = _data(rng)
    summary, per_case, metrics = evaluate_samples(_samples(rng, data, GED16_FROM - 1), data, _model())
    assert "ged16" not in summary and "ged16" not in per_case and "ged16" not in metrics


def test_both_ci_readings_reach_the_summary_and_mlflow():
    rng = np.random.default_rng(2)
    data = _data(rng)
    samples = _samples(rng, data, 4)
    summary, _, metrics = evaluate_samples(samples, data, _model())
    scores = [ci_score(samples.binary[i], _raters(data, i)) for i in range(len(data))]
    for key in ("ci", "ci_hm", "ci_var", "ci_hm_var", "d_a", "d_a_var"):
        want = np.mean([s[key] for s in scores])
        assert summary[key] == pytest.approx(want) and metrics[key]["value"] == pytest.approx(want), key


@pytest.mark.parametrize("n", [3, 6])
def test_ged_oracle_uses_exactly_min_of_oracle_draws_and_samples_and_says_so(n, caplog):
    rng = np.random.default_rng(3)
    data = _data(rng)
    data.oracle = (rng.random((len(data), 4, 6, 6)) < 0.3).astype(np.uint8)  # 4 fresh true draws
    with caplog.at_level("INFO", logger="cimd_pipeline.scoring"):
        summary, per_case, _ = evaluate_samples(_samples(rng, data, n), data, _model())
    used = min(n, 4)
    want = [ged(data.oracle[i, :used], _raters(data, i)) for i in range(len(data))]
    assert per_case["ged_oracle"].to_numpy() == pytest.approx(want)
    terms = [evaluate_case(data.oracle[i, :used], _raters(data, i)) for i in range(len(data))]
    assert per_case["diversity_oracle"].to_numpy() == pytest.approx([t["diversity_samples"] for t in terms])
    assert per_case["ged_cross_oracle"].to_numpy() == pytest.approx([t["ged_cross"] for t in terms])
    assert summary["diversity_oracle"] == pytest.approx(per_case["diversity_oracle"].mean())
    assert list(per_case["ged_oracle_samples"]) == [used] * len(data) and summary["ged_oracle_samples"] == used
    record = next(r for r in caplog.records if "ged_oracle" in r.getMessage())
    assert f"from {used} oracle draws per case against GED from {n} samples" in record.getMessage()
    assert record.levelname == ("WARNING" if used < n else "INFO")


def test_each_family_gets_its_own_means_with_its_oracle_beside_them():
    rng = np.random.default_rng(5)
    data = _data(rng)
    data.cases["family"] = ["nodule", "bone", "nodule"]
    data.oracle = (rng.random((len(data), 4, 6, 6)) < 0.3).astype(np.uint8)
    summary, per_case, _ = evaluate_samples(_samples(rng, data, 4), data, _model())
    for family, rows in (("nodule", [0, 2]), ("bone", [1])):
        for key in ("ged", "ged_floor", "hm_iou", "dice_max", "ci", "ci_var", "ged_oracle"):
            assert summary[f"{key}_{family}"] == pytest.approx(per_case[key].to_numpy()[rows].mean()), (key, family)
    assert summary["ged_oracle_nodule"] != pytest.approx(summary["ged_oracle_bone"])
    for key in ("ged_oracle", "ged_cross_oracle"):
        assert summary[key] == pytest.approx(per_case[key].mean()), key
    assert summary["ged_oracle_low95"] <= summary["ged_oracle"] <= summary["ged_oracle_high95"]


def test_families_without_an_oracle_get_their_means_and_nothing_else():
    rng = np.random.default_rng(7)
    data = _data(rng)
    data.cases["family"] = ["nodule", "bone", "nodule"]
    summary, per_case, _ = evaluate_samples(_samples(rng, data, 4), data, _model())
    assert summary["ged_bone"] == pytest.approx(per_case["ged"].iloc[1])
    assert "ged_oracle_bone" not in summary and "ged_oracle" not in summary


def test_per_case_table_rows_and_summary_bookkeeping():
    rng = np.random.default_rng(8)
    data = _data(rng)
    summary, per_case, metrics = evaluate_samples(_samples(rng, data, GED16_FROM + 1), data, _model())
    assert list(per_case.index) == [0, 1, 2] and "split" not in per_case and "index" not in per_case
    assert per_case["case_id"].tolist() == ["c0", "c1", "c2"] and summary["test_cases"] == 3
    for key in ("ged", "ged16", "ged100", "ged_floor_16", "hm_iou"):
        assert summary[f"{key}_low95"] <= summary[key] <= summary[f"{key}_high95"], key
    assert summary["bootstrap_resamples"] == 2000  # the documented default
    assert metrics["ged"] == {"value": summary["ged"], "step": 0}


def test_summary_intervals_follow_their_seed():
    rng = np.random.default_rng(9)
    data = _data(rng)
    _, per_case, _ = evaluate_samples(_samples(rng, data, 4), data, _model())
    per_case = pd.concat([per_case] * 10, ignore_index=True)  # enough cases for the seed to show
    per_case["ged"] += rng.normal(0, 0.05, len(per_case))
    first, again = summarise(per_case, {}, seed=0), summarise(per_case, {})
    assert first == again and summarise(per_case, {}, seed=1)["ged_low95"] != first["ged_low95"]


def test_samples_of_unknown_cases_are_refused_by_name():
    rng = np.random.default_rng(10)
    data = _data(rng)
    samples = _samples(rng, data, 4)
    samples.case_ids[1] = "nobody"
    with pytest.raises(ValueError, match=r"not in the aligned dataset: \['nobody'\]"):
        score_samples(samples, data)


@pytest.mark.parametrize("n", [16, 100])
def test_floor_for_the_n_drawn_and_for_16_and_100_beside_ged(n):
    rng = np.random.default_rng(4)
    data = _data(rng)
    summary, per_case, metrics = evaluate_samples(_samples(rng, data, n), data, _model())
    floors = {k: [] for k in ("ged_floor", "ged_floor_16", "ged_floor_100")}
    for row in range(len(data)):
        raters = _raters(data, row).astype(bool)
        m = len(raters)
        pairs = [1 - evaluate_case(raters[[i]], raters[[j]])["hm_iou"] for i in range(m) for j in range(m) if i != j]
        for key, count in (("ged_floor", n), ("ged_floor_16", 16), ("ged_floor_100", 100)):
            floors[key].append(np.mean(pairs) * (1 / count + 1 / m))
    for key, want in floors.items():
        assert per_case[key].to_numpy() == pytest.approx(want), key
        assert summary[key] == pytest.approx(np.mean(want)) and metrics[key]["value"] == summary[key]
    assert summary["ged_floor_cases"] == len(data)
    assert ("ged100" in summary) == (n == 100)
    if n == 100:
        assert per_case["ged100"].to_numpy() == pytest.approx(per_case["ged"].to_numpy())


def test_cases_with_one_rater_have_no_floor_and_are_counted_out():
    rng = np.random.default_rng(5)
    data = _data(rng)
    data.rater_valid[1] = [True, False, False]
    summary, per_case, _ = evaluate_samples(_samples(rng, data, 16), data, _model())
    assert per_case["ged_floor"].isna().tolist() == [False, True, False]
    assert summary["ged_floor_cases"] == 2
    assert summary["ged_floor"] == pytest.approx(per_case["ged_floor"].iloc[[0, 2]].mean())
    assert not np.isnan(summary["ged"])


def test_no_floor_at_all_when_no_case_has_two_raters():
    rng = np.random.default_rng(6)
    data = _data(rng)
    data.rater_valid[:] = [True, False, False]
    summary, _, metrics = evaluate_samples(_samples(rng, data, 16), data, _model())
    assert summary["ged_floor_cases"] == 0
    assert not {"ged_floor", "ged_floor_16", "rater_distance"} & (set(summary) | set(metrics))
    assert all(np.isfinite(v) for v in summary.values() if isinstance(v, float))
