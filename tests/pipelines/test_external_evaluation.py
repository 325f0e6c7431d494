"""``kedro run --pipelines evaluation --params "evaluation.samples=<path>"``: samples drawn
elsewhere, scored against the run's aligned raters, with the numbers of the standalone evaluator;
each run's MLflow record carries CPU and memory as system metrics."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cimd_pipeline.evaluate import evaluate
from cimd_pipeline.io.aligned_dataset import AlignedDataset
from tests.conftest import run_kedro

pytestmark = pytest.mark.slow


def write_pngs(root: Path, case_ids, stacks) -> Path:
    for case, stack in zip(case_ids, stacks):
        (root / case).mkdir(parents=True)
        for j, mask in enumerate(stack):
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / case / f"sample-{j}.png")
    return root


def test_evaluation_pipeline_scores_samples_drawn_elsewhere(kedro_project: Path, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_kedro(kedro_project, "--env", "test", "--pipelines", "data_ingestion,mask_alignment")
    aligned = kedro_project / "data/03_primary/aligned"
    test = AlignedDataset(str(aligned)).load().subset("test")
    rng = np.random.default_rng(0)
    # each sample is one of the case's raters with a few pixels flipped
    picks = rng.integers(0, test.masks.shape[1], size=(len(test), 5))
    stacks = np.take_along_axis(np.asarray(test.masks), picks[:, :, None, None], axis=1)
    stacks = stacks ^ (rng.random(stacks.shape) < 0.05)
    samples = write_pngs(tmp_path / "samples", test.cases["case_id"], stacks)

    # a wrong size is refused with both sizes, and nothing is written
    small = write_pngs(tmp_path / "small", test.cases["case_id"], stacks[:, :, :8, :8])
    report = kedro_project / "data/08_reporting"
    failed = run_kedro(kedro_project, "--env", "test", "--pipelines", "evaluation",
                       "--params", f"evaluation.samples={small}", check=False)
    assert failed.returncode != 0
    assert "samples are 8x8 but the raters' masks are 16x16" in failed.stdout + failed.stderr
    assert not (report / "metrics.json").exists() and not (report / "per_case_metrics.csv").exists()

    run_kedro(kedro_project, "--env", "test", "--pipelines", "evaluation", "--params", f"evaluation.samples={samples}")
    metrics = json.loads((report / "metrics.json").read_text())
    per_case = pd.read_csv(report / "per_case_metrics.csv")
    assert metrics["num_samples"] == 5 and metrics["test_cases"] == len(test) == len(per_case)
    assert metrics["sampling_method"] == "external" and metrics["samples_path"] == str(samples)
    assert "variant" not in metrics  # no model of this run drew them
    standalone = evaluate(samples, aligned, figure_cases=0)
    for key in ("ged", "hm_iou", "dice_max", "ci", "ged_oracle"):
        assert metrics[key] == pytest.approx(standalone.summary[key]), key
    assert (report / "sample_grid.png").stat().st_size > 0

    mlflow.set_tracking_uri(f"sqlite:///{kedro_project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["cimd_pipeline"], order_by=["start_time ASC"])
    assert list(runs["status"]) == ["FINISHED", "FAILED", "FINISHED"]
    last = runs.iloc[-1]
    assert last["metrics.test.ged"] == pytest.approx(metrics["ged"])
    assert last["params.evaluation.samples"] == str(samples)
    for run in runs.itertuples():  # every kedro run, the failed one too
        history = mlflow.MlflowClient().get_metric_history(run.run_id, "system/cpu_utilization_percentage")
        assert len(history) >= 1 and all(0 <= m.value <= 100 * 64 for m in history)
    assert last["metrics.system/system_memory_usage_megabytes"] > 0


def test_external_samples_are_refused_in_a_run_that_samples_itself(kedro_project: Path, tmp_path: Path):
    proc = run_kedro(kedro_project, "--env", "test", "--params", f"evaluation.samples={tmp_path}", check=False)
    assert proc.returncode != 0
    assert "evaluation.samples scores samples drawn elsewhere" in proc.stdout + proc.stderr
    assert not (kedro_project / "data/02_intermediate/cases").exists()
