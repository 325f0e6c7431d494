"""Faults of docs/reliability.md that no module's own tests covered: each must fail clearly.

Configuration errors must name every bad parameter at once, before any data is read; a model
file must never load partially; an empty split and a missing model must say what to run.
"""

from __future__ import annotations

import pytest
import torch

from cimd_pipeline.config import TrainingParams, Variant, validate_parameters
from cimd_pipeline.data.alignment import Normalisation, ResizeMode, align_cases, stack_cases
from cimd_pipeline.data.synthetic import SyntheticConfig, generate
from cimd_pipeline.errors import ConfigError, DataError
from cimd_pipeline.io.model_dataset import TrainedModelDataset
from cimd_pipeline.mlflow_runs import TAG_PID
from cimd_pipeline.models.trained import TrainedModel, build_model
from cimd_pipeline.pipelines.sampling.nodes import sample_test_cases
from cimd_pipeline.io.torch_files import load_state_strict
from cimd_pipeline.training.loop import train
from tests.conftest import make_project_copy
from tests.models.test_cimd import tiny
from tests.reliability.conftest import runs_of, start_kedro

BAD_VALUES = {
    "model.variant": "cimd_xx",
    "model.num_timesteps": 1,
    "training.max_steps": -5,
    "training.batch_size": 0,
    "training.checkpoint_every": 0,
    "training.lr": -1e-3,
    "training.ema_decay": 1.0,
    "training.device": "tpu",
    "sampling.num_samples": 0,
    "sampling.steps": 0,
    "sampling.method": "euler",
    "ingestion.synthetic.num_cases": 0,
    "alignment.image_size": 31,
}


def nested(flat: dict[str, object]) -> dict[str, dict]:
    """``{"a.b.c": v}`` as ``{"a": {"b": {"c": v}}}``, the shape of Kedro's parameters."""
    out: dict[str, dict] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        level = out
        for part in parents:
            level = level.setdefault(part, {})
        level[leaf] = value
    return out


def aligned(splits: dict[str, float]):
    cases = align_cases(
        generate(SyntheticConfig(num_cases=6, image_size=32)), (16, 16), ResizeMode.RESIZE,
        Normalisation.ZSCORE, None, 2, 0.0, 0,
    )
    return stack_cases(cases, splits, 0)


def trained_tiny(**model_changes) -> TrainedModel:
    torch.manual_seed(0)
    params = tiny()
    net = build_model(params, 1)
    model = {**params.model_dump(mode="json"), **model_changes}
    return TrainedModel(model, 1, (16, 16), {}, net.state_dict(), {"steps": 0})


def test_unknown_variant_is_refused_with_the_known_names():
    with pytest.raises(ConfigError, match=r"model\.variant: Input should be .*\(got 'cimd_xx'\)") as error:
        validate_parameters({"model": {"variant": "cimd_xx"}})
    assert all(f"'{variant.value}'" in str(error.value) for variant in Variant)


def test_every_invalid_value_is_named_in_one_error():
    with pytest.raises(ConfigError) as error:
        validate_parameters(nested(BAD_VALUES))
    message = str(error.value)
    missing = [name for name in BAD_VALUES if f"{name}:" not in message]
    assert not missing, message
    assert "alignment.image_size: 31 is not divisible by" in message  # the UNet's down-sampling


def test_empty_test_split_stops_sampling_with_a_clear_error():
    data = aligned({"train": 1.0, "val": 0.0, "test": 0.0})
    assert (data.cases["split"] == "train").all()
    sampling = {"num_samples": 2, "steps": 2, "progress": False}
    with pytest.raises(ValueError, match="the 'test' split is empty: nothing to sample"):
        sample_test_cases(trained_tiny(), data, sampling, {"device": "cpu"})


def test_empty_train_split_stops_training_before_any_step(tmp_path):
    data = aligned({"train": 0.0, "test": 1.0}).subset("train")
    params = TrainingParams(max_steps=2, progress=False)
    with pytest.raises(ValueError, match="the train split is empty"):
        train(build_model(tiny(), 1), data, params, tmp_path / "last.pt", "fp")
    assert not (tmp_path / "last.pt").exists()


def test_model_file_of_another_configuration_lists_shapes_and_loads_nothing(tmp_path):
    dataset = TrainedModelDataset(str(tmp_path / "model.pt"))
    dataset.save(trained_tiny(latent_dim=3))  # weights of latent_dim 6, config says 3
    loaded = dataset.load()
    torch.manual_seed(1)
    target = build_model(loaded.params, 1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    shapes = r"shape mismatch amn\.head\.weight: checkpoint \(12, 8, 1, 1\) vs model \(6, 8, 1, 1\)"
    with pytest.raises(DataError, match=shapes):
        loaded.build(tmp_path / "model.pt")
    with pytest.raises(DataError, match="checkpoint does not match the model configuration"):
        load_state_strict(target, loaded.state_dict, "model.pt")
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing loaded


def test_truncated_model_file_is_a_clear_error(tmp_path):
    path = tmp_path / "model.pt"
    TrainedModelDataset(str(path)).save(trained_tiny())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(Exception, match=r"model\.pt: unreadable or unsafe checkpoint"):
        TrainedModelDataset(str(path)).load()


@pytest.fixture(scope="module")
def failing_runs(tmp_path_factory):
    """Two ``kedro run``s that must fail, started side by side to share the start-up cost."""
    root = tmp_path_factory.mktemp("failing")
    params = ",".join(f"{k}={v}" for k, v in BAD_VALUES.items())
    arguments = {"no_model": ("--pipeline", "sampling"), "bad_params": ("--params", params)}
    runs = {
        name: start_kedro(make_project_copy(root / name), "--env", "test", *args)
        for name, args in arguments.items()
    }
    for run in runs.values():
        run.wait()
    return runs


@pytest.mark.slow
def test_sampling_without_a_trained_model_fails_clearly_via_kedro(failing_runs):
    run = failing_runs["no_model"]
    assert run.returncode != 0
    flat = " ".join(run.output.split())  # rich wraps long lines
    assert "data/06_models/model.pt: checkpoint not found: train a model first" in flat
    (mlflow_run,) = runs_of(run.project)
    assert mlflow_run.info.status == "FAILED"


@pytest.mark.slow
def test_invalid_parameters_via_kedro_fail_at_once_before_any_data(failing_runs):
    run = failing_runs["bad_params"]
    assert run.returncode != 0
    flat = " ".join(run.output.split())
    missing = [name for name in BAD_VALUES if f"- {name}:" not in flat]
    assert not missing, run.output[-6000:]
    written = [p for p in (run.project / "data").rglob("*") if p.is_file()]
    assert not written
    (mlflow_run,) = runs_of(run.project)
    # closed FAILED by the validation hook, not FINISHED by MLflow's exit handler; the owner
    # tags prove MlflowRunOwnerHook ran after kedro-mlflow started the run, before validation
    assert mlflow_run.info.status == "FAILED"
    assert mlflow_run.data.tags[TAG_PID] == str(run.process.pid)
