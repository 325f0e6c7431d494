"""Tests of the MONAI-based conditional diffusion denoiser."""

import pytest
import torch
from torch import nn

from cimd_pipeline.models.denoiser import (
    ConditionalDenoiser,
    UNetConfig,
    build_denoiser,
    check_image_size,
)

TINY = UNetConfig(channels=(16, 32, 32), norm_num_groups=16)
BATCH, SIZE = 2, 32


def _randomise_zero_weights(model: nn.Module) -> None:
    """Give MONAI's zero-initialised convs (output, residual conv2) random weights.

    A fresh network outputs zero and ignores t, which would make output comparisons vacuous.
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                nn.init.normal_(param, std=0.05)


def _inputs(image_channels, mask_channels=1):
    x_t = torch.randn(BATCH, mask_channels, SIZE, SIZE)
    image = torch.randn(BATCH, image_channels, SIZE, SIZE)
    t = torch.randint(0, 1000, (BATCH,))
    return x_t, image, t


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("image_channels", [1, 4])
def test_output_shape(image_channels, learn_sigma):
    model = ConditionalDenoiser(TINY, image_channels=image_channels, learn_sigma=learn_sigma)
    out = model(*_inputs(image_channels))

    expected_channels = 2 if learn_sigma else 1
    assert model.out_channels == expected_channels
    assert out.shape == (BATCH, expected_channels, SIZE, SIZE)


def test_multichannel_mask_output_shape():
    model = ConditionalDenoiser(TINY, image_channels=3, mask_channels=2, learn_sigma=True)
    assert model(*_inputs(3, mask_channels=2)).shape == (BATCH, 4, SIZE, SIZE)


def test_fresh_network_predicts_zero():
    model = ConditionalDenoiser(TINY, image_channels=1)
    out = model(*_inputs(1))
    assert torch.equal(out, torch.zeros(BATCH, 2, SIZE, SIZE))

    out.sum().backward()
    out_conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    assert out_conv.weight.grad.abs().sum() > 0  # training can leave the zero start


def test_wrapper_concatenates_mask_then_image():
    model = ConditionalDenoiser(TINY, image_channels=4)
    _randomise_zero_weights(model)
    x_t, image, t = _inputs(4)

    expected = model.net(x=torch.cat([x_t, image], 1), timesteps=t)
    torch.testing.assert_close(model(x_t, image, t), expected)
    swapped = model.net(x=torch.cat([image[:, :1], x_t, image[:, 1:]], 1), timesteps=t)
    assert not torch.allclose(expected, swapped)


def test_output_depends_on_timestep_and_gradients_flow():
    model = ConditionalDenoiser(TINY, image_channels=1)
    _randomise_zero_weights(model)
    x_t, image, _ = _inputs(1)
    early = model(x_t, image, torch.full((BATCH,), 10))
    late = model(x_t, image, torch.full((BATCH,), 900))
    assert not torch.allclose(early, late)

    early.square().mean().backward()
    first_conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][0]
    assert first_conv.weight.grad.abs().sum() > 0


def test_default_config_parameter_count():
    net = build_denoiser(UNetConfig(), image_channels=1, mask_channels=1, learn_sigma=True)
    count = sum(p.numel() for p in net.parameters())
    assert 1.5e6 < count < 1.75e6  # about 1.62 M with MONAI 1.6


def test_check_image_size():
    cfg = UNetConfig()
    check_image_size(cfg, 32, 64)
    with pytest.raises(ValueError, match=r"30x30.*multiples of 4"):
        check_image_size(cfg, 30, 30)
    with pytest.raises(ValueError, match="32x30"):
        check_image_size(cfg, 32, 30)


def test_forward_rejects_unsupported_size():
    model = ConditionalDenoiser(TINY, image_channels=1)
    with pytest.raises(ValueError, match="30x30"):
        model(torch.randn(1, 1, 30, 30), torch.randn(1, 1, 30, 30), torch.zeros(1))


@pytest.mark.parametrize(
    "x_t, image, t",
    [
        (torch.randn(2, 2, 32, 32), torch.randn(2, 1, 32, 32), torch.zeros(2)),
        (torch.randn(2, 1, 32, 32), torch.randn(2, 3, 32, 32), torch.zeros(2)),
        (torch.randn(2, 1, 32, 32), torch.randn(2, 1, 16, 16), torch.zeros(2)),
        (torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32), torch.zeros(3)),
        (torch.randn(1, 32, 32), torch.randn(1, 1, 32, 32), torch.zeros(1)),
    ],
)
def test_forward_rejects_mismatched_inputs(x_t, image, t):
    with pytest.raises(ValueError):
        ConditionalDenoiser(TINY, image_channels=1)(x_t, image, t)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"channels": ()}, "at least 1 item"),
        ({"attention_levels": (False, True)}, "one flag per level"),
        ({"channels": (32, 48, 64)}, "divisible by norm_num_groups"),
        ({"channels": (32, 0, 64)}, r"channels\.1\n  Input should be greater than 0"),
        ({"channel": (32, 64, 64)}, "channel\n  Unexpected keyword argument"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"num_head_channels": 0}, "num_head_channels"),
        ({"norm_num_groups": 0}, "norm_num_groups"),
        ({"num_head_channels": 48}, "middle block"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**kwargs)


def test_config_normalises_lists_to_tuples():
    cfg = UNetConfig(channels=[16, 32, 32], attention_levels=[0, 0, 1], norm_num_groups=16)
    assert cfg.channels == (16, 32, 32)
    assert cfg.attention_levels == (False, False, True)
    assert hash(cfg) == hash(TINY)


def test_bad_channel_counts_raise():
    with pytest.raises(ValueError):
        build_denoiser(TINY, image_channels=0)
    with pytest.raises(ValueError):
        build_denoiser(TINY, image_channels=1, mask_channels=0)


def test_seeded_construction_is_deterministic():
    def build_and_run(seed):
        torch.manual_seed(seed)
        model = ConditionalDenoiser(TINY, image_channels=1)
        _randomise_zero_weights(model)
        torch.manual_seed(123)
        return model, model(*_inputs(1))

    model_a, out_a = build_and_run(0)
    model_b, out_b = build_and_run(0)
    model_c, out_c = build_and_run(1)

    state_a, state_b, state_c = model_a.state_dict(), model_b.state_dict(), model_c.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert torch.equal(out_a, out_b)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    assert not torch.allclose(out_a, out_c)


def _first_block_outputs(cfg: UNetConfig, t_values) -> list[torch.Tensor]:
    """The first residual block's output (full resolution) for each timestep, same x_t and image."""
    model = ConditionalDenoiser(cfg, image_channels=1)
    _randomise_zero_weights(model)
    block = model.net.down_blocks[0].resnets[0]
    outputs = []
    block.register_forward_hook(lambda m, args, out: outputs.append(out))
    x_t, image, _ = _inputs(1)
    for t in t_values:
        model(x_t, image, torch.full((BATCH,), t))
    return outputs


def test_one_channel_groups_erase_the_added_timestep_and_scale_shift_norm_restores_it():
    # 16 channels in 16 groups at the first level: the embedding added before the second norm is
    # a per-channel constant that the norm removes
    added = _first_block_outputs(TINY, (10, 900))
    torch.testing.assert_close(added[0], added[1], atol=1e-5, rtol=0)
    cfg = UNetConfig(channels=(16, 32, 32), norm_num_groups=16, scale_shift_norm=True)
    scaled = _first_block_outputs(cfg, (10, 900))
    assert (scaled[0] - scaled[1]).abs().max() > 1e-2


def test_scale_shift_block_follows_improved_diffusion():
    model = ConditionalDenoiser(UNetConfig(channels=(16, 32, 32), norm_num_groups=16, scale_shift_norm=True), 1)
    _randomise_zero_weights(model)
    block = model.net.down_blocks[1].resnets[0]  # 16 -> 32 channels: a skip convolution too
    assert block.time_emb_proj.out_features == 2 * 32
    x, emb = torch.randn(2, 16, 8, 8), torch.randn(2, block.time_emb_proj.in_features)
    h = block.conv1(nn.functional.silu(block.norm1(x)))
    scale, shift = block.time_emb_proj(nn.functional.silu(emb)).chunk(2, dim=1)
    h = block.norm2(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    expected = block.skip_connection(x) + block.conv2(nn.functional.silu(h))
    torch.testing.assert_close(block(x, emb), expected)


def test_scale_shift_norm_survives_copies_and_state_dicts():
    import copy

    cfg = UNetConfig(channels=(16, 32, 32), norm_num_groups=16, scale_shift_norm=True)
    model = ConditionalDenoiser(cfg, image_channels=1)
    _randomise_zero_weights(model)
    x_t, image, t = _inputs(1)
    twin = copy.deepcopy(model)  # as the EMA copies its model
    torch.testing.assert_close(twin(x_t, image, t), model(x_t, image, t))
    fresh = ConditionalDenoiser(cfg, image_channels=1)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x_t, image, t), model(x_t, image, t))
    with pytest.raises(RuntimeError, match="time_emb_proj"):  # a plain U-Net cannot take its weights
        ConditionalDenoiser(TINY, image_channels=1).load_state_dict(model.state_dict())
