"""Same seed and configuration, same results: aligned data, CPU training losses and metrics.

The two runs come from the `twin_runs` fixture: ``kedro run --env test`` in two fresh copies of
the project. Timings are the only numbers allowed to differ.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from cimd_pipeline.config import TrainingParams
from cimd_pipeline.data.alignment import Normalisation, ResizeMode, align_cases, stack_cases
from cimd_pipeline.data.synthetic import SyntheticConfig, generate
from cimd_pipeline.io.case_folder import CaseFolderDataset
from cimd_pipeline.io.model_dataset import TrainedModelDataset
from cimd_pipeline.training.loop import deterministic_algorithms, train
from tests.reliability.conftest import mlflow_client, runs_of
from tests.training.test_loop import fresh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def twins(twin_runs):
    for run in twin_runs.runs:
        run.check()
    return twin_runs.projects


def test_same_seed_gives_byte_identical_ingested_and_aligned_data(twins):
    first, second = twins
    aligned = sorted(p.name for p in (first / "data/03_primary/aligned").iterdir())
    assert aligned == ["cases.csv", "images.npy", "masks.npy", "oracle.npy", "rater_valid.npy"]
    for name in aligned:
        a = (first / "data/03_primary/aligned" / name).read_bytes()
        assert a == (second / "data/03_primary/aligned" / name).read_bytes(), name
    # ingested cases are compressed archives that carry write times: compare their arrays
    cases = [CaseFolderDataset(str(p / "data/02_intermediate/cases")).load() for p in twins]
    assert cases[0].manifest.equals(cases[1].manifest)
    for a, b in zip(*cases):
        for field in ("image", "masks", "rater_valid", "oracle"):
            assert getattr(a, field).tobytes() == getattr(b, field).tobytes(), (a.case_id, field)


def test_same_seed_gives_identical_cpu_training_losses_and_weights(twins):
    histories = []
    for project in twins:
        (run,) = runs_of(project)
        points = mlflow_client(project).get_metric_history(run.info.run_id, "train.loss")
        histories.append([(p.step, p.value) for p in points])
    assert len(histories[0]) == 4 and histories[0] == histories[1]
    models = [TrainedModelDataset(str(p / "data/06_models/model.pt")).load() for p in twins]
    assert models[0].state_dict.keys() == models[1].state_dict.keys()
    for key, value in models[0].state_dict.items():
        assert torch.equal(value, models[1].state_dict[key]), key


def test_same_seed_gives_identical_metrics_except_timings(twins):
    first, second = (json.loads((p / "data/08_reporting/metrics.json").read_text()) for p in twins)
    timings = {k for k in first if k.endswith("_seconds")}
    assert timings == {"sampling_seconds", "train_seconds"}
    assert {k: v for k, v in first.items() if k not in timings} == {
        k: v for k, v in second.items() if k not in timings
    }
    per_case = [(p / "data/08_reporting/per_case_metrics.csv").read_bytes() for p in twins]
    assert per_case[0] == per_case[1]


@pytest.fixture
def one_thread():
    """Torch's default threads spin against other jobs on shared cores (20x slower here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_deterministic_flag_repeats_training_exactly_and_sets_cublas_workspace(
    tmp_path, monkeypatch, one_thread
):
    aligned = align_cases(
        generate(SyntheticConfig(num_cases=8, image_size=32)), (16, 16), ResizeMode.RESIZE,
        Normalisation.ZSCORE, None, 2, 0.0, 0,
    )
    data = stack_cases(aligned, {"train": 1.0, "test": 0.0001}, 0).subset("train")
    params = TrainingParams(max_steps=4, batch_size=4, log_every=1, progress=False, deterministic=True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    runs = [train(fresh(), data, params, tmp_path / f"{i}.pt", "fp") for i in range(2)]
    assert not torch.are_deterministic_algorithms_enabled()  # switched on for training only
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ  # CPU: not needed
    with deterministic_algorithms(torch.device("cuda")):
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert runs[0].history == runs[1].history
    assert all(np.isfinite(row["loss"]) for row in runs[0].history)
    for key, value in runs[0].ema_state.items():
        assert torch.equal(value, runs[1].ema_state[key]), key
