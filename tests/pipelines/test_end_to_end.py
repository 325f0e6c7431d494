"""The whole chain through Kedro on the tiny `conf/test` configuration, MLflow included."""

import json

import mlflow
import pandas as pd
import pytest

from cimd_pipeline.io.aligned_dataset import AlignedDataset
from tests.conftest import run_kedro

pytestmark = pytest.mark.slow


def _runs(project):
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["cimd_pipeline"], order_by=["start_time ASC"])


def test_stage_by_stage_then_whole_chain(kedro_project):
    run_kedro(kedro_project, "--env", "test", "--pipeline", "data_ingestion")
    run_kedro(kedro_project, "--env", "test", "--pipeline", "mask_alignment")
    data = AlignedDataset(str(kedro_project / "data/03_primary/aligned")).load()
    assert data.images.shape[1:] == (1, 16, 16) and data.masks.dtype.name == "uint8"
    report = kedro_project / "data/08_reporting"
    assert (report / "example_cases.png").stat().st_size > 0
    assert (report / "agreement_histogram.png").stat().st_size > 0
    agreement = pd.read_csv(report / "agreement.csv")
    assert len(agreement) == len(data) and {"mean_pairwise_iou", "rater_ged", "all_empty"} <= set(agreement)

    run_kedro(kedro_project, "--env", "test")
    metrics = json.loads((report / "metrics.json").read_text())
    for key in ("ged", "hm_iou", "dice_max", "ci", "ci_hm", "ged_oracle"):
        assert 0.0 <= metrics[key] <= 2.0, key
    assert metrics["num_samples"] == 4 and metrics["sampling_steps"] == 5 and metrics["variant"] == "cimd_aa"
    per_case = pd.read_csv(report / "per_case_metrics.csv")
    assert len(per_case) == metrics["test_cases"] == (data.cases["split"] == "test").sum()
    assert per_case["ged"].mean() == pytest.approx(metrics["ged"])
    for figure in ("sample_grid.png", "metric_histograms.png"):
        assert (report / figure).stat().st_size > 0

    runs = _runs(kedro_project)
    assert len(runs) == 3 and set(runs["status"]) == {"FINISHED"}
    last = runs.iloc[-1]
    assert last["params.model.variant"] == "cimd_aa" and last["params.training.max_steps"] == "12"
    assert last["metrics.test.ged"] == pytest.approx(metrics["ged"])
    # The perfect-sampler floor and the bootstrap interval sit beside GED everywhere.
    assert metrics["ged_low95"] <= metrics["ged"] <= metrics["ged_high95"]
    assert per_case["ged_floor"].mean() == pytest.approx(metrics["ged_floor"])
    for key in ("ged_floor", "ged_floor_16", "ged_floor_100", "ged_low95", "ged_high95"):
        assert last[f"metrics.test.{key}"] == pytest.approx(metrics[key]), key
    assert last["metrics.train.loss"] > 0
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(last["run_id"], "train.loss")) == 4  # logged every 3 of 12 steps
    artefacts = {a.path for folder in ("figures", "reports", "model") for a in client.list_artifacts(last["run_id"], folder)}
    assert {"figures/sample_grid.png", "reports/metrics.json", "reports/per_case_metrics.csv", "model/model.pt"} <= artefacts


def test_invalid_parameters_fail_before_any_data_is_written(kedro_project):
    proc = run_kedro(
        kedro_project, "--env", "test", "--params", "training.max_steps=-1,sampling.num_samples=0", check=False
    )
    assert proc.returncode != 0
    assert "training.max_steps" in proc.stderr + proc.stdout and "sampling.num_samples" in proc.stderr + proc.stdout
    assert not (kedro_project / "data/02_intermediate/cases").exists()
