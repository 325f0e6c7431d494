"""Drawing ensembles: samples pinned to their own image, noise keyed by image, NaN refused, shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from cimd_pipeline.config import ModelParams, SamplingParams
from cimd_pipeline.diffusion.noise import RowGenerators, randn, stream_seed
from cimd_pipeline.ensembles import draw_ensembles
from cimd_pipeline.errors import SamplingError
from cimd_pipeline.models.trained import build_model

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
    with pytest.raises(ValueError, match="2 rows requested from 3"):
        RowGenerators([5, 6, 7], CPU).randn((2, 2))


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
