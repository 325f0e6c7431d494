"""The learning-rate schedule: its values, its checks, and a decayed run that resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch

from cimd_pipeline.config import TrainingParams
from cimd_pipeline.training.fingerprint import data_digest, run_fingerprint
from cimd_pipeline.training.loop import train
from cimd_pipeline.training.schedule import learning_rate
from tests.training.test_loop import assert_resumes_exactly_and_changes_the_run, data, fresh, params  # noqa: F401


def rates(**kw) -> list[float]:
    p = TrainingParams.model_validate({"lr": 1e-3, **kw})
    return [learning_rate(step, p) for step in range(p.max_steps)]


def test_warm_up_rises_linearly_to_the_rate_then_constant_keeps_it():
    got = rates(max_steps=8, warmup_steps=4)
    assert got == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3], abs=0, rel=1e-12)
    assert rates(max_steps=5) == [1e-3] * 5  # the default is the constant rate of every earlier run


def test_cosine_falls_from_the_rate_to_its_floor_on_the_last_step():
    got = rates(max_steps=11, lr_schedule="cosine", min_lr_ratio=0.1)
    assert got[0] == pytest.approx(1e-3) and got[-1] == pytest.approx(1e-4)
    assert got[5] == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half-way: the mean of rate and floor
    assert got[2] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert all(a > b for a, b in zip(got, got[1:]))
    warm = rates(max_steps=12, warmup_steps=2, lr_schedule="cosine")
    assert warm[:3] == pytest.approx([5e-4, 1e-3, 1e-3]) and warm[-1] == 0.0


def test_a_schedule_that_cannot_run_is_refused_before_training():
    with pytest.raises(ValueError, match="warmup_steps=10 leaves no step"):
        TrainingParams(max_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="min_lr_ratio=0.1 is the end of the cosine decay"):
        TrainingParams(min_lr_ratio=0.1)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainingParams(lr_schedule="step")


def test_the_optimiser_takes_each_steps_rate_and_a_decayed_run_resumes_exactly(data, tmp_path):  # noqa: F811
    seen: list[float] = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    cosine = {"lr_schedule": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.2}
    torch.optim.AdamW.step = spy
    try:
        full = train(fresh(), data, params(**cosine), tmp_path / "a" / "last.pt", "fp")
    finally:
        torch.optim.AdamW.step = step
    assert seen == rates(max_steps=6, **cosine) and seen[0] == pytest.approx(5e-4) and seen[-1] == pytest.approx(2e-4)
    assert_resumes_exactly_and_changes_the_run(full, data, tmp_path, **cosine)


def test_a_decay_is_fingerprinted_with_where_it_ends_and_the_constant_rate_is_not(data):  # noqa: F811
    model, digest = {"variant": "cimd_aa"}, data_digest(data)

    def fp(**kw):
        return run_fingerprint(model, params(**kw), digest)

    assert fp(max_steps=5) == fp(max_steps=50)  # constant: a longer run continues a shorter one
    assert fp(max_steps=5, lr_schedule="cosine") != fp(max_steps=50, lr_schedule="cosine")
    assert len({fp(), fp(lr_schedule="cosine"), fp(warmup_steps=2), fp(lr_schedule="cosine", min_lr_ratio=0.5)}) == 4
