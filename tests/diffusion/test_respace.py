"""Respacing: kept timesteps, preserved marginals, and chains run with an exact denoiser.

For per-pixel Gaussian data x0 ~ N(0, S2) everything is linear-Gaussian, so the exact
posterior-mean denoiser, the exact reverse variance and the variance a chain ends at are all
known in closed form; sampling 20k pixels checks the samplers against them.
"""

import math

import numpy as np
import pytest
import torch

from cimd_pipeline.diffusion.respace import respaced_diffusion, space_timesteps
from cimd_pipeline.diffusion.samplers import sample
from cimd_pipeline.diffusion.schedule import linear_betas

BETAS = linear_betas()
BASE_ALPHA_BAR = np.cumprod(1.0 - BETAS)
S2 = 0.25
SHAPE = (8, 1, 50, 50)  # 20k pixels: the sample variance has a standard error of ~0.0025


def _shrink(alpha_bar):
    """k with E[x0 | x_t] = k x_t for x0 ~ N(0, S2); numpy arrays or tensors."""
    return alpha_bar**0.5 * S2 / (alpha_bar * S2 + 1.0 - alpha_bar)


def _gaussian_model_fn(var_values=None):
    """Exact eps predictor keyed on ORIGINAL timesteps, plus per-original-t variance values."""
    def model_fn(x_t, t_original):
        abar = torch.as_tensor(BASE_ALPHA_BAR, dtype=torch.float64)[t_original]
        abar = abar.reshape(-1, 1, 1, 1)
        x0 = _shrink(abar) * x_t.double()
        eps = ((x_t.double() - abar.sqrt() * x0) / (1.0 - abar).sqrt()).float()
        if var_values is None:
            return eps
        v = torch.as_tensor(var_values, dtype=torch.float32)[t_original].reshape(-1, 1, 1, 1)
        return torch.cat([eps, v.expand_as(eps)], dim=1)
    return model_fn


def _chain_variance(alpha_bar, step_variance):
    """Final variance of the linear DDPM chain x_{i-1} = (c1 k + c2) x_i + sigma_i z."""
    alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
    betas = 1.0 - alpha_bar / alpha_bar_prev
    c1 = betas * np.sqrt(alpha_bar_prev) / (1.0 - alpha_bar)
    c2 = (1.0 - alpha_bar_prev) * np.sqrt(1.0 - betas) / (1.0 - alpha_bar)
    var = 1.0
    for i in range(len(alpha_bar) - 1, -1, -1):
        var = (c1[i] * _shrink(alpha_bar[i]) + c2[i]) ** 2 * var + (step_variance[i] if i else 0)
    return var


def _oracle_var_values(diffusion):
    """v in [-1, 1] giving the exact Gaussian reverse variance pv + c1^2 Var(x0 | x_t)."""
    ab = diffusion.alphas_cumprod
    exact = diffusion.posterior_variance + diffusion.posterior_mean_coef1**2 * (
        S2 * (1.0 - ab) / (ab * S2 + 1.0 - ab)
    )
    low, high = diffusion.posterior_log_variance_clipped, np.log(diffusion.betas)
    v = 2.0 * (np.log(exact) - low) / (high - low) - 1.0
    v[0] = -1.0  # no noise is added at the last step
    assert np.all(np.abs(v) <= 1.0 + 1e-9)
    table = np.zeros(len(BETAS))
    table[diffusion.timestep_map] = v
    return table


def test_space_timesteps_int():
    kept = space_timesteps(1000, 50)
    assert len(kept) == 50 and len(set(kept)) == 50
    assert kept == sorted(kept) and kept[0] == 0 and kept[-1] == 999
    assert space_timesteps(1000, "50") == kept
    assert space_timesteps(1000, 1000) == list(range(1000))


def test_space_timesteps_ddim_string():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim7") == list(range(0, 1000, 143))


@pytest.mark.parametrize("steps", [0, 1, 1001, "ddim3000", "fifty", "10,20"])
def test_space_timesteps_rejects_bad_steps(steps):
    with pytest.raises(ValueError):
        space_timesteps(1000, steps)


def test_respaced_diffusion_keeps_marginals_and_original_timesteps():
    kept = space_timesteps(1000, 50)
    diffusion = respaced_diffusion(BETAS, reversed(kept), prediction_type="v", learn_sigma=False)
    assert diffusion.num_timesteps == 50 and diffusion.timestep_map.dtype == np.int64
    np.testing.assert_array_equal(diffusion.timestep_map, kept)
    np.testing.assert_allclose(diffusion.alphas_cumprod, BASE_ALPHA_BAR[kept], rtol=1e-12)
    full = respaced_diffusion(BETAS, range(1000))
    np.testing.assert_allclose(full.betas, BETAS, rtol=1e-9)


@pytest.mark.parametrize("use_timesteps", [[], [-1, 5], [10, 1000]])
def test_respaced_diffusion_rejects_out_of_range(use_timesteps):
    with pytest.raises(ValueError):
        respaced_diffusion(BETAS, use_timesteps)


def test_ddpm50_with_exact_reverse_variance_recovers_data_variance():
    diffusion = respaced_diffusion(BETAS, space_timesteps(1000, 50))
    model_fn = _gaussian_model_fn(_oracle_var_values(diffusion))
    x, _ = sample(model_fn, diffusion, SHAPE, generator=torch.Generator().manual_seed(0),
                  clip_denoised=False)
    assert x.var().item() == pytest.approx(S2, abs=0.01)
    assert abs(x.mean().item()) < 0.01


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_ddpm50_fixed_variances_match_closed_form(learn_sigma):
    """Posterior variance (v = -1) under-disperses, FIXED_LARGE over-disperses, as predicted."""
    diffusion = respaced_diffusion(BETAS, space_timesteps(1000, 50), learn_sigma=learn_sigma)
    ab = BASE_ALPHA_BAR[diffusion.timestep_map]
    ab_prev = np.append(1.0, ab[:-1])
    if learn_sigma:
        model_fn = _gaussian_model_fn(-np.ones(len(BETAS)))
        step_var = (1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev)
    else:
        model_fn = _gaussian_model_fn()
        step_var = 1.0 - ab / ab_prev
    expected = _chain_variance(ab, step_var)
    assert abs(expected - S2) > 0.015  # the chain is visibly off the data variance ...
    x, _ = sample(model_fn, diffusion, SHAPE, generator=torch.Generator().manual_seed(1),
                  clip_denoised=False)
    assert x.var().item() == pytest.approx(expected, abs=0.01)  # ... exactly as predicted


def test_ddim50_eta0_is_deterministic_and_near_data_variance():
    diffusion = respaced_diffusion(BETAS, space_timesteps(1000, 50))
    model_fn = _gaussian_model_fn(np.zeros(len(BETAS)))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    runs = [
        sample(model_fn, diffusion, SHAPE, method="ddim", noise=noise, clip_denoised=False,
               generator=torch.Generator().manual_seed(seed))[0]
        for seed in (3, 4)
    ]
    assert torch.equal(runs[0], runs[1])
    ab = diffusion.alphas_cumprod
    ab_prev = diffusion.alphas_cumprod_prev
    gain = np.sqrt(ab_prev) * _shrink(ab) + np.sqrt(1 - ab_prev) * (
        1 - np.sqrt(ab) * _shrink(ab)
    ) / np.sqrt(1 - ab)
    assert math.prod(gain**2) == pytest.approx(S2, abs=0.03)  # 0.223: DDIM-50 under-disperses
    expected = math.prod(gain**2) * noise.var().item()
    assert runs[0].var().item() == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (1, "steps must be in [2, 1000], got 1"),
        (1001, "steps must be in [2, 1000], got 1001"),
        ("ddim3000", "no integer stride gives 3000 steps out of 1000"),
        ("fifty", "steps must be an int, 'N' or 'ddimN', got 'fifty'"),
    ],
)
def test_space_timesteps_says_what_is_wrong(steps, message):
    with pytest.raises(ValueError) as error:
        space_timesteps(1000, steps)
    assert str(error.value) == message


def test_space_timesteps_edges():
    assert space_timesteps(1000, 2) == [0, 999]  # the fewest steps: both ends
    assert space_timesteps(1000, "ddim1000") == list(range(1000))  # stride 1


@pytest.mark.parametrize("use_timesteps", [[], [-1, 5], [10, 1000]])
def test_respaced_diffusion_names_the_valid_range(use_timesteps):
    with pytest.raises(ValueError, match=r"^use_timesteps must lie in \[0, 999\]$"):
        respaced_diffusion(BETAS, use_timesteps)


def test_respaced_diffusion_computes_in_float64_with_unit_scale_by_default(caplog):
    betas32 = BETAS.astype(np.float32)
    kept = space_timesteps(1000, 50)
    with caplog.at_level("DEBUG", logger="cimd_pipeline.diffusion.respace"):
        diffusion = respaced_diffusion(betas32, kept)
    np.testing.assert_allclose(diffusion.alphas_cumprod, np.cumprod(1.0 - betas32.astype(np.float64))[kept], rtol=1e-12)
    assert diffusion.input_scale == 1.0
    assert "respaced 1000 training steps to 50" in caplog.text
