"""CPU and memory of a run as MLflow system metrics, a run shorter than one interval included."""

from __future__ import annotations

import time

import mlflow
import pytest

from cimd_pipeline.system_metrics import system_metrics


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store for the file: creating one takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def store(store_uri: str, monkeypatch: pytest.MonkeyPatch) -> mlflow.MlflowClient:
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    mlflow.set_tracking_uri(store_uri)
    mlflow.set_experiment("system_metrics")
    return mlflow.MlflowClient(store_uri)


def _history(client: mlflow.MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in client.get_metric_history(run_id, key)]


def test_a_run_shorter_than_one_interval_still_gets_cpu_and_memory(store):
    with mlflow.start_run(log_system_metrics=False) as run, system_metrics(run.info.run_id):
        sum(i * i for i in range(200_000))  # well under MLflow's 10 s interval
    cpu = _history(store, run.info.run_id, "system/cpu_utilization_percentage")
    memory = _history(store, run.info.run_id, "system/system_memory_usage_megabytes")
    assert len(cpu) == 1 and 0 <= cpu[0] <= 100
    assert len(memory) == 1 and memory[0] > 0


def test_periodic_points_then_the_last_part_interval(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    with mlflow.start_run(log_system_metrics=False) as run, system_metrics(run.info.run_id):
        time.sleep(2.5)
    steps = [m.step for m in store.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")]
    assert sorted(steps) == list(range(len(steps))) and len(steps) >= 3  # two whole intervals + the rest


@pytest.mark.parametrize("switch", ["false", "true"])
def test_the_mlflow_switch_turns_ours_off(store, monkeypatch, switch):
    """false: no system metrics; true: MLflow's own monitor only (so nothing is logged twice)."""
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", switch)
    with mlflow.start_run(log_system_metrics=False) as run, system_metrics(run.info.run_id):
        pass
    assert _history(store, run.info.run_id, "system/cpu_utilization_percentage") == []
