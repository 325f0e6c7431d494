"""The PHiSeg baseline (Baumgartner et al., "PHiSeg: Capturing Uncertainty in Medical Image
Segmentation", MICCAI 2019), written here by hand after the authors' TensorFlow code
(baumgach/PHiSeg-code, ``phiseg_7_5``) because no well-kept library ships it.

The image is seen at R resolution levels (2x2 average pooling between them); the coarsest L levels
carry a spatial Gaussian latent z_l with ``phiseg_latent_dim`` channels (l = 0 is the finest latent
level, l = L-1 the coarsest, at 2^-(l+R-L) of the image size):

- posterior q(z | image, mask) and prior p(z | image) are two `LatentHierarchy` nets. z_{L-1}
  comes from the features alone; every finer z_l from the features concatenated with z_{l+1}
  up-sampled (bilinear, then two convolutions), so z_l depends on z_{l+1}. While training, the
  prior is conditioned on the posterior's draws, as in the original; at sampling time on its own.
- the likelihood p(mask | z) (`Likelihood`) lifts every z_l to level l, merges them top-down and
  predicts logits s_l per level, nearest-up-sampled to full size; the prediction is sum_l s_l.

Loss (the original's): sum_l 4^l·KL(q_l ‖ p_l) (times ``beta``) + cross-entropy of the prediction
+ ``phiseg_aux_weight`` × the cross-entropies of the partial sums sum_{j>=l} s_j for l >= 1 (the
"residual multinoulli loss": every coarser level must explain the mask on its own); cross-entropy
and KL are summed over pixels per image, which keeps them on the ELBO's scale. Every 3x3
convolution is followed by batch normalisation and a ReLU, as in the original. One valid rater is
drawn per image and step, like every other variant here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Independent, Normal

from cimd_pipeline.config import ModelParams, SamplingParams
from cimd_pipeline.diffusion.noise import Generator
from cimd_pipeline.models.ambiguity import kl_divergence
from cimd_pipeline.models.batch_norm import GlobalBatchNorm2d
from cimd_pipeline.models.prob_unet import chosen_rater, gaussian_draw, soft_mask

__all__ = ["LatentHierarchy", "Likelihood", "PHiSeg", "level_kl"]

# Floor on the softplus scale of the latents, so that the KL never divides by zero.
_MIN_SCALE = 1e-5


def conv_bn(in_channels: int, out_channels: int, num_convs: int) -> nn.Sequential:
    """``num_convs`` times 3x3 convolution, batch normalisation, ReLU.

    The batch norm normalises over the global batch when several processes train
    (`cimd_pipeline.models.batch_norm`), so data-parallel training follows the one-process run.
    """
    layers: list[nn.Module] = []
    for i in range(num_convs):
        layers += [
            nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=False),
            GlobalBatchNorm2d(out_channels),
            nn.ReLU(),
        ]
    return nn.Sequential(*layers)


def _up(x: Tensor, size: Sequence[int], mode: str = "bilinear") -> Tensor:
    if mode == "nearest":
        return F.interpolate(x, size=tuple(size), mode="nearest")
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


def level_kl(mu_q: Tensor, sigma_q: Tensor, mu_p: Tensor, sigma_p: Tensor) -> Tensor:
    """KL(q ‖ p) per image (B,) of two diagonal Gaussians over a latent map (B, c, h, w)."""

    def gaussian(mu: Tensor, sigma: Tensor) -> Independent:
        return Independent(Normal(mu.flatten(1), sigma.flatten(1), validate_args=False), 1, validate_args=False)

    return kl_divergence(gaussian(mu_q, sigma_q), gaussian(mu_p, sigma_p))


class LatentHierarchy(nn.Module):
    """Prior or posterior net: Gaussians (mu, sigma) of shape (N, latent_dim, h_l, w_l) per level.

    Args:
        in_channels: image channels (prior) or image + mask channels (posterior).
        channels: convolution channels per resolution level (R entries, finest first).
        levels: latent levels L <= R.
        latent_dim: channels of each z_l.
        num_convs: 3x3 convolutions per resolution level.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], levels: int, latent_dim: int, num_convs: int) -> None:
        super().__init__()
        self.levels, self.offset = levels, len(channels) - levels
        lifted = latent_dim * channels[0]  # the original's zdim0 * n0 channels for up-sampled z
        self.features = nn.ModuleList(
            conv_bn(in_channels if r == 0 else channels[r - 1], c, num_convs) for r, c in enumerate(channels)
        )
        own = [channels[i + self.offset] for i in range(levels)]
        self.lift = nn.ModuleList(conv_bn(latent_dim, lifted, 2) for _ in range(levels - 1))
        self.merge = nn.ModuleList(conv_bn(own[i] + lifted, own[i], 2) for i in range(levels - 1))
        self.mu = nn.ModuleList(nn.Conv2d(c, latent_dim, 1) for c in own)
        self.sigma = nn.ModuleList(nn.Conv2d(c, latent_dim, 1) for c in own)

    def forward(
        self, x: Tensor, generator: torch.Generator | None, given: list[Tensor] | None = None
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """``(z, mu, sigma)`` lists, finest level first.

        With ``given`` (the posterior's draws) every level is conditioned on those and returned
        as z, without drawing; otherwise each z_l is drawn from ``generator`` coarsest first.
        """
        features = []
        for r, block in enumerate(self.features):
            x = block(x if r == 0 else F.avg_pool2d(x, 2))
            features.append(x)
        z: list[Tensor] = []
        mu: list[Tensor] = []
        sigma: list[Tensor] = []
        for i in reversed(range(self.levels)):  # coarsest first; lists are reversed at the end
            h = features[i + self.offset]
            if z:
                coarser = given[i + 1] if given is not None else z[-1]
                h = self.merge[i](torch.cat([h, self.lift[i](_up(coarser, h.shape[-2:]))], dim=1))
            mu.append(self.mu[i](h))
            sigma.append(F.softplus(self.sigma[i](h)) + _MIN_SCALE)
            z.append(given[i] if given is not None else gaussian_draw(mu[-1], sigma[-1], generator))
        z.reverse()
        mu.reverse()
        sigma.reverse()
        return z, mu, sigma


class Likelihood(nn.Module):
    """p(mask | z): logits (N, 1, H, W) per latent level, finest first, from the z_l maps.

    Args:
        channels: convolution channels per resolution level (R entries, finest first).
        levels: latent levels L.
        latent_dim: channels of each z_l.
    """

    def __init__(self, channels: Sequence[int], levels: int, latent_dim: int) -> None:
        super().__init__()
        self.levels, self.offset = levels, len(channels) - levels
        self.embed = nn.ModuleList(conv_bn(latent_dim, channels[i], 2) for i in range(levels))
        # the original's "increase_resolution": offset times (bilinear x2, one convolution)
        self.upsample = nn.ModuleList(
            nn.ModuleList(conv_bn(channels[i], channels[i], 1) for _ in range(self.offset)) for i in range(levels)
        )
        # channels of the merged context per level: the coarsest keeps its own, the others combine
        merged = [channels[i + self.offset] for i in range(levels - 1)] + [channels[levels - 1]]
        self.from_coarser = nn.ModuleList(conv_bn(merged[i + 1], channels[i], 1) for i in range(levels - 1))
        self.combine = nn.ModuleList(conv_bn(2 * channels[i], merged[i], 2) for i in range(levels - 1))
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in merged)

    def forward(self, z: list[Tensor], size: Sequence[int]) -> list[Tensor]:
        """Per-level logits at ``size`` for latents ``z`` (finest first); their sum is the prediction."""
        lifted = []
        for i in range(self.levels):
            h = self.embed[i](z[i])
            for block in self.upsample[i]:
                h = block(_up(h, (2 * h.shape[-2], 2 * h.shape[-1])))
            lifted.append(h)
        context: list[Tensor] = list(lifted)
        for i in reversed(range(self.levels - 1)):
            coarser = self.from_coarser[i](_up(context[i + 1], lifted[i].shape[-2:]))
            context[i] = self.combine[i](torch.cat([lifted[i], coarser], dim=1))
        return [_up(head(c), size, mode="nearest") for head, c in zip(self.heads, context)]


class PHiSeg(nn.Module):
    """Posterior, prior and likelihood nets of PHiSeg.

    Args:
        params: validated ``model`` block; ``params.baselines`` holds the sizes and weights.
        image_channels: channels C of the images.
    """

    def __init__(self, params: ModelParams, image_channels: int) -> None:
        super().__init__()
        b = params.baselines
        self.beta, self.aux_weight, self.levels = b.beta, b.phiseg_aux_weight, b.phiseg_levels
        channels = [b.filters[min(r, len(b.filters) - 1)] for r in range(b.phiseg_resolution_levels)]
        args = (channels, b.phiseg_levels, b.phiseg_latent_dim, b.num_convs)
        self.posterior = LatentHierarchy(image_channels + 1, *args)
        self.prior = LatentHierarchy(image_channels, *args)
        self.likelihood = Likelihood(channels, b.phiseg_levels, b.phiseg_latent_dim)

    def losses(
        self, image: Tensor, masks: Tensor, valid: Tensor, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Batch means of ``loss`` = ``bce`` + aux_weight·``aux`` + beta·``kl`` (each summed per image).

        Arguments as in `cimd_pipeline.models.contract.Segmenter.losses`.
        """
        target = chosen_rater(masks, valid, generator)
        z, mu_q, sigma_q = self.posterior(torch.cat([image, 2.0 * target - 1.0], dim=1), generator)
        _, mu_p, sigma_p = self.prior(image, generator, given=z)
        # in float32: under bf16 autocast the level sums would lose the small KL differences
        gaussians = [[t.float() for t in level] for level in zip(mu_q, sigma_q, mu_p, sigma_p)]
        kl = sum(4.0**i * level_kl(*level) for i, level in enumerate(gaussians))
        partial, terms = 0.0, []
        for logits in reversed(self.likelihood(z, image.shape[-2:])):
            partial = partial + logits.float()
            terms.append(F.binary_cross_entropy_with_logits(partial, target, reduction="none").sum((1, 2, 3)))
        bce = terms[-1]
        aux = sum(terms[:-1], torch.zeros_like(bce))
        loss = bce + self.aux_weight * aux + self.beta * kl
        return {"loss": loss.mean(), "bce": bce.mean(), "aux": aux.mean(), "kl": kl.mean()}

    @torch.no_grad()
    def sample(self, image: Tensor, params: SamplingParams, generator: Generator = None) -> Tensor:
        """One soft mask (B, 1, H, W) in [-1, 1] per image row, z drawn down the prior hierarchy.

        ``params`` is accepted for the common interface; steps and method do not apply.
        """
        z, _, _ = self.prior(image, generator)
        return soft_mask(sum(self.likelihood(z, image.shape[-2:])))
