"""What the CIMD loss feeds where: the drawn rater, the diffusion target, the AMN and the ACN.

Rahman et al. (CVPR 2023) draw one rater uniformly at random per image per step; the same mask is
the diffusion target and the AMN's input, and the ACN sees the network's clean-mask estimate
(or, with ``acn_input: eps`` as in the public code, the noise implied by it). These tests look at
the tensors each part receives, so a rater choice fixed to one rater, a mask shifted between
images or a wrong ACN view fails here even when every loss stays finite.
"""

import numpy as np
import pytest
import torch

from cimd_pipeline.config import ModelParams, SamplingParams
from cimd_pipeline.models.ambiguity import Covariance
from cimd_pipeline.models.cimd import CIMD, pick_raters
from cimd_pipeline.models.prob_unet import chosen_rater

TINY_UNET = {"channels": [16, 16], "attention_levels": [False, False], "num_res_blocks": 1,
             "num_head_channels": 16, "norm_num_groups": 16}

# Valid raters per image: all four, the first two, raters 1 and 3, rater 2 alone.
VALID = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)


def tiny(prediction_type="x0", **nets) -> ModelParams:
    return ModelParams.model_validate(
        {"variant": "cimd_aa", "prediction_type": prediction_type, "unet": TINY_UNET,
         "ambiguity_nets": {"filters": [8, 8, 8, 8], **nets}}
    )


def distinct_masks(b=4, r=4, size=16) -> torch.Tensor:
    """Masks (B, R, H, W) in {0, 1} that differ between every pair of (image, rater)."""
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(b, r, size, size, generator=g) > 0.5).to(torch.uint8)
    flat = masks.flatten(2)
    assert len({bytes(m.numpy()) for m in flat.flatten(0, 1)}) == b * r
    return masks


def test_rater_choice_is_uniform_over_the_valid_raters_of_each_image():
    draws = 4000
    picks = pick_raters(VALID.repeat(draws, 1), torch.Generator().manual_seed(0)).view(draws, len(VALID))
    for image, valid in enumerate(VALID):
        counts = torch.bincount(picks[:, image], minlength=4).double() / draws
        expected = valid.double() / valid.sum()
        assert counts[~valid].sum() == 0, f"image {image} drew an invalid rater"
        # binomial sd <= 0.008 at 4000 draws: 0.04 is five of them
        torch.testing.assert_close(counts, expected, atol=0.04, rtol=0)


def test_rater_choice_is_independent_between_images():
    valid = torch.ones(6, 4, dtype=torch.bool)
    draws = 2000
    picks = pick_raters(valid.repeat(draws, 1), torch.Generator().manual_seed(1)).view(draws, 6)
    same = (picks[:, 0] == picks[:, 1]).double().mean()
    assert abs(same - 0.25) < 0.04  # independent uniform choices agree 1/R of the time
    assert (picks != picks[:, :1]).any(1).double().mean() > 0.9


def test_rater_choice_follows_the_generator():
    valid = torch.ones(64, 4, dtype=torch.bool)
    a = pick_raters(valid, torch.Generator().manual_seed(3))
    assert torch.equal(a, pick_raters(valid, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, pick_raters(valid, torch.Generator().manual_seed(4)))


def test_probabilistic_baselines_train_on_the_drawn_rater_of_each_image():
    masks = distinct_masks()
    seen = {i: set() for i in range(len(VALID))}
    for seed in range(40):
        target = chosen_rater(masks, VALID, torch.Generator().manual_seed(seed))
        index = pick_raters(VALID, torch.Generator().manual_seed(seed))
        for i, r in enumerate(index.tolist()):
            assert torch.equal(target[i, 0], masks[i, r].float())
            seen[i].add(r)
    assert seen == {i: set(torch.nonzero(v).flatten().tolist()) for i, v in enumerate(VALID)}


class Recorder:
    """Capture what ``CIMD.losses`` hands to the diffusion loss, the denoiser and both encoders."""

    def __init__(self, net: CIMD, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: dict[str, torch.Tensor] = {}
        original = net.diffusion.training_losses

        def training_losses(model_out, x0, x_t, t, noise, vlb_weight=0.001):
            self.seen.update(x0=x0.detach().clone(), x_t=x_t.detach().clone(), t=t.clone())
            return original(model_out, x0, x_t, t, noise, vlb_weight)

        monkeypatch.setattr(net.diffusion, "training_losses", training_losses)
        net.denoiser.register_forward_hook(lambda m, a, out: self.seen.update(out=out.detach().float().clone()))
        net.amn.register_forward_pre_hook(lambda m, a: self.seen.update(amn=a[0].detach().clone()))
        net.acn.register_forward_pre_hook(lambda m, a: self.seen.update(acn=a[0].detach().clone()))


def test_the_drawn_rater_feeds_both_the_diffusion_loss_and_the_amn(monkeypatch):
    torch.manual_seed(0)
    net = CIMD(tiny(), image_channels=2)
    rec = Recorder(net, monkeypatch)
    masks = distinct_masks()
    image = torch.randn(4, 2, 16, 16, generator=torch.Generator().manual_seed(2))
    seen = {i: set() for i in range(len(VALID))}
    for seed in range(24):
        net.losses(image, masks, VALID, torch.Generator().manual_seed(seed))
        index = pick_raters(VALID, torch.Generator().manual_seed(seed))  # the first draw of the stream
        x0 = rec.seen["x0"]
        for i, r in enumerate(index.tolist()):
            torch.testing.assert_close(x0[i, 0], masks[i, r].float() * 2 - 1, atol=0, rtol=0)
            seen[i].add(r)
        torch.testing.assert_close(rec.seen["amn"], torch.cat([image, x0], 1), atol=0, rtol=0)
        torch.testing.assert_close(rec.seen["acn"][:, :2], image, atol=0, rtol=0)
    assert seen == {i: set(torch.nonzero(v).flatten().tolist()) for i, v in enumerate(VALID)}


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_acn_sees_the_clean_mask_estimate_by_default(monkeypatch, prediction_type):
    torch.manual_seed(0)
    net = CIMD(tiny(prediction_type), image_channels=2)
    rec = Recorder(net, monkeypatch)
    masks = distinct_masks()
    image = torch.randn(4, 2, 16, 16, generator=torch.Generator().manual_seed(2))
    net.losses(image, masks, VALID, torch.Generator().manual_seed(5))
    x_t, t, prediction = rec.seen["x_t"].double(), rec.seen["t"], rec.seen["out"][:, :1].double()
    abar = torch.as_tensor(np.cumprod(1.0 - net.diffusion.betas))[t][:, None, None, None]
    expected = {
        "x0": prediction,
        "eps": (x_t - (1 - abar).sqrt() * prediction) / abar.sqrt(),
        "v": abar.sqrt() * x_t - (1 - abar).sqrt() * prediction,
    }[prediction_type]
    torch.testing.assert_close(rec.seen["acn"][:, 2:].double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction_type", ["eps", "x0"])
def test_acn_eps_view_is_the_noise_implied_by_the_prediction(monkeypatch, prediction_type):
    torch.manual_seed(0)
    net = CIMD(tiny(prediction_type, acn_input="eps"), image_channels=2)
    rec = Recorder(net, monkeypatch)
    masks = distinct_masks()
    image = torch.randn(4, 2, 16, 16, generator=torch.Generator().manual_seed(2))
    net.losses(image, masks, VALID, torch.Generator().manual_seed(5))
    x_t, t, prediction = rec.seen["x_t"].double(), rec.seen["t"], rec.seen["out"][:, :1].double()
    abar = torch.as_tensor(np.cumprod(1.0 - net.diffusion.betas))[t][:, None, None, None]
    if prediction_type == "eps":
        expected = prediction  # the network's own noise estimate
    else:
        expected = (x_t - abar.sqrt() * prediction) / (1 - abar).sqrt()
    acn_view = rec.seen["acn"][:, 2:].double()
    torch.testing.assert_close(acn_view, expected, atol=2e-3, rtol=2e-3)
    assert not torch.allclose(acn_view, x_t, atol=1e-2)


def test_ddpm_det_trains_the_diffusion_on_the_mean_of_the_valid_raters(monkeypatch):
    torch.manual_seed(0)
    net = CIMD(ModelParams.model_validate({"variant": "ddpm_det", "unet": TINY_UNET}), image_channels=2)
    seen = {}
    original = net.diffusion.training_losses

    def training_losses(model_out, x0, *rest):
        seen["x0"] = x0.detach().clone()
        return original(model_out, x0, *rest)

    monkeypatch.setattr(net.diffusion, "training_losses", training_losses)
    masks = distinct_masks()
    net.losses(torch.randn(4, 2, 16, 16), masks, VALID, torch.Generator().manual_seed(0))
    for i, valid in enumerate(VALID):
        expected = masks[i, valid].float().mean(0) * 2 - 1
        torch.testing.assert_close(seen["x0"][i, 0], expected, atol=0, rtol=0)


@pytest.mark.parametrize(("prediction_type", "scale"), [("eps", 1.0), ("x0", 0.5), ("v", 0.3)])
def test_clean_mask_estimate_is_clipped_to_the_input_scale_and_given_in_mask_units(prediction_type, scale):
    net = CIMD(ModelParams.model_validate(
        {"variant": "ddpm_prob", "prediction_type": prediction_type, "input_scale": scale, "unet": TINY_UNET}
    ), image_channels=2)
    g = torch.Generator().manual_seed(0)
    x_t, out = 3 * torch.randn(4, 1, 8, 8, generator=g), 3 * torch.randn(4, 2, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    abar = torch.as_tensor(np.cumprod(1.0 - net.diffusion.betas))[t][:, None, None, None].float()
    prediction = out[:, :1]
    x0 = {
        "x0": prediction,
        "eps": (x_t - (1 - abar).sqrt() * prediction) / abar.sqrt(),
        "v": abar.sqrt() * x_t - (1 - abar).sqrt() * prediction,
    }[prediction_type]
    expected = x0.clamp(-scale, scale) / scale
    got = net.x0_estimate(out, x_t, t)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert got.min() == -1.0 and got.max() == 1.0  # the random outputs reach both clips


def test_respaced_sampler_keeps_the_models_input_scale():
    net = CIMD(ModelParams.model_validate({"variant": "ddpm_prob", "input_scale": 0.3, "unet": TINY_UNET}), 2)
    respaced = net.sampler_diffusion(10)
    assert respaced.num_timesteps == 10 and respaced.input_scale == 0.3 and respaced.learn_sigma


def test_self_conditioned_sampling_feeds_the_estimate_from_the_current_x_t(monkeypatch):
    torch.manual_seed(0)
    net = CIMD(ModelParams.model_validate(
        {"variant": "ddpm_prob", "prediction_type": "eps", "self_condition": True, "unet": TINY_UNET}
    ), image_channels=2)
    calls = []
    original = net.model_output

    def model_output(x_t, image, t, condition, z=None):
        out = original(x_t, image, t, condition, z)
        calls.append((x_t.clone(), t.clone(), condition.clone(), out.clone()))
        return out

    monkeypatch.setattr(net, "model_output", model_output)
    net.sample(torch.randn(2, 2, 16, 16), SamplingParams(steps=3, method="ddim"), torch.Generator().manual_seed(0))
    assert len(calls) == 3
    for (x_t, t, _, out), (_, _, condition, _) in zip(calls, calls[1:]):
        torch.testing.assert_close(condition, net.x0_estimate(out, x_t, t))


@pytest.mark.parametrize("prediction_type", ["eps", "x0"])
def test_loss_is_the_hybrid_loss_plus_beta_times_the_kl_against_the_drawn_noise(monkeypatch, prediction_type):
    torch.manual_seed(0)
    params = tiny(prediction_type).model_copy(update={"vlb_weight": 0.5, "kl_weight": 10.0})
    net = CIMD(params, image_channels=2)
    rec = Recorder(net, monkeypatch)
    masks = distinct_masks()
    terms = net.losses(torch.randn(4, 2, 16, 16), masks, VALID, torch.Generator().manual_seed(3))
    expected = terms["mse"] + 0.5 * net.diffusion.num_timesteps * terms["vlb"] + 10.0 * terms["kl"]
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-5, atol=1e-6)
    # the regression target is built from the noise that made x_t
    x0, x_t, t = rec.seen["x0"].double(), rec.seen["x_t"].double(), rec.seen["t"]
    abar = torch.as_tensor(np.cumprod(1.0 - net.diffusion.betas))[t][:, None, None, None]
    noise = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
    target = noise if prediction_type == "eps" else x0
    mse = ((rec.seen["out"][:, :1].double() - target) ** 2).mean()
    torch.testing.assert_close(terms["mse"].double(), mse, rtol=1e-4, atol=1e-6)


def test_acn_sees_the_clean_mask_estimate_in_mask_units_with_an_input_scale(monkeypatch):
    torch.manual_seed(0)
    params = tiny("x0").model_copy(update={"input_scale": 0.5})
    net = CIMD(params, image_channels=2)
    rec = Recorder(net, monkeypatch)
    net.losses(torch.randn(4, 2, 16, 16), distinct_masks(), VALID, torch.Generator().manual_seed(3))
    # the denoiser predicts x0 in mask units; the diffusion sees it times b, the ACN divided back
    torch.testing.assert_close(rec.seen["acn"][:, 2:], rec.seen["out"][:, :1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rec.seen["amn"][:, 2:], rec.seen["x0"] / 0.5, rtol=0, atol=0)


def self_conditioned(prediction_type="eps") -> CIMD:
    torch.manual_seed(0)
    return CIMD(ModelParams.model_validate(
        {"variant": "ddpm_prob", "prediction_type": prediction_type, "self_condition": True, "unet": TINY_UNET}
    ), image_channels=2)


def test_self_conditioning_in_training_follows_the_generator_only():
    net = self_conditioned()
    image, masks = torch.randn(4, 2, 16, 16), distinct_masks()
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # a draw from the global RNG would differ between the runs
        runs.append([net.losses(image, masks, VALID, torch.Generator().manual_seed(s))["loss"] for s in range(8)])
    assert runs[0] == runs[1]


def test_self_conditioning_first_pass_gives_the_estimate_from_the_same_x_t(monkeypatch):
    net = self_conditioned("eps")
    calls = []
    original = net.model_output

    def model_output(x_t, image, t, condition, z=None):
        out = original(x_t, image, t, condition, z)
        calls.append((x_t.clone(), t.clone(), condition.clone(), out.clone()))
        return out

    monkeypatch.setattr(net, "model_output", model_output)
    image, masks = torch.randn(4, 2, 16, 16), distinct_masks()
    fed = 0  # the first pass runs every step; the coin feeds its estimate or zeros to the second
    for seed in range(8):
        calls.clear()
        net.losses(image, masks, VALID, torch.Generator().manual_seed(seed))
        assert len(calls) == 2 and torch.equal(calls[0][2], torch.zeros_like(calls[0][2]))
        x_t, t, _, out = calls[0]
        assert torch.equal(calls[1][0], x_t) and torch.equal(calls[1][1], t)
        if not torch.equal(calls[1][2], torch.zeros_like(calls[1][2])):
            fed += 1
            torch.testing.assert_close(calls[1][2], net.x0_estimate(out, x_t, t))
    assert 0 < fed < 8


def test_the_model_block_reaches_the_encoders_and_the_diffusion():
    def net(**block):
        return CIMD(ModelParams.model_validate({"unet": TINY_UNET, "ambiguity_nets": {"filters": [8, 8, 8, 8]},
                                                **block}), image_channels=2)

    assert net(variant="cimd_fc").amn.covariance is net(variant="cimd_fc").acn.covariance is Covariance.FULL
    assert net(variant="cimd_aa").amn.covariance is net(variant="cimd_aa").acn.covariance is Covariance.DIAGONAL
    assert net(variant="ddpm_prob").amn is None and net(variant="ddpm_prob").acn is None
    custom = net(variant="ddpm_prob", beta_end=0.03, loss_weighting="min_snr", min_snr_gamma=2.0)
    assert custom.diffusion.betas[-1] == pytest.approx(0.03)
    assert custom.diffusion.loss_weighting.value == "min_snr" and custom.diffusion.min_snr_gamma == 2.0


def test_only_an_x0_prediction_is_scaled_and_bounded(monkeypatch):
    raw = torch.full((2, 2, 16, 16), 3.0)
    for block, expected in [
        ({"prediction_type": "eps", "input_scale": 0.5}, 3.0),  # eps and v are never scaled
        ({"prediction_type": "x0", "output_activation": "tanh"}, float(torch.tanh(torch.tensor(3.0)))),
        ({"prediction_type": "x0", "input_scale": 0.5}, 1.5),
    ]:
        net = CIMD(ModelParams.model_validate({"variant": "ddpm_prob", "unet": TINY_UNET, **block}), image_channels=2)
        monkeypatch.setattr(net.denoiser, "forward", lambda *args, **kwargs: raw)
        out = net.model_output(torch.zeros(2, 1, 16, 16), torch.zeros(2, 2, 16, 16), torch.tensor([0, 1]), None)
        torch.testing.assert_close(out[:, :1], torch.full((2, 1, 16, 16), expected))
        torch.testing.assert_close(out[:, 1:], raw[:, 1:])  # the variance channel as the network gave it
