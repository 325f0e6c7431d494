"""Data-parallel training with torch.distributed on the CPU (2 gloo processes).

Every rank draws the same global batch and trains on its half; averaged gradients make the two
processes follow the one-process trajectory (to float rounding: the gradient sum is split
differently), and a checkpoint continues with another process count. The promise holds for every
variant and for every switch that draws randomness (flips, every rater in a step, intensity and affine changes, dropout,
self-conditioning, the latent, the baselines' latents and PHiSeg's batch norm) or varies the
learning rate by step: each is trained in 2 processes, all in one pair of spawned workers, and
compared with one process.
"""

from __future__ import annotations

import typing
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cimd_pipeline.config import ModelParams, TrainingParams, validate_parameters
from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.errors import ConfigError
from cimd_pipeline.io.torch_files import load_checkpoint
from cimd_pipeline.models.trained import build_model
from cimd_pipeline.processes import torchrun_workers
from cimd_pipeline.training.distributed import spawn_training
from cimd_pipeline.training.loop import Workers, train
from tests.models.test_cimd import TINY_UNET
from tests.training.test_loop import data, fresh, params  # noqa: F401  (fixture)

STEPS = 4
# every spatial axis the flips know, read from the parameter itself
FLIP_AXES = list(typing.get_args(typing.get_args(TrainingParams.model_fields["flip_axes"].annotation)[0]))
BASELINES = {"filters": [8, 16], "num_convs": 1, "latent_dim": 3, "phiseg_levels": 2, "phiseg_resolution_levels": 3}
# name -> model block; every one trains with flips along every axis
VARIANTS: dict[str, dict[str, typing.Any]] = {
    "cimd_aa+self_condition": {"variant": "cimd_aa", "self_condition": True},
    "cimd_fc+affine": {"variant": "cimd_fc"},
    "cimd_aa+all_raters+intensity+lr_cosine+dropout": {"variant": "cimd_aa"},
    "cimd_latent+self_condition": {"variant": "cimd_latent", "self_condition": True},
    "ddpm_det": {"variant": "ddpm_det"},
    "ddpm_prob": {"variant": "ddpm_prob"},
    "prob_unet": {"variant": "prob_unet"},
    "phiseg": {"variant": "phiseg"},
}

# name -> training switches besides the flips
TRAINING = {"cimd_aa+all_raters+intensity+lr_cosine+dropout": {"all_raters": True, "intensity_scale": 0.2, "intensity_shift": 0.3,
                                                        "lr_schedule": "cosine", "warmup_steps": 1, "dropout": 0.2},
            "cimd_fc+affine": {"affine_rotation": 20.0, "affine_translation": 0.1, "affine_scaling": 0.2}}


def variant_model(name: str) -> nn.Module:
    block = {"unet": TINY_UNET, "ambiguity_nets": {"filters": [8, 8, 8, 8]}, "baselines": BASELINES, **VARIANTS[name]}
    torch.manual_seed(0)
    return build_model(ModelParams.model_validate(block), 1)


def variant_params(name: str, **kw) -> TrainingParams:
    return params(max_steps=STEPS, checkpoint_every=STEPS, flip_axes=FLIP_AXES, **TRAINING.get(name, {}), **kw)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], lr: float = 1e-3) -> None:
    """Equal to rounding. Adam divides each gradient by its running RMS, so in a few biases whose
    gradients are near Adam's eps in the first steps (behind the zero-initialised output
    convolution) the rounding of the split gradient sum is amplified up to a step or two (lr):
    measured after 4 steps over every variant, at most 72 of 76,570 elements differ by more than
    1e-5, 20 by more than 1e-4, the largest by 1.7e-3. A broken split (the same share twice,
    unaveraged gradients, flips or batch statistics per process) moves most elements (measured:
    79-99 %)."""
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    assert (diff > 1e-5).float().mean() < 0.005, f"{(diff > 1e-5).float().mean():.4f} of the weights differ"
    worst = max(a, key=lambda k: (a[k].float() - b[k].float()).abs().max())
    assert (diff > 0.1 * lr).float().mean() < 0.001, f"{int((diff > 0.1 * lr).sum())} elements, the worst in {worst}"


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):  # noqa: F811
    path = tmp_path_factory.mktemp("one") / "last.pt"
    result = train(fresh(), data, params(max_steps=STEPS, checkpoint_every=2), path, "fp")
    return result, load_checkpoint(path)


def test_two_gloo_processes_follow_the_one_process_trajectory(data, tmp_path, one_process):  # noqa: F811
    single, single_state = one_process
    path = tmp_path / "last.pt"
    double = spawn_training(fresh(), data, params(max_steps=STEPS, checkpoint_every=2, num_processes=2), path, "fp")
    assert double.steps == STEPS and double.resumed_from == 0
    assert_same_weights(single_state["model"], load_checkpoint(path)["model"])
    assert_same_weights(single.ema_state, double.ema_state)
    assert [h["step"] for h in double.history] == [h["step"] for h in single.history]
    for mine, theirs in zip(double.history, single.history):
        assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-6)  # kl is ~1e-5 itself
    # not a trivial equality: the weights moved away from the initialisation
    start = fresh().state_dict()
    assert any(not torch.allclose(start[k], v) for k, v in single_state["model"].items())


def _train_every_variant(rank: int, size: int, folder: Path, data: AlignedSet) -> None:  # noqa: F811
    """One spawned rank: train every variant in turn in one process group (one start-up for all)."""
    dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=size)
    try:
        for name in VARIANTS:
            result = train(variant_model(name), data, variant_params(name), folder / name / "last.pt", "fp",
                           Workers(rank, size, rank))
            if rank == 0:
                torch.save(asdict(result), folder / name / "result.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_variants(data, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("variants").resolve()
    mp.spawn(_train_every_variant, args=(2, folder, data), nprocs=2, join=True)
    return folder


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_and_random_switch_follows_the_one_process_trajectory(
    name, data, tmp_path, two_process_variants  # noqa: F811
):
    single = train(variant_model(name), data, variant_params(name), tmp_path / "last.pt", "fp")
    double = torch.load(two_process_variants / name / "result.pt", weights_only=True)
    double_state = load_checkpoint(two_process_variants / name / "last.pt")
    assert double["steps"] == STEPS
    assert_same_weights(load_checkpoint(tmp_path / "last.pt")["model"], double_state["model"])
    assert_same_weights(single.ema_state, double["ema_state"])
    for mine, theirs in zip(double["history"], single.history, strict=True):
        assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    start = variant_model(name).state_dict()
    assert any(not torch.allclose(start[k].float(), v.float()) for k, v in single.ema_state.items())


def test_a_two_process_run_continues_in_one_process_to_the_same_weights(
    data, tmp_path, one_process, monkeypatch  # noqa: F811
):
    single, single_state = one_process
    monkeypatch.chdir(tmp_path)
    path = Path("checkpoints") / "last.pt"  # relative, as conf/base's checkpoint_dir
    partial = spawn_training(fresh(), data, params(max_steps=2, num_processes=2), path, "fp")
    assert partial.steps == 2 and load_checkpoint(path)["step"] == 2
    resumed = train(fresh(), data, params(max_steps=STEPS, checkpoint_every=2), path, "fp")
    assert resumed.resumed_from == 2 and resumed.steps == STEPS
    assert_same_weights(single_state["model"], load_checkpoint(path)["model"])
    assert_same_weights(single.ema_state, resumed.ema_state)


def test_batch_shares_tile_the_global_batch_and_must_divide_it(monkeypatch):
    assert [Workers(r, 4).share(8) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by the 4 training processes"):
        Workers(1, 4).share(6)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_workers() is None
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert torchrun_workers() == Workers(5, 8, 1)


def test_a_batch_the_processes_cannot_share_equally_is_refused_before_the_run():
    with pytest.raises(ConfigError, match="training.batch_size: 6 is not divisible by training.num_processes=4"):
        validate_parameters({"training": {"batch_size": 6, "num_processes": 4}})
    validate_parameters({"training": {"batch_size": 8, "num_processes": 4}})
