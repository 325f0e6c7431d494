"""Elementwise likelihood terms of the diffusion variational bound.

These follow openai/improved-diffusion `losses.py` so that the learned-variance objective
(the `L_vlb` half of the hybrid loss) is numerically the one the CIMD paper trained with.
All functions are elementwise on tensors of any shape, typically (N, C, H, W); reduce with
`mean_flat` to get one value per sample.
"""

from __future__ import annotations

import math

import torch

#: Half-width of one discretisation bin for data in [-1, 1] quantised to 256 levels.
_HALF_BIN = 1.0 / 255.0
#: Floor inside the logs so that empty tails give a large but finite NLL instead of -inf.
_LOG_FLOOR = 1e-12


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every non-batch dimension: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats, elementwise.

    Log-variances rather than variances are taken because the model predicts them and because
    the posterior variance at the first step is tiny; arguments broadcast against each other.
    """
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast tanh approximation of the standard normal CDF (absolute error below ~2e-4).

    Kept instead of `torch.special.ndtr` so the decoder NLL matches improved-diffusion's.
    """
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-probability (nats) of `x` under a Gaussian discretised into 256 bins on [-1, 1].

    This is the decoder term L_0 of the bound: a continuous Gaussian cannot assign probability
    mass to the discrete data, so each value owns the bin [x - 1/255, x + 1/255] and the two
    outermost bins extend to -inf and +inf, making the probabilities of all 256 levels sum to 1.

    Args:
        x: data in [-1, 1], e.g. (N, C, H, W) binary masks scaled to {-1, 1}.
        means: Gaussian means, broadcastable to `x`.
        log_scales: log standard deviations, broadcastable to `x`.

    Returns:
        Elementwise log-likelihoods with the shape of `x`.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + _HALF_BIN))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - _HALF_BIN))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=_LOG_FLOOR))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=_LOG_FLOOR))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=_LOG_FLOOR))
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )
