"""The Probabilistic U-Net baseline (Kohl et al., "A Probabilistic U-Net for Segmentation of
Ambiguous Images", NeurIPS 2018), written here by hand because no well-kept library ships it.

A deterministic U-Net computes image features; a prior net p(z | image) and a posterior net
q(z | image, mask) give axis-aligned Gaussians over a global latent z (dimension 6). z is broadcast
over the last feature map, concatenated to it, and three 1x1 convolutions map the stack to logits.
Training minimises the negative ELBO, cross-entropy summed over pixels + beta·KL(q ‖ p), with one
valid rater drawn per image and step (the same rule as CIMD's target); sampling draws z from the
prior, one forward pass per sample.

Differences from the original, kept on purpose so that the baselines share code with CIMD: the
prior and posterior nets are CIMD's `GaussianEncoder` (one 3x3 convolution per level instead of
three; same filters, average pooling and log-sigma head), and the mask enters the posterior in
[-1, 1] like CIMD's x_0.

The model follows the contract of `cimd_pipeline.models.cimd.CIMD`: ``losses`` draws every random
number from the given generator (resume stays exact) and ``sample`` returns soft masks in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution

from cimd_pipeline.config import ModelParams, SamplingParams
from cimd_pipeline.diffusion.noise import Generator
from cimd_pipeline.models import draws
from cimd_pipeline.models.ambiguity import GaussianEncoder, kl_divergence
from cimd_pipeline.models.cimd import pick_raters

__all__ = ["ProbUNet", "UNetFeatures", "chosen_rater", "gaussian_draw", "soft_mask"]


def chosen_rater(masks: Tensor, valid: Tensor, generator: torch.Generator | None) -> Tensor:
    """One uniformly drawn valid rater's mask per case: float (B, 1, H, W) in {0, 1}."""
    index = pick_raters(valid, generator)
    return masks[torch.arange(len(masks), device=masks.device), index].float()[:, None]


def gaussian_draw(mean: Tensor, std: Tensor, generator: Generator) -> Tensor:
    """``mean + std * eps`` with eps from ``generator`` (differentiable in mean and std)."""
    eps = draws.randn(mean.shape, generator, mean.device, mean.dtype)
    return mean + std * eps


def soft_mask(logits: Tensor) -> Tensor:
    """Foreground probabilities mapped to [-1, 1], so that thresholding at 0 is p > 0.5."""
    return 2.0 * torch.sigmoid(logits.float()) - 1.0


def conv_block(in_channels: int, out_channels: int, num_convs: int) -> nn.Sequential:
    """``num_convs`` times a 3x3 convolution and a ReLU (the original's block, no normalisation)."""
    layers: list[nn.Module] = []
    for i in range(num_convs):
        layers += [nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


class UNetFeatures(nn.Module):
    """U-Net returning its last feature map (N, filters[0], H, W) for images (N, C, H, W).

    Levels are separated by 2x2 average pooling on the way down and bilinear up-sampling followed
    by concatenation with the skip connection on the way up; H and W must be divisible by
    ``2 ** (len(filters) - 1)``.
    """

    def __init__(self, in_channels: int, filters: Sequence[int], num_convs: int) -> None:
        super().__init__()
        filters = tuple(filters)
        self.down = nn.ModuleList(
            conv_block(in_channels if i == 0 else filters[i - 1], f, num_convs) for i, f in enumerate(filters)
        )
        self.up = nn.ModuleList(
            conv_block(filters[i + 1] + filters[i], filters[i], num_convs) for i in reversed(range(len(filters) - 1))
        )

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.avg_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return x


class ProbUNet(nn.Module):
    """U-Net + prior/posterior Gaussian encoders + the 1x1 "f_comb" head.

    Args:
        params: validated ``model`` block; ``params.baselines`` holds the sizes and beta.
        image_channels: channels C of the images.
    """

    def __init__(self, params: ModelParams, image_channels: int) -> None:
        super().__init__()
        b = params.baselines
        self.beta = b.beta
        self.unet = UNetFeatures(image_channels, b.filters, b.num_convs)
        self.prior = GaussianEncoder(image_channels, b.latent_dim, b.filters)
        self.posterior = GaussianEncoder(image_channels + 1, b.latent_dim, b.filters)
        width = b.filters[0]
        self.combine = nn.Sequential(
            nn.Conv2d(width + b.latent_dim, width, 1),
            nn.ReLU(),
            nn.Conv2d(width, width, 1),
            nn.ReLU(),
            nn.Conv2d(width, 1, 1),
        )

    def logits(self, features: Tensor, z: Tensor) -> Tensor:
        """Logits (N, 1, H, W) from U-Net features (N, F, H, W) and latents z (N, k)."""
        tiled = z[:, :, None, None].expand(-1, -1, *features.shape[-2:]).to(features.dtype)
        return self.combine(torch.cat([features, tiled], dim=1))

    def latent(self, dist: Distribution, generator: torch.Generator | None) -> Tensor:
        """A reparameterised draw (N, k) from a diagonal Gaussian encoder output."""
        return gaussian_draw(dist.mean, dist.stddev, generator)

    def losses(
        self, image: Tensor, masks: Tensor, valid: Tensor, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Batch means of ``loss`` = ``bce`` + beta·``kl``; ``bce`` is summed over pixels per image.

        Arguments as in `cimd_pipeline.models.contract.Segmenter.losses`.
        """
        target = chosen_rater(masks, valid, generator)
        posterior = self.posterior(torch.cat([image, 2.0 * target - 1.0], dim=1))
        prior = self.prior(image)
        logits = self.logits(self.unet(image), self.latent(posterior, generator))
        bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").sum((1, 2, 3))
        kl = kl_divergence(posterior, prior).float()
        loss = bce + self.beta * kl
        return {"loss": loss.mean(), "bce": bce.mean(), "kl": kl.mean()}

    @torch.no_grad()
    def sample(self, image: Tensor, params: SamplingParams, generator: Generator = None) -> Tensor:
        """One soft mask (B, 1, H, W) in [-1, 1] per image row, z drawn from the prior.

        ``params`` is accepted for the common interface; steps and method do not apply.
        """
        z = self.latent(self.prior(image), generator)
        return soft_mask(self.logits(self.unet(image), z))
