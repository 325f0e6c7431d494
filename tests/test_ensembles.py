"""Drawing ensembles: samples pinned to their own image, noise keyed by image, NaN refused, shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from cimd_pipeline import ensembles, sample_rows
from cimd_pipeline.config import ModelParams, SamplingParams
from cimd_pipeline.diffusion.noise import RowGenerators, randn, stream_seed
from cimd_pipeline.ensembles import draw_ensembles
from cimd_pipeline.errors import SamplingError
from cimd_pipeline.models.trained import build_model
from cimd_pipeline.processes import Workers
from cimd_pipeline.sample_rows import draw_rows, row_batches

CPU = torch.device("cpu")
TINY_MODEL = {
    "unet": {"channels": [16, 16], "attention_levels": [False, True], "num_res_blocks": 1,
             "num_head_channels": 16, "norm_num_groups": 16},
    "ambiguity_nets": {"filters": [8, 8, 8, 8]},
}


class CopyImageNet(nn.Module):
    """A Segmenter whose every sample is its own image's sign pattern (plus a little row noise).

    Samples that land on another case's row, or noise drawn from another row's stream, show up
    as a wrong pattern or a wrong soft value.
    """

    def sample(self, image: Tensor, params: SamplingParams, generator=None) -> Tensor:
        return image[:, :1].sign() * 0.5 + 0.01 * randn((len(image), 1, *image.shape[2:]), generator, image.device)


def tiny_cimd(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = build_model(ModelParams.model_validate(TINY_MODEL), 1)
    for p in net.parameters():  # the zero-initialised output layers would make every sample equal
        nn.init.normal_(p, std=0.05)
    return net.eval()


def patterns(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, 1, 16, 16)).astype(np.float32)


def params(**extra) -> SamplingParams:
    return SamplingParams(**{"num_samples": 3, "steps": 4, "batch_size": 4, "progress": False, **extra})


def test_every_case_gets_samples_of_its_own_image():
    images = patterns(7)
    ids = np.array([f"case_{i}" for i in range(7)])
    samples = draw_ensembles(CopyImageNet(), images, ids, params(), CPU)  # batches straddle cases
    assert list(samples.case_ids) == list(ids)
    for i in range(len(ids)):
        for k in range(3):
            assert np.array_equal(samples.binary[i, k], (images[i, 0] > 0).astype(np.uint8)), (ids[i], k)


def test_an_image_keeps_its_samples_when_other_images_are_added_or_moved():
    net, images = tiny_cimd(), patterns(5)
    ids = np.array([f"case_{i}" for i in range(5)])
    setting = params(method="ddpm", batch_size=3)  # one image per batch: identical batches
    alone = draw_ensembles(net, images[2:3], ids[2:3], setting, CPU).soft[0]
    crowd = draw_ensembles(net, images[::-1], ids[::-1], setting, CPU)
    assert np.array_equal(crowd.soft[list(crowd.case_ids).index("case_2")], alone)
    renamed = draw_ensembles(net, images[2:3], np.array(["other"]), setting, CPU).soft[0]
    assert not np.array_equal(renamed, alone)  # the stream follows the key, not the position


def test_the_next_seed_reuses_none_of_the_previous_seeds_noise():
    seeds = {(s, k): stream_seed(s, "case_0", k) for s in range(3) for k in range(16)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= v < 2**63 for v in seeds.values())
    assert stream_seed(0, "case_0", 0) == 2364695987299159111  # stable across processes and runs
    net, images = tiny_cimd(), patterns(2)
    ids = np.array(["a", "b"])
    first = draw_ensembles(net, images, ids, params(method="ddpm", seed=0), CPU).soft
    second = draw_ensembles(net, images, ids, params(method="ddpm", seed=1), CPU).soft
    for i in range(2):
        for k in range(2):  # seed 1's member k is none of seed 0's members
            assert not any(np.array_equal(second[i, k], first[i, j]) for j in range(3))


def test_row_generators_draw_each_row_from_its_own_stream():
    rows = RowGenerators([5, 6, 7], CPU).randn((3, 2))
    assert torch.equal(rows[1], torch.randn((1, 2), generator=torch.Generator().manual_seed(6))[0])
    with pytest.raises(ValueError, match="^noise for 2 rows requested from 3 row generators$"):
        RowGenerators([5, 6, 7], CPU).randn((2, 5))
    assert RowGenerators([5], "cpu").device == CPU


@pytest.mark.parametrize("rows", [0, 2])
def test_noise_has_the_requested_dtype_and_shape_from_every_source(rows):
    shape = (rows, 1, 3, 4)
    for generator in (RowGenerators(range(rows), CPU), torch.Generator().manual_seed(0), None):
        noise = randn(shape, generator, CPU, torch.float64)
        assert noise.shape == shape and noise.dtype == torch.float64, generator
    assert RowGenerators(range(rows), CPU).randn(shape, torch.float64).dtype == torch.float64
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        draws.append(randn(shape, torch.Generator().manual_seed(3), CPU))
    assert torch.equal(*draws)  # a given generator, not torch's global stream


def test_row_batches_cover_the_rows_once_in_order():
    assert row_batches(7, 3) == [range(3), range(3, 6), range(6, 7)]
    assert row_batches(6, 3) == [range(3), range(3, 6)]


class SpyNet(nn.Module):
    """Records the batches it is given and returns zeros (a Segmenter that samples nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Tensor] = []

    def sample(self, image: Tensor, params: SamplingParams, generator=None) -> Tensor:
        self.seen.append(image)
        return torch.zeros(len(image), 1, *image.shape[2:])


def test_rows_of_a_later_shard_see_their_own_images_as_float32_on_the_device(monkeypatch):
    images = patterns(5).astype(np.float64)
    keys = np.array([f"case_{i}" for i in range(5)])
    whole = draw_rows(CopyImageNet(), images, keys, params(), CPU, range(6, 13), "m")
    shard = draw_rows(CopyImageNet(), images[2:], keys[2:], params(), CPU, range(6, 13), "m", first_image=2)
    assert np.array_equal(shard, whole) and shard.dtype == np.float16
    spy, devices = SpyNet(), []
    monkeypatch.setattr(sample_rows, "RowGenerators", lambda seeds, device: devices.append(device) or RowGenerators(seeds, CPU))
    meta = torch.device("meta")
    draw_rows(spy, images, keys, params(), meta, range(4), "m")
    assert spy.seen[0].device == meta and spy.seen[0].dtype == torch.float32 and devices == [meta]


def test_sample_set_holds_string_ids_float16_soft_values_and_what_was_run():
    images, ids = patterns(3), np.array([30, 10, 20])
    samples = draw_ensembles(CopyImageNet(), images, ids, params(), CPU)
    assert samples.case_ids.tolist() == ["30", "10", "20"]
    named = draw_ensembles(CopyImageNet(), images, ids.astype(str), params(), CPU)
    assert np.array_equal(samples.soft, named.soft)  # an id's stream is keyed by its text
    assert samples.soft.dtype == np.float16 and samples.binary.dtype == np.uint8
    assert samples.soft.shape == samples.binary.shape == (3, 3, 16, 16)
    info = dict(samples.info)
    seconds, rate = info.pop("seconds"), info.pop("masks_per_second")
    assert info == {"method": "ddim", "steps": 4, "num_samples": 3, "seed": 0, "device": "cpu", "num_processes": 1, "bf16": False}
    assert 0 < seconds < 60 and rate == pytest.approx(9 / seconds)
    blank = draw_ensembles(SpyNet(), images, ids, params(), CPU)  # soft values exactly 0
    assert not blank.binary.any()  # a mask pixel is soft > 0, not >= 0


def test_progress_counts_every_mask(capsys):
    draw_ensembles(CopyImageNet(), patterns(3), np.array(["a", "b", "c"]), params(progress=True), CPU)
    err = capsys.readouterr().err
    assert "sampling: 100%" in err and "9/9 [" in err and "mask/s]" in err


@pytest.mark.parametrize(("processes", "shards"), [(1, 0), (2, 1), (3, 1)])
def test_more_than_one_process_shares_the_batches_out(monkeypatch, processes, shards):
    calls = []

    def sharded(net, images, keys, params, device, batches, source):
        calls.append((net, keys.tolist(), params, device, batches, source))
        return np.ones((sum(len(b) for b in batches), *images.shape[2:]), np.float16)

    monkeypatch.setattr(ensembles, "draw_sharded", sharded)
    setting, net = params(num_processes=processes), CopyImageNet()
    out = draw_ensembles(net, patterns(3), np.array(["a", "b", "c"]), setting, CPU)
    assert len(calls) == shards
    if shards:
        assert calls[0] == (net, ["a", "b", "c"], setting, CPU, row_batches(9, 4), "CopyImageNet")
        assert out.binary.all()
    draw_ensembles(net, patterns(2), np.array(["a", "b"]), setting, CPU)  # 6 rows: 2 batches, shared too
    assert len(calls) == 2 * shards
    one_batch = draw_ensembles(net, patterns(1), np.array(["a"]), setting, CPU)  # 3 rows: 1 batch
    assert len(calls) == 2 * shards and one_batch.info["num_processes"] == processes


def test_torchrun_ranks_share_the_batches_and_only_rank_0_gets_samples(monkeypatch):
    calls = []

    def ranks(net, images, keys, params, device, batches, source, workers):
        calls.append((keys.tolist(), batches, source, workers))
        return None if workers.rank else np.ones((sum(len(b) for b in batches), *images.shape[2:]), np.float16)

    monkeypatch.setattr(ensembles, "draw_ranks", ranks)
    monkeypatch.setattr(ensembles, "draw_sharded", lambda *a: pytest.fail("spawned workers under torchrun"))
    setting, ids = params(num_processes=3), np.array(["a", "b", "c"])
    out = draw_ensembles(CopyImageNet(), patterns(3), ids, setting, CPU, workers=Workers(0, 2))
    assert calls == [(["a", "b", "c"], row_batches(9, 4), "CopyImageNet", Workers(0, 2))]
    assert out.binary.all() and out.info["num_processes"] == 2
    assert draw_ensembles(CopyImageNet(), patterns(3), ids, setting, CPU, workers=Workers(1, 2, 1)) is None
    one = draw_ensembles(CopyImageNet(), patterns(1), ids[:1], params(), CPU, workers=Workers(0, 2))  # one batch
    assert len(calls) == 3 and one.info["num_processes"] == 2
    monkeypatch.setattr(ensembles, "draw_ranks", lambda *a: pytest.fail("a job of one process shards nothing"))
    alone = draw_ensembles(CopyImageNet(), patterns(3), ids, params(), CPU, workers=Workers())
    assert alone.info["num_processes"] == 1 and alone.binary.shape == (3, 3, 16, 16)


def test_diverged_rows_are_named_with_their_range_and_first_five_images():
    class NanNet(nn.Module):
        def sample(self, image, params, generator=None):
            return torch.full((len(image), 1, *image.shape[2:]), torch.nan)

    ids = np.array([f"case_{i}" for i in range(7)])
    with pytest.raises(SamplingError) as caught:
        draw_ensembles(NanNet(), patterns(7), ids, params(num_samples=1, batch_size=8), CPU)
    assert str(caught.value) == (
        "NanNet: 7 of 7 samples in rows 0-6 contain NaN or inf (ddim, 4 steps, eta 0.0; images case_0, "
        "case_1, case_2, case_3, case_4 ...): the model or its noise schedule diverged, and "
        "thresholding would turn these samples into empty masks"
    )
    with pytest.raises(SamplingError, match=r"rows 0-4 .*images case_0, case_1, case_2, case_3, case_4\):"):
        draw_ensembles(NanNet(), patterns(5), ids[:5], params(num_samples=1, batch_size=8), CPU)
    with pytest.raises(SamplingError, match=r"rows 0-5 .*images case_0, case_1, case_2, case_3, case_4 \.\.\.\):"):
        draw_ensembles(NanNet(), patterns(6), ids[:6], params(num_samples=1, batch_size=8), CPU)


def test_nan_samples_stop_with_the_method_steps_and_model_named():
    net = tiny_cimd()
    with torch.no_grad():
        next(net.denoiser.parameters()).fill_(float("nan"))
    with pytest.raises(SamplingError, match=r"my model: 6 of 6 samples .*NaN or inf \(ddim, 4 steps"):
        draw_ensembles(net, patterns(2), np.array(["a", "b"]), params(batch_size=8), CPU, "my model")


def test_one_diverged_image_is_named():
    class NanForNegativeMean(CopyImageNet):
        def sample(self, image, params, generator=None):
            out = super().sample(image, params, generator)
            return torch.where(image.mean((1, 2, 3), keepdim=True) < -1, torch.nan, out)

    images = patterns(4)
    images[2] -= 5
    with pytest.raises(SamplingError, match=r"images case_2\):"):
        draw_ensembles(NanForNegativeMean(), images, np.array([f"case_{i}" for i in range(4)]), params(), CPU)


@pytest.mark.slow
def test_two_processes_give_bit_identical_samples():
    net, images = tiny_cimd(), patterns(6)
    ids = np.array([f"case_{i}" for i in range(6)])
    setting = params(method="ddpm", batch_size=5, num_samples=4)
    one = draw_ensembles(net, images, ids, setting, CPU)
    two = draw_ensembles(net, images, ids, setting.model_copy(update={"num_processes": 2}), CPU)
    assert two.info["num_processes"] == 2
    assert np.array_equal(two.soft, one.soft) and np.array_equal(two.binary, one.binary)
    assert list(two.case_ids) == list(ids)


def test_bf16_runs_the_network_in_bfloat16_and_draws_the_float32_samples_to_rounding():
    net, images = tiny_cimd(), patterns(5)
    ids = np.array([f"case_{i}" for i in range(5)])
    dtypes: list[torch.dtype] = []
    hook = net.denoiser.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    try:
        plain = draw_ensembles(net, images, ids, params(), CPU)
        calls = len(dtypes)
        half = draw_ensembles(net, images, ids, params(bf16=True), CPU)
        again = draw_ensembles(net, images, ids, params(bf16=True), CPU)
    finally:
        hook.remove()
    assert set(dtypes[:calls]) == {torch.float32} and set(dtypes[calls:]) == {torch.bfloat16}
    assert half.soft.dtype == plain.soft.dtype == np.float16
    assert np.array_equal(half.soft, again.soft)  # deterministic on one machine
    difference = np.abs(half.soft.astype(np.float32) - plain.soft.astype(np.float32))
    # measured: at most 1.3e-3 apart, 3e-4 on average, every binary pixel equal
    assert 0 < difference.max() < 0.02 and difference.mean() < 2e-3
    assert (half.binary == plain.binary).mean() > 0.99
    assert not torch.is_autocast_enabled("cpu")  # nothing leaks out of the sampler
