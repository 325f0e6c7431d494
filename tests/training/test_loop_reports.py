"""What the training loop tells its user and how it runs each step: the progress bar, the log
lines, the logged loss averages, the error messages of a broken run, and the switches (autocast,
deterministic kernels, EMA decay) that each step runs under."""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from typing import ClassVar

import pytest
import torch

from cimd_pipeline.errors import DataError
from cimd_pipeline.training import loop
from cimd_pipeline.io.torch_files import load_checkpoint, save_checkpoint
from cimd_pipeline.training.loop import train
from tests.training import test_loop
from tests.training.test_loop import fresh, params

data = test_loop.data  # test_loop's fixture: aligned synthetic training cases at 16x16

MESSAGES = "cimd_pipeline.training.loop"


class Bar:
    """Stands in for tqdm and keeps what the loop asked of it."""

    made: ClassVar[list[Bar]] = []

    def __init__(self, **kwargs):
        self.kwargs, self.updates, self.postfix, self.closed = kwargs, [], [], False
        Bar.made.append(self)

    def update(self, n):
        self.updates.append(n)

    def set_postfix(self, **kwargs):
        self.postfix.append(kwargs)

    def close(self):
        self.closed = True


@pytest.fixture
def bar(monkeypatch):
    Bar.made = []
    monkeypatch.setattr(loop, "tqdm", lambda **kwargs: Bar(**kwargs))
    return Bar.made


def recording_losses(model, fail_at=None, poison_at=None):
    """Wrap ``model.losses``: keep every step's loss; raise at call ``fail_at`` (an interrupted
    run) or turn the loss into NaN from call ``poison_at`` on (a diverging run)."""
    seen, real = [], model.losses

    def losses(*args):
        if fail_at is not None and len(seen) + 1 == fail_at:
            raise KeyboardInterrupt("stopped")
        terms = real(*args)
        if poison_at is not None and len(seen) + 1 >= poison_at:
            terms = {**terms, "loss": terms["loss"] * float("nan")}
        seen.append(float(terms["loss"].detach()))
        return terms

    model.losses = losses
    return seen


def test_the_progress_bar_counts_every_step_from_where_a_run_resumes(data, tmp_path, bar):
    first = train(fresh(), data, params(max_steps=3), tmp_path / "last.pt", "fp")
    resumed = train(fresh(), data, params(progress=True), tmp_path / "last.pt", "fp")
    assert bar[0].kwargs["disable"] is True  # progress: false
    shown = bar[1]
    assert shown.kwargs == {"total": 6, "initial": 3, "disable": False, "desc": "training", "unit": "step"}
    assert shown.updates == [1, 1, 1] and shown.closed
    # the postfix shows each logged mean loss (steps 4 and 6), to four decimals
    assert shown.postfix == [{"loss": f"{h['loss']:.4f}"} for h in resumed.history[len(first.history):]]


def test_each_logged_loss_is_the_mean_over_its_steps(data, tmp_path):
    net = fresh()
    seen = recording_losses(net)
    result = train(net, data, params(max_steps=4, log_every=2, checkpoint_every=4), tmp_path / "last.pt", "fp")
    assert [h["step"] for h in result.history] == [2, 4]
    for entry, pair in zip(result.history, (seen[0:2], seen[2:4])):
        assert entry["loss"] == pytest.approx(sum(pair) / 2, rel=1e-6)


def test_an_interrupted_run_resumes_with_the_losses_since_the_last_log(data, tmp_path):
    """The checkpoint of step 3 holds the loss of step 3 (logged at step 4); a resume that dropped
    it would log step 4's loss alone."""
    full = train(fresh(), data, params(), tmp_path / "a.pt", "fp")
    net = fresh()
    recording_losses(net, fail_at=5)
    with pytest.raises(KeyboardInterrupt):
        train(net, data, params(), tmp_path / "b.pt", "fp")
    assert load_checkpoint(tmp_path / "b.pt")["window"]["count"] == 1
    resumed = train(fresh(), data, params(), tmp_path / "b.pt", "fp")
    assert resumed.history == full.history


def test_the_log_says_where_a_run_resumed_and_what_it_trained(data, tmp_path, caplog):
    path = tmp_path / "last.pt"
    part = train(fresh(), data, params(max_steps=3), path, "fp")
    with caplog.at_level(logging.INFO, logger=MESSAGES):
        resumed = train(fresh(), data, params(), path, "fp")
    elapsed = resumed.seconds - part.seconds
    assert caplog.messages == [
        f"resuming training from step 3 ({path})",
        f"trained 6 steps (3 new, {elapsed:.1f} s) on cpu; {resumed.seconds:.1f} s of training in all",
    ]
    assert 0 < elapsed < resumed.seconds


def test_a_run_that_diverges_after_a_checkpoint_names_the_one_it_kept(data, tmp_path):
    net = fresh()
    recording_losses(net, poison_at=4)
    with pytest.raises(FloatingPointError) as error:
        train(net, data, params(checkpoint_every=2), tmp_path / "last.pt", "fp")
    assert str(error.value) == "training loss became nan (summed) between steps 3 and 4; last checkpoint (step 2) kept"
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2


def test_mismatched_model_or_ema_weights_name_the_checkpoint(data, tmp_path):
    path = tmp_path / "last.pt"
    train(fresh(), data, params(max_steps=3), path, "fp")
    with pytest.raises(DataError, match="unexpected: acn") as error:  # same fingerprint, other network
        train(fresh("ddpm_prob"), data, params(), path, "fp")
    assert str(path) in str(error.value)
    state = load_checkpoint(path)
    state["ema"].pop(next(iter(state["ema"])))
    save_checkpoint(state, path)
    with pytest.raises(DataError, match="missing") as error:  # the model loads, its EMA copy does not
        train(fresh(), data, params(), path, "fp")
    assert str(path) in str(error.value)


def test_each_step_runs_under_the_runs_precision_and_determinism(data, tmp_path, monkeypatch):
    """fp32 on the CPU: autocast is asked for bf16 but disabled (``training.bf16`` is CUDA's); with
    ``training.cpu_bf16`` it is enabled and the checkpoint says so. Deterministic kernels are on
    during the steps exactly when asked for."""
    calls = []

    def autocast(**kwargs):
        calls.append({**kwargs, "deterministic": torch.are_deterministic_algorithms_enabled()})
        return nullcontext()

    monkeypatch.setattr(loop.torch, "autocast", autocast)
    train(fresh(), data, params(max_steps=2), tmp_path / "a.pt", "fp")
    train(fresh(), data, params(max_steps=2, deterministic=True), tmp_path / "b.pt", "fp")
    off = {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": False}
    assert calls == [{**off, "deterministic": False}] * 2 + [{**off, "deterministic": True}] * 2
    calls.clear()
    train(fresh(), data, params(max_steps=1, cpu_bf16=True), tmp_path / "c.pt", "fp")
    assert calls == [{**off, "enabled": True, "deterministic": False}]
    assert load_checkpoint(tmp_path / "c.pt")["precision"] == "bf16"
    assert load_checkpoint(tmp_path / "a.pt")["precision"] == "fp32"  # training.bf16 (true) is CUDA's


def test_ema_decay_is_used_without_warmup(data, tmp_path):
    runs = [train(fresh(), data, params(max_steps=2, ema_decay=decay, ema_warmup=False), tmp_path / f"{decay}.pt",
                  "fp").ema_state for decay in (0.5, 0.9)]
    assert any(not torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert all(math.isfinite(float(v.float().sum())) for v in runs[0].values())
