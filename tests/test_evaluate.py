"""The evaluator without Kedro: a folder of another model's PNG samples scored against an LIDC
slice tree, from the command line and from Python, with known answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cimd_pipeline.errors import DataError
from cimd_pipeline.evaluate import evaluate

SIZE = 16
RADII = (3, 4, 5, 6)  # rater k draws a disk of radius RADII[k]
CASES = ("LIDC-IDRI-0001/nodule-0/slice-0", "LIDC-IDRI-0001/nodule-0/slice-1", "LIDC-IDRI-0002/nodule-0/slice-0")


def disk(radius: float, centre: tuple[int, int] = (8, 8)) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius**2).astype(np.uint8)


def write_lidc_tree(root: Path) -> Path:
    """``<patient>/nodule-0/images/slice-i.png`` beside ``mask-0`` ... ``mask-3`` (0/255), the
    public LIDC slice tree's layout, with rater k's mask a disk of radius ``RADII[k]``."""
    rng = np.random.default_rng(0)
    for case in CASES:
        patient, nodule, name = case.split("/")
        folder = root / patient / nodule
        (folder / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((SIZE, SIZE)) * 255).astype(np.uint8)).save(folder / "images" / f"{name}.png")
        for k, radius in enumerate(RADII):
            (folder / f"mask-{k}").mkdir(exist_ok=True)
            Image.fromarray(disk(radius) * 255).save(folder / f"mask-{k}" / f"{name}.png")
    return root


def write_png_samples(root: Path, masks: dict[str, list[np.ndarray]]) -> Path:
    """One folder per case id holding ``sample-j.png`` (0/255), as another model might save."""
    for case, samples in masks.items():
        (root / case).mkdir(parents=True, exist_ok=True)
        for j, mask in enumerate(samples):
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / case / f"sample-{j}.png")
    return root


def d(a: np.ndarray, b: np.ndarray) -> float:
    """1 - IoU, 0 for two empty masks (docs/metrics.md)."""
    union = np.logical_or(a, b).sum()
    return 0.0 if union == 0 else 1.0 - np.logical_and(a, b).sum() / union


def known_samples() -> tuple[dict[str, list[np.ndarray]], dict[str, float]]:
    """Samples with hand-computable GED: the raters themselves (GED 0), all empty
    (GED = 2 - mean rater distance), and every sample one rater's disk shifted."""
    raters = [disk(r) for r in RADII]
    rater_rater = np.mean([d(a, b) for a in raters for b in raters])
    shifted = [disk(r, (6, 8)) for r in RADII]
    ged_shifted = (
        2 * np.mean([d(s, y) for s in shifted for y in raters])
        - np.mean([d(a, b) for a in shifted for b in shifted])
        - rater_rater
    )
    empty = [np.zeros((SIZE, SIZE), np.uint8)] * 4
    samples = {CASES[0]: raters, CASES[1]: empty, CASES[2]: shifted}
    return samples, {CASES[0]: 0.0, CASES[1]: 2 - rater_rater, CASES[2]: ged_shifted}


def test_command_scores_png_samples_against_an_lidc_tree(tmp_path: Path):
    tree = write_lidc_tree(tmp_path / "LIDC-IDRI-slices")
    samples, expected = known_samples()
    folder = write_png_samples(tmp_path / "my_samples", samples)
    out = tmp_path / "scores"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run(
        [sys.executable, "-m", "cimd_pipeline", "evaluate", str(folder), str(tree), "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)
    assert summary == json.loads((out / "metrics.json").read_text())
    per_case = pd.read_csv(out / "per_case_metrics.csv").set_index("case_id")
    assert sorted(per_case.index) == sorted(CASES)
    for case, ged in expected.items():
        assert per_case.loc[case, "ged"] == pytest.approx(ged, abs=1e-6), case
    assert per_case.loc[CASES[0], "hm_iou"] == pytest.approx(1.0)
    assert per_case.loc[CASES[0], "dice_max"] == pytest.approx(1.0)
    assert per_case.loc[CASES[1], "dice_max"] == pytest.approx(0.0)
    assert summary["ged"] == pytest.approx(np.mean(list(expected.values())), abs=1e-6)
    assert summary["num_samples"] == 4 and summary["test_cases"] == 3
    assert summary["sampling_method"] == "external"
    for figure in ("sample_grid.png", "metric_histograms.png"):
        assert Image.open(out / figure).size[0] > 100

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["cimd_pipeline"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    assert runs.iloc[0]["metrics.test.ged"] == pytest.approx(summary["ged"])
    assert runs.iloc[0]["metrics.system/cpu_utilization_percentage"] >= 0
    client = mlflow.MlflowClient()
    logged = {a.path for folder in ("reports", "figures") for a in client.list_artifacts(runs.iloc[0]["run_id"], folder)}
    assert {"reports/metrics.json", "reports/per_case_metrics.csv", "figures/sample_grid.png"} <= logged


def test_bad_samples_stop_the_command_with_the_file_named_and_nothing_written(tmp_path: Path):
    tree = write_lidc_tree(tmp_path / "tree")
    samples, _ = known_samples()
    small = {c: [m[:8, :8] for m in s] for c, s in samples.items()}
    folder = write_png_samples(tmp_path / "small", small)
    out = tmp_path / "scores"
    proc = subprocess.run(
        [sys.executable, "-m", "cimd_pipeline", "evaluate", str(folder), str(tree), "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 2
    assert "8x8" in proc.stderr and "16x16" in proc.stderr and str(folder) in proc.stderr
    assert not out.exists()


def test_python_function_resizes_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tree = write_lidc_tree(tmp_path / "tree")
    samples, expected = known_samples()
    big = {c: [np.kron(m, np.ones((2, 2), np.uint8)) for m in s] for c, s in samples.items()}
    folder = write_png_samples(tmp_path / "big", big)
    with pytest.raises(DataError, match="32x32 but the raters' masks are 16x16"):
        evaluate(folder, tree)
    result = evaluate(folder, tree, resize=True, figure_cases=0)
    ged = result.per_case.set_index("case_id")["ged"]
    for case, value in expected.items():
        assert ged[case] == pytest.approx(value, abs=1e-6)
    assert result.run_id is None and "sample_grid.png" not in result.figures


def test_missing_and_unknown_cases_are_refused_or_left_out_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tree = write_lidc_tree(tmp_path / "tree")
    samples, _ = known_samples()
    partial = write_png_samples(tmp_path / "partial", {CASES[0]: samples[CASES[0]]})
    with pytest.raises(DataError, match="2 of 3 rater cases have no samples"):
        evaluate(partial, tree)
    result = evaluate(partial, tree, only_sampled=True, figure_cases=1)
    assert list(result.per_case["case_id"]) == [CASES[0]] and result.summary["ged"] == pytest.approx(0.0, abs=1e-6)
    assert result.summary["rater_cases_without_samples"] == 2
    stray = write_png_samples(tmp_path / "stray", {**samples, "LIDC-IDRI-0009/nodule-0/slice-0": samples[CASES[0]]})
    with pytest.raises(DataError, match="'LIDC-IDRI-0009/nodule-0/slice-0' is not among the 3 rater cases") as error:
        evaluate(stray, tree)
    assert "LIDC-IDRI-0009" in error.value.source


def test_only_sampled_never_opens_the_slices_without_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tree = write_lidc_tree(tmp_path / "tree")
    (tree / CASES[2].replace("slice-0", "images/slice-0.png")).write_bytes(b"not a png")
    samples, expected = known_samples()
    folder = write_png_samples(tmp_path / "two", {c: samples[c] for c in CASES[:2]})
    with pytest.raises(DataError, match="unreadable image file"):
        evaluate(folder, tree)
    result = evaluate(folder, tree, only_sampled=True, figure_cases=0)
    assert result.summary["rater_cases_without_samples"] == 1
    assert result.summary["ged"] == pytest.approx((expected[CASES[0]] + expected[CASES[1]]) / 2, abs=1e-6)


def test_another_rater_tree_reads_with_the_folders_reader_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tree = tmp_path / "flat"
    tree.mkdir()
    for case in ("a", "b"):
        Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(tree / f"{case}.png")
        for k, radius in enumerate(RADII):
            Image.fromarray(disk(radius) * 255).save(tree / f"{case}_l{k}.png")
    samples, expected = known_samples()
    folder = write_png_samples(tmp_path / "samples", {"a": samples[CASES[0]], "b": samples[CASES[2]]})
    with pytest.raises(DataError, match="neither an aligned dataset .* nor an LIDC slice tree"):
        evaluate(folder, tree)
    result = evaluate(folder, tree, reader_options={"layout": "flat", "pattern": "*.png"}, figure_cases=0)
    ged = result.per_case.set_index("case_id")["ged"]
    assert ged["a"] == pytest.approx(0.0, abs=1e-6) and ged["b"] == pytest.approx(expected[CASES[2]], abs=1e-6)


def test_compare_gives_the_paired_difference_of_two_sample_sets(tmp_path: Path):
    tree = write_lidc_tree(tmp_path / "tree")
    samples, expected = known_samples()
    a = write_png_samples(tmp_path / "a", samples)
    b = write_png_samples(tmp_path / "b", {c: [np.zeros((SIZE, SIZE), np.uint8)] * 4 for c in CASES})
    out = tmp_path / "a_vs_b"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run(
        [sys.executable, "-m", "cimd_pipeline", "evaluate", str(a), str(tree), "--compare", str(b), "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    shown = json.loads(proc.stdout)
    empty_ged = expected[CASES[1]]  # all-empty samples score 2 - mean rater distance on every case
    assert shown["compare"]["ged"] == pytest.approx(empty_ged, abs=1e-6)
    comparison = pd.read_csv(out / "comparison.csv").set_index("metric")
    difference = np.mean([expected[c] - empty_ged for c in CASES])
    ged = comparison.loc["ged"]
    assert ged["difference"] == pytest.approx(difference, abs=1e-6) and ged["cases"] == 3
    assert ged["low"] <= ged["difference"] <= ged["high"] <= 0
    # all-empty samples never overlap a rater: B's Dice_max is 0, so the difference is A's mean
    assert comparison.loc["dice_max", "difference"] == pytest.approx(shown["samples"]["dice_max"], abs=1e-6)
    assert json.loads((out / "compared" / "metrics.json").read_text())["ged"] == pytest.approx(empty_ged, abs=1e-6)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    run = mlflow.search_runs(experiment_names=["cimd_pipeline"]).iloc[0]
    assert run["metrics.paired.ged_difference"] == pytest.approx(difference, abs=1e-6)
    assert run["metrics.compared.ged"] == pytest.approx(empty_ged, abs=1e-6)

    other = write_png_samples(tmp_path / "other", {c: samples[c] for c in CASES[:2]})
    with pytest.raises(DataError, match="1 of 3 rater cases have no samples"):
        evaluate(a, tree, compare_with=other)
