"""Single steps, timestep feeding and seed reproducibility of the samplers."""

import numpy as np
import pytest
import torch

from cimd_pipeline.diffusion.respace import respaced_diffusion, space_timesteps
from cimd_pipeline.diffusion.samplers import ddim_step, ddpm_step, sample
from cimd_pipeline.diffusion.schedule import GaussianDiffusion, linear_betas

BETAS = linear_betas()
SHAPE = (2, 1, 6, 6)


def _model_fn(x_t, t_original):
    """A fixed smooth 'network': eps guess 0.5 x_t, variance value 0 (learned sigma)."""
    return torch.cat([0.5 * x_t, torch.zeros_like(x_t)], dim=1)


def _state(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_t = torch.randn(SHAPE, generator=gen)
    model_out = torch.cat([torch.randn(SHAPE, generator=gen), -torch.ones(SHAPE)], dim=1)
    return x_t, model_out


def test_sample_feeds_original_timesteps_in_descending_order():
    diffusion = respaced_diffusion(BETAS, space_timesteps(1000, 10))
    seen = []

    def recording_fn(x_t, t_original):
        assert t_original.dtype == torch.long and t_original.shape == (SHAPE[0],)
        seen.append(int(t_original[0]))
        return _model_fn(x_t, t_original)

    sample(recording_fn, diffusion, SHAPE, generator=torch.Generator().manual_seed(0))
    assert seen == list(diffusion.timestep_map[::-1])
    assert seen[0] == 999 and seen[-1] == 0


def test_ddpm_step_adds_noise_except_at_t0():
    diffusion = GaussianDiffusion(BETAS)
    x_t, model_out = _state()
    t = torch.tensor([0, 500])
    a, _ = ddpm_step(diffusion, model_out, x_t, t, torch.Generator().manual_seed(1))
    b, _ = ddpm_step(diffusion, model_out, x_t, t, torch.Generator().manual_seed(2))
    mean = diffusion.p_mean_variance(model_out, x_t, t)["mean"]
    assert torch.equal(a[0], mean[0]) and torch.equal(b[0], mean[0])
    assert not torch.equal(a[1], b[1])


def test_ddim_eta1_equals_ddpm_with_posterior_variance():
    """With sigma_t equal to the posterior std, DDIM's update is the DDPM posterior step."""
    diffusion = GaussianDiffusion(BETAS)
    x_t, model_out = _state(3)
    t = torch.tensor([1, 700])
    ddpm, x0_a = ddpm_step(diffusion, model_out, x_t, t, torch.Generator().manual_seed(5))
    ddim, x0_b = ddim_step(diffusion, model_out, x_t, t, 1.0, torch.Generator().manual_seed(5))
    torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x0_a, x0_b)


def test_ddim_step_matches_song_et_al_update():
    diffusion = GaussianDiffusion(BETAS)
    x_t, model_out = _state(4)
    t, eta = 600, 0.5
    x_prev, pred_x0 = ddim_step(diffusion, model_out, x_t, torch.full((SHAPE[0],), t), eta,
                                torch.Generator().manual_seed(7))
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    abar, abar_prev = np.prod(1 - BETAS[: t + 1]), np.prod(1 - BETAS[:t])
    sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    eps = (x_t - np.sqrt(abar) * pred_x0) / np.sqrt(1 - abar)
    expected = np.sqrt(abar_prev) * pred_x0 + np.sqrt(1 - abar_prev - sigma**2) * eps + sigma * z
    torch.testing.assert_close(x_prev, expected.float(), rtol=1e-4, atol=1e-4)


def test_clip_denoised_bounds_pred_x0():
    diffusion = GaussianDiffusion(BETAS)
    x_t, model_out = _state()
    t = torch.full((SHAPE[0],), 900)
    _, clipped = ddim_step(diffusion, model_out, x_t, t)
    _, raw = ddim_step(diffusion, model_out, x_t, t, clip_denoised=False)
    assert clipped.abs().max() <= 1.0 < raw.abs().max()


@pytest.mark.parametrize(("method", "eta"), [("ddpm", 0.0), ("ddim", 0.5)])
def test_same_seed_reproduces_and_different_seed_differs(method, eta):
    diffusion = respaced_diffusion(BETAS, space_timesteps(1000, 8))

    def run(seed):
        return sample(_model_fn, diffusion, SHAPE, method=method, eta=eta,
                      generator=torch.Generator().manual_seed(seed))

    first, second, other = run(0), run(0), run(1)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])


def test_progress_bar_and_fixed_noise_give_same_result():
    diffusion = respaced_diffusion(BETAS, space_timesteps(1000, 5), learn_sigma=False)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

    def fn(x_t, t_original):
        return 0.5 * x_t

    quiet = sample(fn, diffusion, SHAPE, method="ddim", noise=noise)[0]
    loud = sample(fn, diffusion, SHAPE, method="ddim", noise=noise, progress=True)[0]
    assert torch.equal(quiet, loud)
    assert not np.isnan(quiet.numpy()).any()


@pytest.mark.parametrize(
    "kwargs",
    [{"method": "euler"}, {"method": "ddim", "eta": -0.1}, {"noise": torch.zeros(1, 1, 6, 6)}],
)
def test_bad_sampling_config_raises(kwargs):
    diffusion = respaced_diffusion(BETAS, space_timesteps(1000, 5))
    with pytest.raises(ValueError):
        sample(_model_fn, diffusion, SHAPE, **kwargs)


def test_ddim_is_deterministic_by_default_and_draws_no_noise_at_eta_0():
    diffusion = GaussianDiffusion(BETAS)
    x_t, model_out = _state(5)
    t = torch.full((SHAPE[0],), 400)
    first, second = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    state = first.get_state()
    a, _ = ddim_step(diffusion, model_out, x_t, t, generator=first)
    b, _ = ddim_step(diffusion, model_out, x_t, t, generator=second)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(first.get_state(), state)  # the stream is left for the steps that need it


def test_ddim_refuses_a_negative_eta_and_stays_finite_for_a_large_one():
    diffusion = GaussianDiffusion(BETAS)
    x_t, model_out = _state(6)
    t = torch.full((SHAPE[0],), 300)
    with pytest.raises(ValueError, match=r"^eta must be non-negative, got -0.5$"):
        ddim_step(diffusion, model_out, x_t, t, -0.5)
    x_prev, _ = ddim_step(diffusion, model_out, x_t, t, 5.0, torch.Generator().manual_seed(0))
    assert torch.isfinite(x_prev).all()  # the eps coefficient is clipped at 0, not NaN
