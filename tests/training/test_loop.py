import logging
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from cimd_pipeline.config import TrainingParams
from cimd_pipeline.data.alignment import Normalisation, ResizeMode, align_cases, stack_cases
from cimd_pipeline.data.synthetic import SyntheticConfig, generate
from cimd_pipeline.errors import DataError
from cimd_pipeline.models.cimd import CIMD
from cimd_pipeline.models.trained import TrainedModel
from cimd_pipeline.io.torch_files import load_checkpoint, load_state_strict, save_checkpoint
from cimd_pipeline.training.fingerprint import data_digest, run_fingerprint
from cimd_pipeline.training.loop import (
    LossWindow,
    Workers,
    _batch,
    _Losses,
    _same_everywhere,
    index_seed,
    select_device,
    train,
)
from tests.models.test_cimd import tiny

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    aligned = align_cases(generate(SyntheticConfig(num_cases=12, image_size=32)), (16, 16), ResizeMode.RESIZE, Normalisation.ZSCORE, None, 2, 0.0, 0)
    return stack_cases(aligned, {"train": 1.0, "test": 0.0001}, 0).subset("train")


def fresh(variant="cimd_aa"):
    torch.manual_seed(0)
    return CIMD(tiny(variant), image_channels=1)


def params(**kw):
    base = {"max_steps": 6, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 3, "log_every": 2, "progress": False}
    return TrainingParams.model_validate({**base, **kw})


def assert_resumes_exactly_and_changes_the_run(full, data, tmp_path, **switches) -> None:
    """A run with ``switches`` stopped at step 3 and resumed reaches the EMA weights of ``full`` (the
    uninterrupted run with them) exactly, and those weights differ from a run without the switches."""
    train(fresh(), data, params(max_steps=3, **switches), tmp_path / "b" / "last.pt", "fp")
    resumed = train(fresh(), data, params(**switches), tmp_path / "b" / "last.pt", "fp")
    plain = train(fresh(), data, params(), tmp_path / "c" / "last.pt", "fp")
    for key, value in full.ema_state.items():
        assert torch.equal(value, resumed.ema_state[key]), key
    assert any(not torch.equal(full.ema_state[k], plain.ema_state[k]) for k in full.ema_state)


# --- the loop's parts, each pinned on its own --------------------------------------------------


def test_auto_device_is_the_cpu_here_and_an_unavailable_choice_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert select_device() == select_device("cpu") == torch.device("cpu")
    for name in ("cuda", "mps", "tpu"):
        with pytest.raises(RuntimeError) as error:
            select_device(name)
        assert str(error.value) == f"training.device={name!r} requested but not available on this machine"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)  # Apple silicon
    assert select_device() == select_device("mps") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device() == torch.device("cuda")


def test_each_process_takes_its_contiguous_share_of_the_batch():
    assert [Workers(rank, 2).share(8) for rank in range(2)] == [(0, 4), (4, 8)]
    assert Workers().share(6) == (0, 6)
    with pytest.raises(ValueError) as error:
        Workers(0, 3).share(8)
    assert str(error.value) == "training.batch_size=8 is not divisible by the 3 training processes"


def test_the_ddp_wrapper_forwards_to_the_model_losses():
    class Model(nn.Module):
        def losses(self, *args):
            return {"loss": torch.tensor(float(sum(args)))}

    model = Model()
    wrapper = _Losses(model)
    assert wrapper.model is model and wrapper(1, 2)["loss"].item() == 3.0


def test_a_batch_is_float32_images_raw_masks_and_boolean_raters_in_index_order():
    images = np.arange(4 * 2 * 2, dtype=np.float64).reshape(4, 1, 2, 2)
    masks = np.arange(4 * 3 * 2 * 2, dtype=np.uint8).reshape(4, 3, 2, 2) % 2
    valid = np.array([[1, 0, 1], [1, 1, 1], [0, 1, 1], [1, 1, 0]])
    image, mask, rater = _batch(SimpleNamespace(images=images, masks=masks, rater_valid=valid), np.array([3, 1]), CPU)
    assert image.dtype == torch.float32 and mask.dtype == torch.uint8 and rater.dtype == torch.bool
    assert torch.equal(image, torch.from_numpy(images[[1, 3]]).float())
    assert torch.equal(rater, torch.from_numpy(valid[[1, 3]].astype(bool)))


def test_index_stream_is_fixed_by_the_seed_and_apart_from_the_model_seed():
    assert index_seed(0) == 2918264622725855778 and index_seed(7) == 3317731564112288844
    assert all(0 <= index_seed(s) < 2**63 and index_seed(s) != s for s in range(5))


def test_loss_window_sums_counts_restores_and_clears():
    window = LossWindow(CPU)
    assert window.device == CPU and window.processes == 1
    assert window.read(1, 1, "") == {"count": 0.0}
    for value in (1.0, 2.0):
        window.add({"loss": torch.tensor(value), "mse": torch.tensor(value / 2)})
    assert window.read(1, 2, "") == {"loss": 3.0, "mse": 1.5, "count": 2.0}
    saved = LossWindow(CPU, window.read(1, 2, ""))  # as a checkpoint stores an unlogged window
    assert saved.read(1, 2, "") == {"loss": 3.0, "mse": 1.5, "count": 2.0}
    saved.add({"loss": torch.tensor(1.0), "mse": torch.tensor(0.5)})
    assert saved.read(1, 3, "") == {"loss": 4.0, "mse": 2.0, "count": 3.0}
    saved.clear()
    assert saved.read(4, 4, "") == {"count": 0.0}
    assert LossWindow(CPU, processes=2).read(1, 1, "") == {"count": 0.0}  # nothing to reduce yet


def test_loss_window_refuses_a_non_finite_loss_naming_the_steps():
    window = LossWindow(CPU)
    window.add({"loss": torch.tensor(float("nan")), "kl": torch.tensor(0.0)})
    with pytest.raises(FloatingPointError) as error:
        window.read(3, 5, "last checkpoint (step 2) kept")
    assert str(error.value) == "training loss became nan (summed) between steps 3 and 5; last checkpoint (step 2) kept"
    other = LossWindow(CPU)
    other.add({"kl": torch.tensor(float("inf"))})  # only the loss is checked
    assert other.read(1, 1, "") == {"kl": float("inf"), "count": 1.0}


def test_loss_window_and_checkpoint_agreement_across_processes(tmp_path):
    """In a process group of one, all_reduce is the identity: what is left is the arithmetic."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        window = LossWindow(CPU, processes=2)  # one process stands for two: the sum is halved
        window.add({"loss": torch.tensor(4.0)})
        assert window.read(1, 1, "") == {"loss": 2.0, "count": 1.0}
        assert window.read(1, 1, "") == {"loss": 2.0, "count": 1.0}  # the reduction left the sums alone
        assert _same_everywhere(5, Workers(0, 2), CPU) and _same_everywhere(0, Workers(0, 2), CPU)
    finally:
        dist.destroy_process_group()
    assert _same_everywhere(7, Workers(), CPU)  # one process: nothing to compare, no group needed


# --- training runs ------------------------------------------------------------------------------


def test_resumed_training_reaches_exactly_the_uninterrupted_weights(data, tmp_path, caplog):
    full = train(fresh(), data, params(), tmp_path / "a" / "last.pt", "fp")
    part = train(fresh(), data, params(max_steps=3), tmp_path / "b" / "last.pt", "fp")
    assert part.steps == 3
    with caplog.at_level(logging.INFO, logger="cimd_pipeline.training.loop"):
        resumed = train(fresh(), data, params(), tmp_path / "b" / "last.pt", "fp")
    assert resumed.resumed_from == 3 and resumed.steps == 6 and resumed.device == "cpu"
    assert "trained 6 steps (3 new, " in caplog.text and " on cpu; " in caplog.text
    for key, value in full.ema_state.items():
        assert torch.equal(value, resumed.ema_state[key]), key
    # the short run also logged its last (partial) window at step 3; the curve continues after it
    assert [h["step"] for h in resumed.history] == [2, 3, 4, 6]
    assert resumed.history[0] == full.history[0] and resumed.history[-1] == full.history[-1]


def test_resume_false_starts_again(data, tmp_path):
    train(fresh(), data, params(max_steps=3), tmp_path / "last.pt", "fp")
    again = train(fresh(), data, params(max_steps=3, resume=False), tmp_path / "last.pt", "fp")
    assert again.resumed_from == 0


def test_checkpoint_of_another_configuration_is_refused(data, tmp_path):
    train(fresh(), data, params(max_steps=3), tmp_path / "last.pt", "fp-one")
    with pytest.raises(ValueError, match="another run configuration") as error:
        train(fresh(), data, params(), tmp_path / "last.pt", "fp-two")
    assert str(tmp_path / "last.pt") in str(error.value)  # names the checkpoint to delete


def test_fingerprint_ignores_max_steps_but_not_lr(data):
    model, digest = {"variant": "cimd_aa"}, data_digest(data)
    assert run_fingerprint(model, params(max_steps=5), digest) == run_fingerprint(model, params(max_steps=50), digest)
    assert run_fingerprint(model, params(lr=1e-4), digest) != run_fingerprint(model, params(lr=2e-4), digest)


def test_strict_load_lists_mismatched_shapes():
    small = fresh()
    other = CIMD(tiny().model_copy(update={"latent_dim": 3}), image_channels=1)
    with pytest.raises(DataError, match=r"shape mismatch amn\.head\.weight: checkpoint \(12, 8, 1, 1\) vs model \(6, 8, 1, 1\)"):
        load_state_strict(other, small.state_dict(), "model.pt")


def test_unwritable_checkpoint_folder_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A read-only folder, simulated (root ignores permission bits): no file in it can be created,
    replaced or removed. The write must fail with the OSError, never silently, and the previous
    checkpoint must stay readable."""
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint({"step": 1}, path)
    folder = path.parent

    def refuse(target):
        if Path(target).resolve().parent == folder.resolve():
            raise PermissionError(13, "Permission denied", str(target))

    def read_only(function):
        def guarded(target, *args, **kwargs):
            refuse(target)
            return function(target, *args, **kwargs)
        return guarded

    def mkstemp(*args, dir=None, **kwargs):
        refuse(Path(dir) / "new-file")
        return make_temp(*args, dir=dir, **kwargs)

    make_temp = tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    for name in ("replace", "rename", "unlink", "remove"):
        monkeypatch.setattr(os, name, read_only(getattr(os, name)))
    with pytest.raises(OSError, match="Permission denied"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in folder.iterdir()] == ["last.pt"]


def test_failed_write_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)

    def disk_full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_missing_and_unsafe_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(DataError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="unreadable or unsafe checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_trained_model_round_trip_rebuilds_the_same_network(tmp_path):
    from cimd_pipeline.io.model_dataset import TrainedModelDataset

    net = fresh()
    trained = TrainedModel(tiny().model_dump(mode="json"), 1, (16, 16), {"normalisation": "zscore"}, net.state_dict())
    ds = TrainedModelDataset(str(tmp_path / "model.pt"))
    ds.save(trained)
    rebuilt = ds.load().build()
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([3, 500])
    torch.testing.assert_close(rebuilt.denoiser(x, x, t), net.eval().denoiser(x, x, t))


def test_nan_loss_stops_training_without_overwriting_the_checkpoint(data, tmp_path):
    """The diverging run writes the same checkpoint path, every step, so a loop that saved before
    checking the loss (or saved on the way out) would overwrite the good step-3 checkpoint."""
    net = fresh()
    good = train(net, data, params(max_steps=3), tmp_path / "last.pt", "fp")
    with torch.no_grad():
        for p in net.denoiser.parameters():
            p.fill_(float("nan"))
    broken = fresh()
    broken.load_state_dict(net.state_dict())
    with pytest.raises(FloatingPointError, match="between steps 1 and 1; no checkpoint written by this run"):
        train(broken, data, params(max_steps=6, resume=False, checkpoint_every=1), tmp_path / "last.pt", "fp")
    kept = load_checkpoint(tmp_path / "last.pt")
    assert kept["step"] == 3
    for key, value in good.ema_state.items():
        assert torch.equal(kept["ema"][key], value), key


def test_an_empty_train_split_is_refused_and_one_case_is_enough(data, tmp_path):
    with pytest.raises(ValueError) as error:
        train(fresh(), data.take(np.array([], dtype=int)), params(), tmp_path / "a.pt", "fp")
    assert str(error.value) == "the train split is empty: check alignment.split and the dataset size"
    assert not (tmp_path / "a.pt").exists()
    one = train(fresh(), data.take(np.array([0])), params(max_steps=2), tmp_path / "b.pt", "fp")
    assert one.steps == 2


def test_optimiser_and_ema_take_their_settings(data, tmp_path):
    settings = ((1e-3, 0.0, True), (1e-2, 0.0, True), (1e-3, 0.5, True), (1e-3, 0.0, False))
    runs = {
        (lr, decay, warmup): train(fresh(), data, params(max_steps=2, lr=lr, weight_decay=decay, ema_warmup=warmup),
                                   tmp_path / f"{lr}-{decay}-{warmup}.pt", "fp").ema_state
        for lr, decay, warmup in settings
    }
    base = runs[settings[0]]
    for other in settings[1:]:  # each setting, changed alone, changes the weights
        assert any(not torch.equal(base[k], runs[other][k]) for k in base), other


def test_a_fresh_run_counts_only_its_own_time_and_a_resume_says_where_from(data, tmp_path, caplog):
    started = time.perf_counter()
    first = train(fresh(), data, params(max_steps=2), tmp_path / "last.pt", "fp")
    assert 0 < first.seconds <= time.perf_counter() - started
    with caplog.at_level("INFO", logger="cimd_pipeline.training.loop"):
        train(fresh(), data, params(max_steps=3), tmp_path / "last.pt", "fp")
    assert f"resuming training from step 2 ({tmp_path / 'last.pt'})" in caplog.text


def test_loss_decreases_on_a_fixed_batch_budget(data, tmp_path):
    result = train(fresh("ddpm_prob"), data, params(max_steps=60, log_every=20, lr=3e-3), tmp_path / "c.pt", "fp")
    losses = [h["mse"] for h in result.history]
    assert losses[-1] < losses[0]
