"""The benchmark scripts a user runs directly: ablation (and its --summarise), step sweep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tests.conftest import PROJECT, make_project_copy


def run_script(project: Path, name: str, *args: str) -> str:
    env = {**os.environ, "CIMD_PROJECT_DIR": str(project), "KEDRO_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run([sys.executable, str(PROJECT / "benchmarks" / name), *args], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project_copy(tmp_path_factory.mktemp("bench") / "project")


def test_ablation_runs_each_variant_and_combines_streams(project):
    run_script(project, "ablation.py", "--env", "test", "--steps", "3", "--variants", "ddpm_det", "cimd_aa",
               "--extra", "sampling.max_cases=2")
    report = project / "data/08_reporting"
    table = pd.read_csv(report / "ablation.csv")
    assert list(table["variant"]) == ["ddpm_det", "cimd_aa"] and set(table["seed"]) == {0}
    assert table[["ged", "hm_iou", "ged_oracle", "train_seconds"]].notna().all().all()
    assert (report / "ablation.png").stat().st_size > 0
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["cimd_pipeline"], filter_string="tags.ablation LIKE 'ablation-%'")
    assert sorted(runs["tags.variant"]) == ["cimd_aa", "ddpm_det"]
    assert set(runs["run_id"]) == set(table["run_id"])

    # a second stream's rows (another seed) combined without training
    other = table.assign(seed=1, ged=table["ged"] + 0.1)
    first, second = project / "a.csv", project / "b.csv"
    table.to_csv(first, index=False)
    other.to_csv(second, index=False)
    run_script(project, "ablation.py", "--summarise", str(second), str(first))
    combined = pd.read_csv(report / "ablation.csv")
    assert list(combined["variant"]) == ["cimd_aa", "cimd_aa", "ddpm_det", "ddpm_det"]  # VARIANTS order
    assert list(combined["seed"]) == [0, 1, 0, 1]
    markdown = (report / "ablation.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| ddpm_det |"))
    mean = table.loc[table["variant"] == "ddpm_det", "ged"].iloc[0] + 0.05
    assert row.startswith(f"| ddpm_det | 2 | {mean:.3f} ± 0.071 |")  # std of {g, g + 0.1}


def test_step_sweep_tabulates_and_logs(project):
    if not (project / "data/06_models/model.pt").exists():
        run_script(project, "ablation.py", "--env", "test", "--steps", "3", "--variants", "cimd_aa")
    run_script(project, "step_sweep.py", "--env", "test", "--steps", "4", "2", "--methods", "ddim",
               "--max-cases", "2")
    sweep = pd.read_csv(project / "data/08_reporting/step_sweep.csv")
    assert list(sweep["steps"]) == [4, 2] and (sweep["masks_per_second"] > 0).all()
    assert (sweep["test_cases"] == 2).all()
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["cimd_pipeline"], filter_string="tags.sweep = 'sampling_steps'"
                             " and attributes.run_name = 'step_sweep'")
    assert len(run) == 1
    history = mlflow.MlflowClient().get_metric_history(run["run_id"].iloc[0], "sweep.ddim.ged")
    assert sorted(m.step for m in history) == [2, 4]


def test_ambiguity_probe_measures_the_encoders(project):
    """The probe reads the last (cimd_aa) model; larger initial heads must show a larger KL."""
    model = project / "data/06_models/model.pt"
    if not model.exists():
        run_script(project, "ablation.py", "--env", "test", "--steps", "3", "--variants", "cimd_aa")
    out = run_script(project, "ambiguity_probe.py", "--cases", "8")
    assert "cimd_aa model" in out
    table = pd.read_csv(project / "data/08_reporting/ambiguity_probe.csv").set_index("encoders")
    assert list(table.columns) == ["kl", "amn_spread", "rater_shift", "grad_share"]
    assert (table >= 0).all().all() and table.notna().all().all()
    small, default = table.loc["fresh, head N(0, 0.01^2)"], table.loc["fresh, PyTorch default init"]
    assert default["kl"] > small["kl"] and default["grad_share"] > small["grad_share"]
