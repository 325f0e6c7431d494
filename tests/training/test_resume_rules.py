"""What a checkpoint may be resumed with: the same data, no more steps than asked, the same device
type and precision; and what training leaves behind: its whole duration, no global switches."""

from __future__ import annotations

import pytest
import torch

from cimd_pipeline.config import validate_parameters
from cimd_pipeline.data.alignment import Normalisation, ResizeMode, align_cases, stack_cases
from cimd_pipeline.data.synthetic import SyntheticConfig, generate
from cimd_pipeline.errors import ConfigError
from cimd_pipeline.pipelines.training.nodes import train_model
from cimd_pipeline.io.torch_files import load_checkpoint, save_checkpoint
from cimd_pipeline.training.fingerprint import data_digest
from cimd_pipeline.training.loop import train
from tests.models.test_cimd import tiny
from tests.training.test_loop import assert_resumes_exactly_and_changes_the_run, data, fresh, params  # noqa: F401  (fixture)


def aligned(seed: int = 0, normalisation: Normalisation = Normalisation.ZSCORE):
    cases = align_cases(
        generate(SyntheticConfig(num_cases=8, image_size=32), seed=seed), (16, 16), ResizeMode.RESIZE,
        normalisation, None, 2, 0.0, 0,
    )
    return stack_cases(cases, {"train": 1.0, "test": 0.0001}, 0)


def test_digest_sees_content_that_shapes_and_case_ids_do_not():
    base = aligned()
    other_seed, other_norm = aligned(seed=1), aligned(normalisation=Normalisation.MINMAX)
    for other in (other_seed, other_norm):
        assert other.images.shape == base.images.shape
        assert list(other.cases["case_id"]) == list(base.cases["case_id"])
    digests = {data_digest(d) for d in (base, other_seed, other_norm)}
    assert len(digests) == 3
    assert data_digest(aligned()) == data_digest(base)
    flipped = aligned()
    flipped.masks[-1, 0, 0, 0] ^= 1  # one pixel of one rater of the last case
    assert data_digest(flipped) != data_digest(base)


@pytest.mark.parametrize("change", ["ingestion.seed", "alignment.normalisation"])
def test_changed_data_retrains_instead_of_resuming_the_old_model(tmp_path, change):
    model = tiny().model_dump(mode="json")
    training = {"max_steps": 2, "batch_size": 2, "checkpoint_every": 1, "log_every": 1, "progress": False,
                "checkpoint_dir": str(tmp_path / "checkpoints")}
    first, _ = train_model(aligned(), model, training, {"normalisation": "zscore"})
    again, _ = train_model(aligned(), model, training, {"normalisation": "zscore"})
    assert again.info["resumed_from"] == 2  # unchanged data: the finished checkpoint is reused
    changed = aligned(seed=1) if change == "ingestion.seed" else aligned(normalisation=Normalisation.MINMAX)
    second, _ = train_model(changed, model, training, {"normalisation": "zscore"})
    assert second.info["resumed_from"] == 0
    assert second.info["data_digest"] == data_digest(changed.subset("train")) != first.info["data_digest"]
    assert any(not torch.equal(v, second.state_dict[k]) for k, v in first.state_dict.items())


def test_lower_max_steps_than_the_checkpoint_is_refused(data, tmp_path):  # noqa: F811
    train(fresh(), data, params(max_steps=6), tmp_path / "last.pt", "fp")
    with pytest.raises(ValueError, match=r"at step 6, beyond training\.max_steps=3.*training\.resume=false"):
        train(fresh(), data, params(max_steps=3), tmp_path / "last.pt", "fp")
    assert train(fresh(), data, params(max_steps=3, resume=False), tmp_path / "last.pt", "fp").steps == 3


@pytest.mark.parametrize(
    ("written", "named"),
    [({"device": "cuda", "precision": "bf16"}, ["'cuda'", "'bf16'", "'cpu'", "'fp32'"]),
     ({"precision": "bf16"}, ["training.bf16", "'bf16'", "'fp32'"])],
)
def test_checkpoint_of_another_device_or_precision_is_refused_saying_what_differs(
    data, tmp_path, written, named  # noqa: F811
):
    path = tmp_path / "last.pt"
    train(fresh(), data, params(max_steps=3), path, "fp")
    save_checkpoint({**load_checkpoint(path), **written}, path)  # as if written on a GPU
    with pytest.raises(ValueError, match="cannot resume on another device type or precision") as error:
        train(fresh(), data, params(max_steps=6), path, "fp")
    for word in named:
        assert word in str(error.value)
    if "device" not in written:
        assert "training.device:" not in str(error.value)


def test_train_seconds_add_up_over_resumes(data, tmp_path):  # noqa: F811
    path = tmp_path / "last.pt"
    first = train(fresh(), data, params(max_steps=3), path, "fp")
    assert load_checkpoint(path)["seconds"] == first.seconds  # one clock reading for both
    save_checkpoint({**load_checkpoint(path), "seconds": 1000.0}, path)  # a long first session
    resumed = train(fresh(), data, params(max_steps=6), path, "fp")
    assert 1000.0 < resumed.seconds < 1000.0 + 120
    assert load_checkpoint(path)["seconds"] == resumed.seconds
    again = train(fresh(), data, params(max_steps=6), path, "fp")  # finished: nothing to add
    assert resumed.seconds <= again.seconds < resumed.seconds + 60


@pytest.mark.parametrize("previous", [(False, False), (True, True)])
def test_deterministic_mode_is_put_back_after_training_and_after_an_error(data, tmp_path, previous):  # noqa: F811
    seen = []
    net = fresh()
    losses = net.losses

    def spy(*args):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return losses(*args)

    net.losses = spy
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    try:
        train(net, data, params(max_steps=2, deterministic=True), tmp_path / "a.pt", "fp")
        assert seen == [True, True]
        state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
        assert state == previous
        with torch.no_grad():
            for p in net.denoiser.parameters():
                p.fill_(float("nan"))
        with pytest.raises(FloatingPointError):
            train(net, data, params(max_steps=2, deterministic=True, resume=False), tmp_path / "b.pt", "fp")
        state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
        assert state == previous
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("variant", ["prob_unet", "phiseg"])
def test_deterministic_baseline_on_cuda_is_refused_before_the_run(monkeypatch, variant):
    config = {"model": {"variant": variant}, "training": {"deterministic": True, "device": "cuda"}}
    with pytest.raises(ConfigError, match=f"training.deterministic: {variant} up-samples bilinearly"):
        validate_parameters(config)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="training.deterministic"):
        validate_parameters({**config, "training": {"deterministic": True}})  # device auto picks CUDA
    validate_parameters({**config, "training": {"deterministic": True, "device": "cpu"}})
    validate_parameters({"model": {"variant": "cimd_aa"}, "training": config["training"]})


def test_cpu_bf16_training_resumes_exactly_and_no_fp32_checkpoint_continues_under_it(data, tmp_path):  # noqa: F811
    full = train(fresh(), data, params(cpu_bf16=True), tmp_path / "a" / "last.pt", "fp")
    assert_resumes_exactly_and_changes_the_run(full, data, tmp_path, cpu_bf16=True)
    path = tmp_path / "c" / "last.pt"  # the fp32 run the helper trained
    with pytest.raises(ValueError, match="checkpoint written with precision 'fp32', this run has 'bf16'"):
        train(fresh(), data, params(max_steps=8, cpu_bf16=True), path, "fp")
