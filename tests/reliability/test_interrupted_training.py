"""A ``kedro run`` killed with SIGKILL mid-training resumes from its last complete checkpoint.

Nothing in the killed process gets to clean up: the checkpoint on disk must be whole (atomic
write), the re-run must continue from it with the same loss curve, and the killed attempt's
MLflow run must end up KILLED instead of RUNNING forever.
"""

from __future__ import annotations

import os
import signal

import pytest

from cimd_pipeline.io.model_dataset import TrainedModelDataset
from cimd_pipeline.mlflow_runs import TAG_PID
from cimd_pipeline.io.torch_files import load_checkpoint
from tests.reliability.conftest import mlflow_client, runs_of, start_kedro, wait_for

pytestmark = pytest.mark.slow

MAX_STEPS = 80
TRAINING = f"training.max_steps={MAX_STEPS},training.checkpoint_every=10,training.log_every=5"


def test_sigkill_during_training_then_rerun_resumes_and_closes_the_killed_run(kedro_project):
    first = start_kedro(
        kedro_project,
        "--env", "test", "--pipelines", "data_ingestion,mask_alignment,training", "--params", TRAINING,
        log="killed",
    )
    checkpoints = kedro_project / "data/06_models/checkpoints"
    try:
        wait_for(lambda: list(checkpoints.glob("*/last.pt")), 300, "the first checkpoint", first)
    finally:
        os.killpg(first.process.pid, signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    (checkpoint,) = checkpoints.glob("*/last.pt")
    state = load_checkpoint(checkpoint)
    killed_at = state["step"]
    assert 0 < killed_at < MAX_STEPS, "the run must be killed mid-way"
    curve_before_kill = {row["step"]: row["loss"] for row in state["history"]}
    assert not (kedro_project / "data/06_models/model.pt").exists()
    (killed,) = runs_of(kedro_project)
    assert killed.info.status == "RUNNING"  # what MLflow shows until someone closes it

    second = start_kedro(
        kedro_project, "--env", "test", "--pipeline", "training", "--params", TRAINING, log="resumed"
    ).check()

    model = TrainedModelDataset(str(kedro_project / "data/06_models/model.pt")).load()
    assert model.info["resumed_from"] == killed_at and model.info["steps"] == MAX_STEPS
    assert "resuming training from step" in second.output
    assert "marked KILLED" in second.output

    killed_again, resumed = runs_of(kedro_project)
    assert killed_again.info.run_id == killed.info.run_id and killed_again.info.status == "KILLED"
    assert killed.data.tags[TAG_PID] == str(first.process.pid)
    assert resumed.info.status == "FINISHED"
    history = mlflow_client(kedro_project).get_metric_history(resumed.info.run_id, "train.loss")
    logged = {point.step: point.value for point in history}
    assert sorted(logged) == list(range(5, MAX_STEPS + 1, 5))
    for step, loss in curve_before_kill.items():
        assert logged[step] == pytest.approx(loss, rel=1e-12), step
