"""The Prob. U-Net and PHiSeg baselines through the shared training loop and the Kedro chain."""

import json
import runpy
import sys

import mlflow
import numpy as np
import pytest
import torch

from cimd_pipeline.config import ModelParams, SamplingParams, TrainingParams, validate_parameters
from cimd_pipeline.data.alignment import Normalisation, ResizeMode, align_cases, stack_cases
from cimd_pipeline.data.synthetic import SyntheticConfig, generate
from cimd_pipeline.errors import ConfigError
from cimd_pipeline.io.aligned_dataset import AlignedDataset
from cimd_pipeline.io.sample_dataset import SampleSetDataset
from cimd_pipeline.models.phiseg import PHiSeg
from cimd_pipeline.models.prob_unet import ProbUNet
from cimd_pipeline.models.trained import TrainedModel, build_model
from cimd_pipeline.pipelines.evaluation.nodes import evaluate_samples
from cimd_pipeline.training.loop import train
from tests.conftest import PROJECT, run_kedro

TINY = {
    "prob_unet": {"filters": [8, 8, 8, 8], "num_convs": 1, "latent_dim": 3},
    "phiseg": {"filters": [8, 8], "num_convs": 1, "phiseg_levels": 2, "phiseg_resolution_levels": 3},
}


def tiny(variant: str) -> ModelParams:
    return ModelParams.model_validate({"variant": variant, "baselines": TINY[variant]})


def fresh(variant: str):
    torch.manual_seed(0)
    return build_model(tiny(variant), image_channels=1)


@pytest.fixture(scope="module")
def data():
    cases = generate(SyntheticConfig(num_cases=8, image_size=32))
    aligned = align_cases(cases, (16, 16), ResizeMode.RESIZE, Normalisation.ZSCORE, None, 2, 0.0, 0)
    return stack_cases(aligned, {"train": 1.0, "test": 0.0001}, 0).subset("train")


def params(**kw) -> TrainingParams:
    base = {"max_steps": 6, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 3, "log_every": 2, "progress": False}
    return TrainingParams.model_validate({**base, **kw})


def test_build_model_dispatches_on_the_variant():
    assert isinstance(fresh("prob_unet"), ProbUNet) and isinstance(fresh("phiseg"), PHiSeg)


@pytest.mark.parametrize("variant", ["prob_unet", "phiseg"])
def test_resumed_training_reaches_exactly_the_uninterrupted_weights(variant, data, tmp_path):
    full = train(fresh(variant), data, params(), tmp_path / "a" / "last.pt", "fp")
    train(fresh(variant), data, params(max_steps=3), tmp_path / "b" / "last.pt", "fp")
    resumed = train(fresh(variant), data, params(), tmp_path / "b" / "last.pt", "fp")
    assert resumed.resumed_from == 3 and resumed.steps == 6
    for key, value in full.ema_state.items():
        assert torch.equal(value, resumed.ema_state[key]), key
    assert {"loss", "bce", "kl"} <= set(full.history[-1])


@pytest.mark.parametrize("variant", ["prob_unet", "phiseg"])
def test_trained_model_round_trip_samples_identically(variant):
    net = fresh(variant).eval()
    trained = TrainedModel(tiny(variant).model_dump(mode="json"), 1, (16, 16), {}, net.state_dict())
    rebuilt = TrainedModel.from_dict(trained.to_dict()).build()
    image = torch.randn(2, 1, 16, 16)
    draws = [m.sample(image, SamplingParams(), torch.Generator().manual_seed(0)) for m in (net, rebuilt)]
    torch.testing.assert_close(*draws)


def test_image_sizes_the_baselines_cannot_use_are_refused_up_front():
    deep = {"variant": "phiseg", "baselines": {"phiseg_resolution_levels": 6}}
    with pytest.raises(ConfigError, match="phiseg: 6 resolution levels need a multiple of 32"):
        validate_parameters({"model": deep, "alignment": {"image_size": 16}})
    with pytest.raises(ConfigError, match="prior/posterior nets at least 16 pixels"):
        validate_parameters({"model": {"variant": "prob_unet"}, "alignment": {"image_size": 8}})
    with pytest.raises(ConfigError, match="phiseg_levels cannot exceed"):
        validate_parameters({"model": {"baselines": {"phiseg_levels": 4, "phiseg_resolution_levels": 3}}})
    assert validate_parameters({"model": {"variant": "phiseg"}, "alignment": {"image_size": 16}})


@pytest.mark.slow
def test_both_baselines_run_the_whole_chain_with_the_cimd_metrics(kedro_project, monkeypatch):
    report = kedro_project / "data/08_reporting"
    # phiseg at its base size takes minutes on 2 cores; three shallow levels keep CI quick
    runs = {
        "prob_unet": "model.variant=prob_unet",
        "phiseg": "model.variant=phiseg,model.baselines.num_convs=1,model.baselines.phiseg_levels=3,"
        "model.baselines.phiseg_resolution_levels=3,training.max_steps=6",
    }
    written = {}
    for variant, overrides in runs.items():
        run_kedro(kedro_project, "--env", "test", "--params", overrides)
        written[variant] = json.loads((report / "metrics.json").read_text())
        assert written[variant]["variant"] == variant and written[variant]["num_samples"] == 4

    # the keys a CIMD run writes, from the same evaluation node on the same samples
    samples = SampleSetDataset(str(kedro_project / "data/07_model_output/test_samples.npz")).load()
    data = AlignedDataset(str(kedro_project / "data/03_primary/aligned")).load()
    cimd = TrainedModel(ModelParams().model_dump(mode="json"), 1, (16, 16), {}, {})
    expected = set(evaluate_samples(samples, data, cimd)[0])
    for variant, metrics in written.items():
        assert set(metrics) == expected, variant
        assert all(np.isfinite(metrics[k]) for k in ("ged", "hm_iou", "dice_max", "ci", "sampling_seconds"))

    mlflow.set_tracking_uri(f"sqlite:///{kedro_project / 'mlflow.db'}")
    table = mlflow.search_runs(experiment_names=["cimd_pipeline"], order_by=["start_time ASC"])
    assert list(table["params.model.variant"]) == ["prob_unet", "phiseg"] and set(table["status"]) == {"FINISHED"}
    assert table["metrics.test.ged"].notna().all() and table["metrics.train.bce"].notna().all()
    client = mlflow.MlflowClient()
    for run_id in table["run_id"]:
        assert "model/model.pt" in {a.path for a in client.list_artifacts(run_id, "model")}

    # the comparison figure of the latest run of each variant, logged to a run of its own
    script = PROJECT / "benchmarks/compare_models.py"
    monkeypatch.syspath_prepend(str(script.parent))
    monkeypatch.setattr(sys, "argv", [str(script), "--project", str(kedro_project), "--latest", "--cases", "2",
                                      "--samples", "4"])
    runpy.run_path(str(script), run_name="__main__")
    assert (report / "model_comparison.png").stat().st_size > 0
    comparison = mlflow.search_runs(experiment_names=["cimd_pipeline"], filter_string="tags.comparison = 'true'")
    assert len(comparison) == 1
    assert comparison["params.compared_runs"].iloc[0] == ",".join(table["run_id"])
    assert {a.path for a in client.list_artifacts(comparison["run_id"].iloc[0], "figures")} == {"figures/model_comparison.png"}
