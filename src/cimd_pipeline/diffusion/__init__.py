"""Improved-DDPM diffusion maths for CIMD: schedules, hybrid loss, respacing and samplers.

Pure PyTorch (no MONAI schedulers), so that respacing and the learned-range variance behave
exactly like openai/improved-diffusion, which the CIMD paper builds on.
"""

from cimd_pipeline.diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from cimd_pipeline.diffusion.respace import respaced_diffusion, space_timesteps
from cimd_pipeline.diffusion.samplers import ModelFn, ddim_step, ddpm_step, sample
from cimd_pipeline.diffusion.schedule import (
    GaussianDiffusion,
    NoiseSchedule,
    PredictionType,
    cosine_betas,
    extract,
    linear_betas,
    make_betas,
    schedule_problems,
)
from cimd_pipeline.diffusion.weighting import LossWeighting, weighting_problems, x0_loss_weights

__all__ = [
    "GaussianDiffusion",
    "LossWeighting",
    "ModelFn",
    "NoiseSchedule",
    "PredictionType",
    "approx_standard_normal_cdf",
    "cosine_betas",
    "ddim_step",
    "ddpm_step",
    "discretized_gaussian_log_likelihood",
    "extract",
    "linear_betas",
    "make_betas",
    "mean_flat",
    "normal_kl",
    "respaced_diffusion",
    "sample",
    "schedule_problems",
    "space_timesteps",
    "weighting_problems",
    "x0_loss_weights",
]
