"""Sampling with fewer steps than training (improved-diffusion `respace.py`).

A network trained on T steps can be sampled on any increasing subset of them: keeping the
marginals q(x_t | x_0) of the kept steps fixes a new, shorter beta schedule
beta_i = 1 - abar_{t_i} / abar_{t_{i-1}}. The network is still fed the ORIGINAL timesteps via
`GaussianDiffusion.timestep_map`, and its learned variance value v keeps interpolating between
the new beta and the new posterior variance, which is what improved-diffusion does.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import numpy as np

from cimd_pipeline.diffusion.schedule import GaussianDiffusion, PredictionType

logger = logging.getLogger(__name__)

_DDIM_PATTERN = re.compile(r"ddim(\d+)")


def space_timesteps(num_timesteps: int, steps: int | str) -> list[int]:
    """Choose which of the `num_timesteps` training steps to keep, sorted ascending.

    Args:
        num_timesteps: T of the training schedule.
        steps: an int N (or its string) keeps N steps evenly spread over [0, T - 1], both ends
            included; "ddimN" keeps range(0, T, stride) for the stride giving exactly N steps,
            as in improved-diffusion (the last step is then not T - 1).

    Raises:
        ValueError: for a malformed string or a count outside [2, T].
    """
    if isinstance(steps, str):
        match = _DDIM_PATTERN.fullmatch(steps.strip())
        if match:
            wanted = int(match.group(1))
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"no integer stride gives {wanted} steps out of {num_timesteps}")
        if not steps.strip().isdigit():
            raise ValueError(f"steps must be an int, 'N' or 'ddimN', got {steps!r}")
        steps = int(steps)
    if not 2 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [2, {num_timesteps}], got {steps}")
    kept = np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int64)
    return sorted(set(kept.tolist()))


def respaced_diffusion(
    base_betas: np.ndarray,
    use_timesteps: Iterable[int],
    prediction_type: PredictionType | str = PredictionType.EPS,
    learn_sigma: bool = True,
    input_scale: float = 1.0,
) -> GaussianDiffusion:
    """Diffusion over the kept timesteps of `base_betas`, with matching marginals.

    Args:
        base_betas: (T,) training schedule.
        use_timesteps: original timesteps to keep (any order, duplicates ignored).
        prediction_type: the network's regression target.
        learn_sigma: whether the network outputs variance values.
        input_scale: b of the input scaling (the data range [-b, b]).

    Returns:
        A `GaussianDiffusion` with len(use_timesteps) steps whose `timestep_map` holds the kept
        original timesteps in ascending order.
    """
    base_betas = np.asarray(base_betas, dtype=np.float64)
    kept = sorted({int(t) for t in use_timesteps})
    if not kept or kept[0] < 0 or kept[-1] >= base_betas.shape[0]:
        raise ValueError(f"use_timesteps must lie in [0, {base_betas.shape[0] - 1}]")
    alphas_cumprod = np.cumprod(1.0 - base_betas)
    new_betas = []
    last_alpha_cumprod = 1.0
    for t in kept:
        new_betas.append(1.0 - alphas_cumprod[t] / last_alpha_cumprod)
        last_alpha_cumprod = alphas_cumprod[t]
    logger.debug("respaced %d training steps to %d", base_betas.shape[0], len(kept))
    return GaussianDiffusion(
        np.array(new_betas),
        prediction_type=prediction_type,
        learn_sigma=learn_sigma,
        timestep_map=np.array(kept, dtype=np.int64),
        input_scale=input_scale,
    )
