"""How the regression loss weighs timesteps: the SNR weights of the diffusion recipe.

Kept apart from the schedule so that the configuration can refuse a weighting that cannot train
with the chosen prediction target before any model is built.
"""

from __future__ import annotations

import enum

import torch


class LossWeighting(str, enum.Enum):
    """How the regression loss weighs timesteps (see `x0_loss_weights`).

    ``simple`` is L_simple: the unweighted MSE on the network's own target (eps, x0 or v).
    ``snr_plus_one`` and ``min_snr`` weigh the MSE of the clean-mask estimate x0_hat by
    1 + SNR(t) (Christensen et al. 2025's released configuration; equal to the v-MSE) and by
    min(SNR, gamma) (Min-SNR, Hang et al. 2023), whatever the network predicts.
    """

    SIMPLE = "simple"
    SNR_PLUS_ONE = "snr_plus_one"
    MIN_SNR = "min_snr"


def x0_loss_weights(
    weighting: LossWeighting | str, snr: torch.Tensor, gamma: float = 5.0, input_scale: float = 1.0
) -> torch.Tensor:
    """Per-sample weights of the clean-mask MSE (mask units) for ``snr_plus_one`` and ``min_snr``.

    With y0 = b x0 (b = ``input_scale``), x_t = sqrt(abar) y0 + sqrt(1 - abar) eps and the
    schedule's SNR = abar / (1 - abar), the MSEs of the three targets are multiples of the x0 MSE:
    |eps_hat - eps|^2 = SNR |y0_hat - y0|^2 = b^2 SNR |x0_hat - x0|^2 and
    |v_hat - v|^2 = (1 + SNR) |y0_hat - y0|^2.

    ``snr_plus_one`` returns 1 + SNR: the v-loss of the scaled process, divided by b^2 (at b = 1
    exactly the v-loss).

    ``min_snr`` returns min(b^2 SNR, gamma). Hang et al. (2023) clamp the SNR of the signal the
    network denoises, alpha_t^2 / sigma_t^2 for data at its own scale; input scaling by b shifts
    that log-SNR by 2 log b (Chen 2023, "On the importance of noise scheduling"; Christensen et
    al. 2025 use it to make the schedule harder), so the SNR of the scaled mask is b^2 SNR(t), and
    gamma keeps its meaning (the noise level below which a step earns no more weight) at any b.
    With gamma -> infinity this is the eps-MSE of the scaled process, in mask units of x0_hat.

    Args:
        weighting: ``snr_plus_one`` or ``min_snr``.
        snr: the schedule's SNR(t) per sample, any shape.
        gamma: the Min-SNR clamp.
        input_scale: b of the input scaling.
    """
    weighting = LossWeighting(weighting)
    if weighting is LossWeighting.SNR_PLUS_ONE:
        return 1.0 + snr
    if weighting is LossWeighting.MIN_SNR:
        return (input_scale**2 * snr).clamp(max=gamma)
    raise ValueError(f"{weighting.value!r} weighs the network's own target, not x0_hat: no x0 weights")


def weighting_problems(prediction_type: str, weighting: LossWeighting | str) -> list[str]:
    """Why ``weighting`` cannot train a network that predicts ``prediction_type`` (empty: it can).

    With eps prediction, x0_hat = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar), so the
    (1 + SNR)-weighted x0_hat MSE is (1 + 1/SNR) times the eps MSE: the noisiest steps weigh up to
    1/SNR(T) (about 4e8 on the cosine schedule over 1000 steps) and swamp the rest. The same
    weights on v or x0 prediction are the v-loss, the intended recipe.
    """
    if str(getattr(prediction_type, "value", prediction_type)) == "eps" and (
        LossWeighting(weighting) is LossWeighting.SNR_PLUS_ONE
    ):
        return [(
            "loss_weighting='snr_plus_one' with prediction_type='eps' weighs the eps-MSE by "
            "1 + 1/SNR(t), which explodes at the noisiest steps (about 4e8 on the cosine schedule); "
            "predict v or x0 (then it is the v-loss), or use loss_weighting 'simple' or 'min_snr'"
        )]
    return []
