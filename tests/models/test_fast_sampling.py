"""The CPU sampling speed-ups change the layout and the kernels, never the masks.

Fused attention (torch's scaled_dot_product_attention in MONAI's attention blocks) and
channels_last weights while sampling on the CPU are measured in benchmarks/sampling_speed.py
(docs/lidc.md); here: both give the plain path's samples, and sampling leaves the weights as it
found them.
"""

from __future__ import annotations

import pytest
import torch

from cimd_pipeline.config import ModelParams, SamplingParams
from cimd_pipeline.diffusion.noise import RowGenerators, stream_seed
from cimd_pipeline.models.cimd import CIMD

PARAMS = {"variant": "cimd_aa", "unet": {"channels": [16, 32, 32], "attention_levels": [False, False, True],
                                         "num_head_channels": 16, "norm_num_groups": 16}}


@pytest.fixture(scope="module")
def net() -> CIMD:
    torch.manual_seed(0)
    model = CIMD(ModelParams.model_validate(PARAMS), image_channels=1).eval()
    with torch.no_grad():  # the output convolution starts at zero: jitter every weight
        for weight in model.parameters():
            weight.add_(0.05 * torch.randn_like(weight))
    return model


def _draw(net: CIMD, image: torch.Tensor) -> torch.Tensor:
    params = SamplingParams(method="ddim", steps=4, batch_size=len(image), progress=False)
    rows = RowGenerators([stream_seed(0, f"case-{i}", 0) for i in range(len(image))], "cpu")
    return net.sample(image, params, rows)


def _attention(net: CIMD, fused: bool) -> None:
    for module in net.modules():
        if hasattr(module, "use_flash_attention"):
            module.use_flash_attention = fused


def test_denoiser_is_built_with_fused_attention(net):
    flags = [m.use_flash_attention for m in net.modules() if hasattr(m, "use_flash_attention")]
    assert flags and all(flags)


def test_fast_paths_give_the_plain_samples(net):
    image = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    fast = _draw(net, image)
    net.channels_last_on_cpu = False
    _attention(net, False)
    try:
        plain = _draw(net, image)
    finally:
        net.channels_last_on_cpu = True
        _attention(net, True)
    assert plain.abs().max() > 0.05  # the samples are not trivially zero
    assert torch.allclose(fast, plain, atol=1e-4)


def test_sampling_puts_the_weights_back_in_their_layout(net):
    seen = []
    conv = net.denoiser.net.conv_in.conv
    hook = conv.register_forward_pre_hook(lambda m, _: seen.append(m.weight.is_contiguous(memory_format=torch.channels_last)))
    try:
        _draw(net, torch.randn(2, 1, 32, 32))
    finally:
        hook.remove()
    assert seen and all(seen)  # channels_last while sampling on the CPU ...
    assert all(p.is_contiguous() for p in net.parameters())  # ... and back afterwards
