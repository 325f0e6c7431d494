"""Closed-form checks of the elementwise bound terms."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from cimd_pipeline.diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)

LEVELS = torch.linspace(-1.0, 1.0, 256, dtype=torch.float64)


def test_mean_flat_reduces_all_but_batch():
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2)
    out = mean_flat(x)
    assert out.shape == (2,)
    torch.testing.assert_close(out, torch.tensor([5.5, 17.5]))


def test_normal_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = torch.randn(4, 50, generator=gen, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, torch.exp(0.5 * lv1)),
        torch.distributions.Normal(m2, torch.exp(0.5 * lv2)),
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)


def test_normal_kl_of_identical_gaussians_is_zero():
    mean = torch.tensor([0.3, -2.0])
    logvar = torch.tensor([-4.0, 1.0])
    torch.testing.assert_close(normal_kl(mean, logvar, mean, logvar), torch.zeros(2))


def test_approx_cdf_is_close_to_exact_cdf():
    x = torch.linspace(-6.0, 6.0, 2001, dtype=torch.float64)
    err = (approx_standard_normal_cdf(x) - torch.special.ndtr(x)).abs().max()
    assert err < 2.5e-4


@pytest.mark.parametrize(("mean", "log_scale"), [(0.0, math.log(0.1)), (0.9, math.log(0.02)),
                                                 (-1.0, math.log(0.5)), (0.37, math.log(1e-3))])
def test_discretized_probabilities_sum_to_one(mean, log_scale):
    logp = discretized_gaussian_log_likelihood(
        LEVELS, means=torch.tensor(mean, dtype=torch.float64),
        log_scales=torch.tensor(log_scale, dtype=torch.float64),
    )
    assert torch.exp(logp).sum().item() == pytest.approx(1.0, abs=1e-6)


def test_discretized_interior_bin_matches_numeric_integral():
    mean, scale = 0.1, 0.05
    index = 140  # an interior level close to the mean
    x = LEVELS[index].item()
    expected, _ = integrate.quad(
        lambda u: stats.norm.pdf(u, loc=mean, scale=scale), x - 1 / 255, x + 1 / 255
    )
    logp = discretized_gaussian_log_likelihood(
        LEVELS[index], means=torch.tensor(mean, dtype=torch.float64),
        log_scales=torch.tensor(math.log(scale), dtype=torch.float64),
    )
    assert expected > 0.01
    assert torch.exp(logp).item() == pytest.approx(expected, rel=1e-2)


def test_discretized_edge_bins_extend_to_infinity():
    mean, scale = 0.95, 0.1
    log_scale = torch.tensor(math.log(scale), dtype=torch.float64)
    ends = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    logp = discretized_gaussian_log_likelihood(
        ends, means=torch.tensor(mean, dtype=torch.float64), log_scales=log_scale
    )
    expected = np.array([
        stats.norm.cdf(-1 + 1 / 255, loc=mean, scale=scale),
        stats.norm.sf(1 - 1 / 255, loc=mean, scale=scale),
    ])
    np.testing.assert_allclose(torch.exp(logp).numpy(), expected, rtol=2e-3, atol=1e-5)
