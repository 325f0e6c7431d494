"""The CIMD segmenter: a conditional diffusion UNet trained with the AMN/ACN ambiguity loss.

Training (Rahman et al., CVPR 2023; supplementary C, Training details): a target mask x_0 in
[-1, 1] is noised to x_t and the UNet predicts its target (eps, x0 or v) and the learned variance,
giving the Improved-DDPM hybrid loss. The AMN encodes image ⊕ x_0 (posterior), the ACN encodes
image ⊕ x̂_0 predicted by the UNet (prior, differentiable), and beta·KL(AMN ‖ ACN) pulls the UNet's
predictions towards the raters' distribution. Sampling runs the reverse chain with independent
noise only: the encoders act in training (supplementary D, Qualitative Result Analysis: the model
"doesn't depend on latent variables from a prior model"). The four variants differ only in the
target mask and whether the encoders exist:

- ``cimd_aa`` / ``cimd_fc``: one random valid rater per image per step, diagonal / full Gaussians;
- ``ddpm_det``: the mean of the raters' masks, no encoders;
- ``ddpm_prob``: one random valid rater per image per step, no encoders.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cimd_pipeline.config import ModelParams, SamplingParams, Variant
from cimd_pipeline.diffusion import (
    GaussianDiffusion,
    linear_betas,
    respaced_diffusion,
    sample,
    space_timesteps,
)
from cimd_pipeline.models.ambiguity import Covariance, GaussianEncoder, kl_divergence
from cimd_pipeline.models.denoiser import ConditionalDenoiser, UNetConfig


def pick_raters(valid: Tensor, generator: torch.Generator | None) -> Tensor:
    """Index (B,) of one uniformly drawn valid rater per case, from bool ``valid`` (B, R)."""
    return torch.multinomial(valid.float(), 1, generator=generator).squeeze(1)


def target_masks(masks: Tensor, valid: Tensor, variant: Variant, generator: torch.Generator | None) -> Tensor:
    """The training target x_0 (B, 1, H, W) in [-1, 1] from rater masks (B, R, H, W) in {0, 1}.

    ``ddpm_det`` averages the valid raters (a soft target); every other variant draws one valid
    rater per case, so the same mask feeds the diffusion loss and the AMN.
    """
    masks = masks.float()
    if variant is Variant.DDPM_DET:
        weights = valid.float()
        mean = (masks * weights[:, :, None, None]).sum(1) / weights.sum(1).clamp_min(1)[:, None, None]
        return (2.0 * mean - 1.0)[:, None]
    chosen = masks[torch.arange(len(masks), device=masks.device), pick_raters(valid, generator)]
    return (2.0 * chosen - 1.0)[:, None]


class CIMD(nn.Module):
    """Denoiser plus (for the CIMD variants) the AMN and ACN encoders.

    Args:
        params: validated ``model`` parameter block.
        image_channels: channels C of the conditioning image.
    """

    def __init__(self, params: ModelParams, image_channels: int) -> None:
        super().__init__()
        self.params = params
        self.variant = params.variant
        unet = UNetConfig(**params.unet.model_dump())
        self.denoiser = ConditionalDenoiser(unet, image_channels, mask_channels=1, learn_sigma=True)
        self.diffusion = GaussianDiffusion(
            linear_betas(params.num_timesteps, params.beta_start, params.beta_end),
            prediction_type=params.prediction_type,
            learn_sigma=True,
        )
        self.amn: GaussianEncoder | None = None
        self.acn: GaussianEncoder | None = None
        if self.variant.uses_ambiguity_nets:
            covariance = Covariance.FULL if self.variant is Variant.CIMD_FC else Covariance.DIAGONAL
            nets = params.ambiguity_nets
            self.amn = GaussianEncoder(image_channels + 1, params.latent_dim, nets.filters, covariance)
            self.acn = GaussianEncoder(image_channels + 1, params.latent_dim, nets.filters, covariance)
            if not nets.trainable:
                # Reference-code behaviour: the encoders stay at their random initialisation, but
                # the KL still back-propagates through them into the UNet's prediction.
                for p in (*self.amn.parameters(), *self.acn.parameters()):
                    p.requires_grad_(False)

    def losses(
        self, image: Tensor, masks: Tensor, valid: Tensor, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Per-batch mean loss terms ``loss``, ``mse``, ``vlb``, ``kl`` (scalars).

        Arguments as in `cimd_pipeline.models.contract.Segmenter.losses`.
        """
        x0 = target_masks(masks, valid, self.variant, generator)
        t = torch.randint(0, self.diffusion.num_timesteps, (len(x0),), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        x_t = self.diffusion.q_sample(x0, t, noise)
        out = self.denoiser(x_t, image, t)
        terms = self.diffusion.training_losses(out.float(), x0, x_t, t, noise, self.params.vlb_weight)
        loss = terms["loss"]
        kl = torch.zeros_like(loss)
        if self.amn is not None and self.acn is not None:
            pred_x0 = terms["pred_x0"]
            if self.params.ambiguity_nets.acn_input == "eps":
                acn_view = self.diffusion.predict_eps_from_x0(x_t, t, pred_x0)
            else:
                acn_view = pred_x0
            posterior = self.amn(torch.cat([image, x0], dim=1))
            prior = self.acn(torch.cat([image, acn_view], dim=1))
            kl = kl_divergence(posterior, prior)
            loss = loss + self.params.kl_weight * kl
        return {"loss": loss.mean(), "mse": terms["mse"].mean(), "vlb": terms["vlb"].mean(), "kl": kl.mean()}

    def sampler_diffusion(self, steps: int) -> GaussianDiffusion:
        """The schedule respaced to ``steps`` (Improved-DDPM respacing; the full one for T steps)."""
        if steps == self.diffusion.num_timesteps:
            return self.diffusion
        return respaced_diffusion(
            self.diffusion.betas,
            space_timesteps(self.diffusion.num_timesteps, steps),
            prediction_type=self.diffusion.prediction_type,
            learn_sigma=True,
        )

    @torch.no_grad()
    def sample(self, image: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
        """Soft masks (B, 1, H, W) in [-1, 1] for images (B, C, H, W); threshold at 0 for binary.

        ``ddpm`` is ancestral sampling with the learned variance, ``ddim`` the deterministic
        (eta = 0) or stochastic DDIM update; both on the respaced schedule of ``params.steps``.
        """
        b, _, h, w = image.shape
        x, _ = sample(
            self.model_fn(image),
            self.sampler_diffusion(params.steps),
            (b, 1, h, w),
            method=params.method,
            eta=params.eta,
            generator=generator,
            device=image.device,
        )
        return x

    def model_fn(self, image: Tensor):
        """The sampler's ``(x_t, t_original) -> model_out`` closure for a fixed image batch."""

        def call(x_t: Tensor, t: Tensor) -> Tensor:
            return self.denoiser(x_t, image, t).float()

        return call
