"""Gaussian diffusion over segmentation masks in [-1, 1] (Improved DDPM maths).

CIMD trains a conditional denoiser with the hybrid objective of Nichol & Dhariwal (2021):
`L_simple` on the network's prediction plus a small, stop-gradient `L_vlb` that teaches the
learned-range variance. This module holds the closed forms of the forward process, the
posterior q(x_{t-1} | x_t, x_0), the conversions between prediction targets, and that loss.
The network itself is kept out: everything takes its raw output (N, 2C, H, W) or (N, C, H, W).

All tables are float64 numpy arrays, looked up per sample with `extract` and cast to float32
on the data's device, so a respaced schedule with very few steps keeps its precision.
"""

from __future__ import annotations

import enum
import math

import numpy as np
import torch

from cimd_pipeline.diffusion.losses import (
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from cimd_pipeline.diffusion.weighting import LossWeighting, weighting_problems, x0_loss_weights


class NoiseSchedule(str, enum.Enum):
    """How the betas rise: DDPM's linear ramp or the cosine alpha-bar of Nichol & Dhariwal (2021)."""

    LINEAR = "linear"
    COSINE = "cosine"


class PredictionType(str, enum.Enum):
    """What the network regresses: the noise, the clean mask, or the velocity."""

    EPS = "eps"
    X0 = "x0"
    V = "v"


def linear_betas(num_timesteps: int = 1000, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    """Linear beta schedule of DDPM as float64 (T,).

    `start`/`end` are scaled by 1000 / T, as in improved-diffusion, so that a schedule with a
    different T still destroys the signal by the final step.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * start, scale * end, num_timesteps, dtype=np.float64)


#: Offset s of the cosine schedule, so that beta_0 is not vanishingly small (Nichol & Dhariwal).
_COSINE_OFFSET = 0.008
#: Largest cosine beta: the schedule's last steps would otherwise reach beta = 1 (alpha-bar = 0).
_COSINE_MAX_BETA = 0.999


def cosine_betas(num_timesteps: int = 1000) -> np.ndarray:
    """Cosine schedule of Improved DDPM as float64 (T,), betas clipped at 0.999.

    alpha-bar(t) = f(t) / f(0) with f(t) = cos((t / T + s) / (1 + s) * pi / 2)^2, s = 0.008, and
    beta_t = 1 - alpha-bar(t + 1) / alpha-bar(t) (Nichol & Dhariwal 2021, eq. 17).
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + _COSINE_OFFSET) / (1.0 + _COSINE_OFFSET) * math.pi / 2.0) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], _COSINE_MAX_BETA)


def make_betas(
    schedule: NoiseSchedule | str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """The (T,) betas of ``schedule``: the one function training, sampling and checks all use.

    ``beta_start``/``beta_end`` shape the linear ramp only; the cosine schedule has no free ends.
    """
    if NoiseSchedule(schedule) is NoiseSchedule.COSINE:
        return cosine_betas(num_timesteps)
    return linear_betas(num_timesteps, beta_start, beta_end)


def schedule_problems(
    schedule: NoiseSchedule | str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> list[str]:
    """Why `make_betas(schedule, ...)` cannot train or sample (empty list: it can).

    The betas must grow with t and stay below 1: a beta of 1 makes abar_T = 0, so
    x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) divides by zero and every sample is NaN; a
    beta above 1 has no square root. The linear ramp's ends are scaled by 1000 / T, so the
    default beta_end 0.02 reaches 1 at T = 20.
    """
    if num_timesteps < 2:
        return [f"num_timesteps={num_timesteps}: a schedule needs at least 2 steps"]
    name = NoiseSchedule(schedule).value
    betas = make_betas(schedule, num_timesteps, beta_start, beta_end)
    problems = []
    if np.any(np.diff(betas) < 0) or betas[-1] <= betas[0]:
        ends = f" (beta_start={beta_start}, beta_end={beta_end})" if name == "linear" else ""
        problems.append(f"the {name} schedule must increase with t{ends}")
    if betas.min() <= 0 or betas.max() >= 1:
        hint = (
            f"; use more steps or beta_end below {num_timesteps / 1000:.4g} (ends are scaled by 1000/T)"
            if name == "linear" and betas.max() >= 1 else ""
        )
        problems.append(
            f"the {name} schedule over {num_timesteps} steps runs from beta={betas[0]:.4g} to "
            f"beta={betas[-1]:.4g}; every beta must lie in (0, 1){hint}"
        )
    return problems


def extract(table: np.ndarray | torch.Tensor, t: torch.Tensor, shape) -> torch.Tensor:
    """Look up `table[t]` per sample and broadcast it to `shape`, e.g. (N, C, H, W).

    Args:
        table: (T,) per-timestep values.
        t: (N,) int64 timestep indices.
        shape: target shape whose first dimension is N.

    Returns:
        float32 tensor of `shape` on `t.device`, constant over all non-batch dimensions.

    The float64 table is rounded to float32 on the CPU and only then moved to `t.device`: MPS
    has no float64 (and `training.device: auto` picks MPS on Apple silicon). Rounding before or
    after the lookup gives the same values.
    """
    values = torch.as_tensor(table).to(torch.float32).to(t.device)[t]
    return values.reshape(-1, *([1] * (len(shape) - 1))).expand(*shape)


class GaussianDiffusion:
    """Forward process, posterior, parameterisations and hybrid loss for one beta schedule.

    Attributes:
        num_timesteps: number of steps T of this (possibly respaced) schedule.
        timestep_map: int64 (T,) original training timestep for each internal index; the
            network must be fed `timestep_map[t]`, never `t`. Identity unless respaced.
        prediction_type: the network's regression target.
        learn_sigma: whether the network also outputs the variance interpolation value.
        input_scale: b of the input scaling (Chen 2023, "On the importance of noise scheduling"):
            the process runs on b * x0, so clean data lie in [-b, b]; x0 estimates are clipped
            there and the losses are reported in mask units (divided by b). 1 is plain DDPM.
        loss_weighting: `LossWeighting` of the regression term of `training_losses`.
        min_snr_gamma: gamma of ``min_snr`` (a clamp on the scaled signal's SNR, b^2 SNR(t)).
    """

    def __init__(
        self,
        betas: np.ndarray,
        prediction_type: PredictionType | str = PredictionType.EPS,
        learn_sigma: bool = True,
        timestep_map: np.ndarray | None = None,
        input_scale: float = 1.0,
        loss_weighting: LossWeighting | str = LossWeighting.SIMPLE,
        min_snr_gamma: float = 5.0,
    ) -> None:
        if not input_scale > 0:
            raise ValueError(f"input_scale must be positive, got {input_scale}")
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
        self.input_scale = float(input_scale)
        self.loss_weighting = LossWeighting(loss_weighting)
        self.min_snr_gamma = float(min_snr_gamma)
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 2:
            raise ValueError(f"betas must be 1-D with at least 2 entries, got {betas.shape}")
        if not np.all((betas > 0.0) & (betas < 1.0)):
            # beta = 1 gives abar = 0 from there on: predict_x0 divides by zero (NaN samples).
            raise ValueError(f"betas must lie in (0, 1), got range [{betas.min():.4g}, {betas.max():.4g}]")
        self.prediction_type = PredictionType(prediction_type)
        problems = weighting_problems(self.prediction_type, self.loss_weighting)
        if problems:
            raise ValueError(problems[0])
        self.learn_sigma = bool(learn_sigma)
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        if timestep_map is None:
            timestep_map = np.arange(self.num_timesteps)
        self.timestep_map = np.asarray(timestep_map, dtype=np.int64)
        if self.timestep_map.shape != (self.num_timesteps,):
            raise ValueError(
                f"timestep_map must have shape ({self.num_timesteps},), "
                f"got {self.timestep_map.shape}"
            )

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)

        one_minus_ac = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus_ac
        # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / one_minus_ac
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / one_minus_ac
        )
        # improved-diffusion's FIXED_LARGE variance, used when the variance is not learned.
        self.fixed_log_variance = np.log(np.append(self.posterior_variance[1], betas[1:]))
        self.log_betas = np.log(betas)

    # ----------------------------------------------------------------- forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I); all (N, C, H, W)."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
        )

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0), each (N, C, H, W)."""
        mean = (
            extract(self.posterior_mean_coef1, t, x_t.shape) * x0
            + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = extract(self.posterior_variance, t, x_t.shape)
        log_variance = extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # ----------------------------------------------------------------- parameterisations
    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Regression target of `L_simple` for the configured prediction type, (N, C, H, W)."""
        if self.prediction_type is PredictionType.EPS:
            return noise
        if self.prediction_type is PredictionType.X0:
            return x0
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.shape) * noise
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0
        )

    def predict_x0(
        self, x_t: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor
    ) -> torch.Tensor:
        """Clean-mask estimate from the network's prediction, differentiable and unclipped.

        CIMD's ambiguity control network consumes this estimate during training, so no
        detaching or clamping happens here.
        """
        if self.prediction_type is PredictionType.X0:
            return prediction
        if self.prediction_type is PredictionType.EPS:
            return (
                extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * prediction
            )
        # v = sqrt(abar) eps - sqrt(1 - abar) x0  =>  x0 = sqrt(abar) x_t - sqrt(1 - abar) v
        return (
            extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * prediction
        )

    def predict_eps_from_x0(
        self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor
    ) -> torch.Tensor:
        """Noise implied by a clean-mask estimate at x_t (used by DDIM), (N, C, H, W)."""
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0
        ) / extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def split_output(
        self, model_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split (N, 2C, H, W) into prediction and variance values; (N, C, H, W) -> (out, None)."""
        if not self.learn_sigma:
            return model_out, None
        if model_out.shape[1] % 2:
            raise ValueError(
                f"learn_sigma needs an even channel count, got {model_out.shape[1]} channels"
            )
        prediction, var_values = model_out.chunk(2, dim=1)
        return prediction, var_values

    def model_log_variance(
        self, var_values: torch.Tensor | None, t: torch.Tensor, shape
    ) -> torch.Tensor:
        """Log-variance of p(x_{t-1} | x_t), broadcast to `shape` (N, C, H, W).

        Learned: interpolate in log space between beta_t (v = 1) and the clipped posterior
        variance (v = -1). Not learned: improved-diffusion's FIXED_LARGE.
        """
        if var_values is None:
            return extract(self.fixed_log_variance, t, shape)
        frac = (var_values + 1.0) / 2.0
        max_log = extract(self.log_betas, t, shape)
        min_log = extract(self.posterior_log_variance_clipped, t, shape)
        return frac * max_log + (1.0 - frac) * min_log

    def p_mean_variance(
        self,
        model_out: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Parameters of p(x_{t-1} | x_t) from raw network output.

        Returns:
            dict with `mean`, `variance`, `log_variance`, `pred_x0`, each (N, C, H, W);
            `pred_x0` is clamped to [-b, b] (b = `input_scale`) when `clip_denoised` (sampling only).
        """
        prediction, var_values = self.split_output(model_out)
        log_variance = self.model_log_variance(var_values, t, x_t.shape)
        pred_x0 = self.predict_x0(x_t, t, prediction)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-self.input_scale, self.input_scale)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_x0": pred_x0,
        }

    # ----------------------------------------------------------------- training objective
    def vlb_terms(
        self, model_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample bound term L_t in bits, (N,): decoder NLL at t = 0, posterior KL after."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_out, x_t, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(
            x0, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model_out: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        vlb_weight: float = 0.001,
    ) -> dict[str, torch.Tensor]:
        """Hybrid loss L_simple + lambda * L_vlb of Improved DDPM, per sample.

        With ``loss_weighting="simple"`` the regression term is the MSE on the network's own target;
        an x0 target is compared in mask units (divided by `input_scale`), so b = 1 is today's
        L_simple for every target. Otherwise it is `x0_loss_weights` times the MSE of the
        clean-mask estimate in mask units (``mse`` reports that weighted term).

        L_vlb = sum_t L_t is estimated as T * L_t for the sampled t, so
        `loss = mse + vlb_weight * num_timesteps * vlb`; with lambda = 0.001 and T = 1000 this is
        exactly improved-diffusion's RESCALED_MSE (vb * T / 1000 added to the MSE). The
        prediction channels are detached inside the bound, so it only trains the variance.
        Without a learned variance the bound carries no gradient and is reported only.

        Args:
            model_out: (N, 2C, H, W) if `learn_sigma`, else (N, C, H, W).
            x0: (N, C, H, W) clean data, masks in [-1, 1] times `input_scale`.
            x_t: (N, C, H, W) `q_sample(x0, t, noise)`.
            t: (N,) int64 timesteps.
            noise: (N, C, H, W) noise used for x_t.
            vlb_weight: lambda of the hybrid loss.

        Returns:
            dict of (N,) tensors `loss`, `mse`, `vlb` (bits) and the differentiable,
            unclipped (N, C, H, W) `pred_x0`.
        """
        prediction, var_values = self.split_output(model_out)
        pred_x0 = self.predict_x0(x_t, t, prediction)
        if self.loss_weighting is LossWeighting.SIMPLE:
            mse = mean_flat((self.target(x0, noise, t) - prediction) ** 2)
            if self.prediction_type is PredictionType.X0:
                mse = mse / self.input_scale**2
        else:
            snr = extract(self.snr, t, t.shape)  # float32 made on the CPU, as every table
            x0_error = mean_flat((pred_x0 - x0) ** 2) / self.input_scale**2
            weights = x0_loss_weights(self.loss_weighting, snr, self.min_snr_gamma, self.input_scale)
            mse = weights * x0_error
        if var_values is None:
            vlb = self.vlb_terms(prediction.detach(), x0, x_t, t)
            loss = mse
        else:
            frozen = torch.cat([prediction.detach(), var_values], dim=1)
            vlb = self.vlb_terms(frozen, x0, x_t, t)
            loss = mse + vlb_weight * self.num_timesteps * vlb
        return {"loss": loss, "mse": mse, "vlb": vlb, "pred_x0": pred_x0}
