"""Data-parallel training with torch.distributed on the CPU (2 gloo processes).

Every rank draws the same global batch and trains on its half; averaged gradients make the two
processes follow the one-process trajectory (to float rounding: the gradient sum is split
differently), and a checkpoint continues with another process count.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cimd_pipeline.config import validate_parameters
from cimd_pipeline.errors import ConfigError
from cimd_pipeline.io.torch_files import load_checkpoint
from cimd_pipeline.training.distributed import spawn_training, torchrun_workers
from cimd_pipeline.training.loop import Workers, train
from tests.training.test_loop import data, fresh, params  # noqa: F401  (fixture)

STEPS = 4


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], lr: float = 1e-3) -> None:
    """Equal to rounding. Adam divides each gradient by its running RMS, so in a few biases of the
    zero-initialised output convolutions (gradients near Adam's eps in the first steps) the
    rounding of the split gradient sum is amplified, up to a fraction of one step (lr): measured
    0.03 % of the elements differ by more than 1e-4 after 4 steps. A broken split (the same share
    twice, unaveraged gradients, shared weights) moves most elements by about lr."""
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    assert (diff > 1e-5).float().mean() < 0.005, f"{(diff > 1e-5).float().mean():.4f} of the weights differ"
    assert diff.max() < 0.8 * lr, f"max difference {diff.max():.2e}"


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
