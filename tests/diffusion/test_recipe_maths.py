"""Closed forms of the diffusion recipe switches: cosine schedule, SNR loss weights, input scale."""

import math

import numpy as np
import pytest
import torch

from cimd_pipeline.diffusion import (
    GaussianDiffusion,
    LossWeighting,
    PredictionType,
    cosine_betas,
    linear_betas,
    make_betas,
    respaced_diffusion,
    x0_loss_weights,
)

SHAPE = (6, 1, 8, 8)


def test_cosine_alpha_bar_is_the_squared_cosine_ratio_where_unclipped():
    T, s = 1000, 0.008
    diffusion = GaussianDiffusion(cosine_betas(T))
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for t in (0, 1, 10, 250, 500, 900):
        assert diffusion.alphas_cumprod[t] == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert diffusion.betas[0] == pytest.approx(1 - f(1) / f(0), rel=1e-12)
    # the last beta would be 1 (f(T) ~ 0): clipped at 0.999, and only the very last ones are
    assert diffusion.betas.max() == 0.999 and diffusion.betas[-1] == 0.999
    assert (diffusion.betas == 0.999).sum() <= 3
    assert np.all(np.diff(diffusion.betas) > 0)


def test_make_betas_dispatches_and_the_cosine_ignores_the_linear_ends():
    assert np.array_equal(make_betas("linear", 100, 1e-4, 0.02), linear_betas(100, 1e-4, 0.02))
    assert np.array_equal(make_betas("cosine", 100, 0.5, 0.6), cosine_betas(100))
    with pytest.raises(ValueError):
        make_betas("quadratic", 100)


def test_x0_loss_weights_closed_forms():
    snr = torch.tensor([0.01, 1.0, 4.0, 100.0])
    assert torch.allclose(x0_loss_weights("snr_plus_one", snr), torch.tensor([1.01, 2.0, 5.0, 101.0]))
    assert torch.allclose(x0_loss_weights("min_snr", snr, gamma=5.0), torch.tensor([0.01, 1.0, 4.0, 5.0]))
    with pytest.raises(ValueError, match="simple"):
        x0_loss_weights("simple", snr)


def _losses(prediction_type, weighting, scale, gamma=5.0, schedule="cosine"):
    diffusion = GaussianDiffusion(make_betas(schedule, 200), prediction_type, learn_sigma=False, input_scale=scale,
                                  loss_weighting=weighting, min_snr_gamma=gamma)
    gen = torch.Generator().manual_seed(3)
    x0 = scale * (torch.randint(0, 2, SHAPE, generator=gen).float() * 2 - 1)
    noise = torch.randn(SHAPE, generator=gen)
    t = torch.tensor([0, 3, 40, 100, 160, 199])
    x_t = diffusion.q_sample(x0, t, noise)
    prediction = torch.randn(SHAPE, generator=gen)
    terms = diffusion.training_losses(prediction, x0, x_t, t, noise, 0.0)
    return terms["mse"], diffusion.snr[t.numpy()]


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_snr_plus_one_on_x0_hat_is_the_v_loss(scale):
    simple, _ = _losses(PredictionType.V, "simple", scale)
    weighted, _ = _losses(PredictionType.V, "snr_plus_one", scale)
    # |v_hat - v|^2 = (1 + SNR) |x0_hat - x0|^2 in the process's units (mask units times b)
    assert torch.allclose(simple, weighted * scale**2, rtol=1e-4)


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_min_snr_with_a_huge_gamma_on_x0_hat_is_the_eps_loss(scale):
    """Min-SNR clamps the SNR of the scaled mask, b^2 SNR(t): with gamma -> infinity its weighted
    x0_hat MSE (mask units) is the eps-MSE of the scaled process itself, at every b."""
    simple, snr = _losses(PredictionType.EPS, "simple", scale)
    weighted, _ = _losses(PredictionType.EPS, "min_snr", scale, gamma=1e12)
    assert torch.allclose(simple, weighted, rtol=1e-3)
    clipped, _ = _losses(PredictionType.EPS, "min_snr", scale, gamma=2.0)
    effective = scale**2 * snr
    expected = weighted * torch.as_tensor(np.minimum(effective, 2.0) / effective, dtype=torch.float32)
    assert torch.allclose(clipped, expected, rtol=1e-4)
    assert (effective > 2.0).any() and (effective < 2.0).any()  # the clamp acts on some steps only


def test_simple_x0_loss_is_in_mask_units_whatever_the_scale():
    full, _ = _losses(PredictionType.X0, "simple", 1.0)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, 2, SHAPE, generator=gen).float() * 2 - 1
    torch.randn(SHAPE, generator=gen)
    prediction = torch.randn(SHAPE, generator=gen)
    assert torch.allclose(full, ((prediction - x0) ** 2).mean((1, 2, 3)))
    diffusion = GaussianDiffusion(make_betas("linear", 200), "x0", learn_sigma=False, input_scale=0.1)
    t = torch.zeros(SHAPE[0], dtype=torch.long)
    scaled = diffusion.training_losses(0.1 * prediction, 0.1 * x0, 0.1 * x0, t, x0, 0.0)["mse"]
    assert torch.allclose(scaled, full, rtol=1e-5)


def test_input_scale_sets_the_clip_range_and_survives_respacing():
    diffusion = GaussianDiffusion(cosine_betas(100), "x0", learn_sigma=False, input_scale=0.1)
    respaced = respaced_diffusion(diffusion.betas, [0, 50, 99], "x0", learn_sigma=False, input_scale=0.1)
    assert respaced.input_scale == 0.1
    x_t = torch.zeros(2, 1, 4, 4)
    out = respaced.p_mean_variance(torch.full_like(x_t, 5.0), x_t, torch.tensor([1, 2]))
    assert torch.allclose(out["pred_x0"], torch.full_like(x_t, 0.1))
    with pytest.raises(ValueError, match="input_scale"):
        GaussianDiffusion(cosine_betas(10), input_scale=0.0)


def test_loss_weighting_names():
    assert [w.value for w in LossWeighting] == ["simple", "snr_plus_one", "min_snr"]
