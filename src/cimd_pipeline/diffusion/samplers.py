"""Ancestral (DDPM) and DDIM sampling of masks from a trained denoiser.

The samplers know nothing of the network or of the conditioning image: they take a
`model_fn(x_t, t_original) -> model_out` closure, where `x_t` is (N, C, H, W), `t_original` is
the (N,) int64 ORIGINAL training timestep (`diffusion.timestep_map[t]`) and `model_out` is
(N, 2C, H, W) with learned variance or (N, C, H, W) without. All randomness comes from one
`torch.Generator` or from `RowGenerators` (one per row), so a fixed seed reproduces the same masks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from cimd_pipeline.diffusion.noise import Generator, randn
from cimd_pipeline.diffusion.schedule import GaussianDiffusion, extract

logger = logging.getLogger(__name__)

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_METHODS = ("ddpm", "ddim")


def _randn_like(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    """Standard normal noise shaped like `x`, drawn from `generator` on `x`'s device."""
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)


def _nonzero_mask(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """(N, 1, ..., 1) float mask that is 0 where t == 0, so the last step adds no noise."""
    return (t != 0).to(torch.float32).reshape(-1, *([1] * (ndim - 1)))


def ddpm_step(
    diffusion: GaussianDiffusion,
    model_out: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    generator: Generator = None,
    clip_denoised: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t).

    Args:
        diffusion: the (possibly respaced) schedule; `t` indexes it.
        model_out: network output for (x_t, timestep_map[t]).
        x_t: (N, C, H, W) current sample.
        t: (N,) int64 internal timestep indices.
        generator: source of the step noise.
        clip_denoised: clamp the x0 estimate to [-1, 1] before forming the mean.

    Returns:
        (x_{t-1}, pred_x0), both (N, C, H, W).
    """
    out = diffusion.p_mean_variance(model_out, x_t, t, clip_denoised=clip_denoised)
    noise = _randn_like(x_t, generator)
    x_prev = out["mean"] + _nonzero_mask(t, x_t.ndim) * torch.exp(
        0.5 * out["log_variance"]
    ) * noise
    return x_prev, out["pred_x0"]


def ddim_step(
    diffusion: GaussianDiffusion,
    model_out: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    eta: float = 0.0,
    generator: Generator = None,
    clip_denoised: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step (Song et al. 2021); `eta = 0` is deterministic, `eta = 1` DDPM-like.

    The learned variance is ignored: DDIM's noise level is set by `eta` alone, as
    sigma_t = eta * sqrt(posterior variance) (Song et al. eq. 16). The coefficients are formed
    from the float64 tables because 1 - abar_prev - sigma^2 cancels badly in float32 near t = 0.

    Returns:
        (x_{t-1}, pred_x0), both (N, C, H, W).
    """
    if eta < 0:
        raise ValueError(f"eta must be non-negative, got {eta}")
    out = diffusion.p_mean_variance(model_out, x_t, t, clip_denoised=clip_denoised)
    pred_x0 = out["pred_x0"]
    eps = diffusion.predict_eps_from_x0(x_t, t, pred_x0)
    variance = eta**2 * diffusion.posterior_variance
    eps_coef = np.sqrt(np.clip(1.0 - diffusion.alphas_cumprod_prev - variance, 0.0, None))
    x_prev = (
        extract(np.sqrt(diffusion.alphas_cumprod_prev), t, x_t.shape) * pred_x0
        + extract(eps_coef, t, x_t.shape) * eps
    )
    if eta > 0:
        sigma = extract(np.sqrt(variance), t, x_t.shape)
        x_prev = x_prev + _nonzero_mask(t, x_t.ndim) * sigma * _randn_like(x_t, generator)
    return x_prev, pred_x0


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    shape: tuple[int, ...],
    method: str = "ddpm",
    eta: float = 0.0,
    generator: Generator = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the reverse chain from t = T - 1 down to 0.

    Args:
        model_fn: `(x_t, t_original) -> model_out`, see the module docstring.
        diffusion: schedule to sample on, usually a `respaced_diffusion`.
        shape: (N, C, H, W) of the masks.
        method: "ddpm" (ancestral, uses the learned variance) or "ddim" (uses `eta`;
            `eta` is ignored by "ddpm").
        eta: DDIM stochasticity.
        generator: torch generator on `device`, or `RowGenerators` (one stream per row, so a
            row's sample does not depend on the batch); the only randomness used.
        device: where to sample; defaults to `noise`'s, then `generator`'s device.
        progress: show a tqdm bar over the steps.
        noise: optional (N, C, H, W) starting x_T instead of a fresh draw.
        clip_denoised: clamp x0 estimates to [-1, 1] at every step.

    Returns:
        (final sample x_0, final pred_x0), both (N, C, H, W).
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if eta < 0:
        raise ValueError(f"eta must be non-negative, got {eta}")
    if device is None:
        if noise is not None:
            device = noise.device
        elif generator is not None:
            device = generator.device
        else:
            device = torch.device("cpu")
    if noise is None:
        x = randn(shape, generator, device=device)
    else:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        x = noise.to(device)
    timestep_map = torch.as_tensor(diffusion.timestep_map, device=device)
    logger.debug("sampling %s with %s over %d steps", tuple(shape), method, len(timestep_map))
    pred_x0 = x
    steps = range(diffusion.num_timesteps - 1, -1, -1)
    for i in tqdm(steps, desc=f"{method} sampling", disable=not progress, leave=False):
        t = torch.full((shape[0],), i, dtype=torch.long, device=device)
        model_out = model_fn(x, timestep_map[t])
        if method == "ddpm":
            x, pred_x0 = ddpm_step(diffusion, model_out, x, t, generator, clip_denoised)
        else:
            x, pred_x0 = ddim_step(diffusion, model_out, x, t, eta, generator, clip_denoised)
    return x, pred_x0
