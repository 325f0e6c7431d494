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
- ``ddpm_prob``: one random valid rater per image per step, no encoders;
- ``cimd_latent`` (our extension, not in the paper; docs/ambiguity_nets.md): the latent z conditions
  the denoiser as ``latent_dim`` constant extra input channels (or, with
  ``ambiguity_nets.latent_conditioning: every_level``, through the timestep embedding). In
  training z is drawn from the AMN posterior q(z | image, x_0), the ACN is a prior p(z | image)
  that sees the image only, and the loss adds beta·KL(AMN ‖ ACN); at sampling each sample draws
  its own z from that prior, so prior sampling needs nothing the chain has not made yet. With
  ``ambiguity_nets.prior_components`` > 1 the prior is a mixture of that many Gaussians and the
  KL its one-draw Monte Carlo estimate at the posterior's z
  (`cimd_pipeline.models.ambiguity.kl_estimate`). ``ambiguity_nets.free_nats`` > 0 leaves the
  posterior free of the KL below that many nats (`free_bits_kl`).

The diffusion recipe (``model.noise_schedule``, ``input_scale``, ``loss_weighting``,
``output_activation``, ``self_condition``; docs/quality.md) applies to every variant. With input
scale b the process runs on b·x_0; an x0-predicting network still outputs masks in [-1, 1] (through
tanh if asked), which are multiplied by b before the diffusion maths, and samples are divided by b.
Self-conditioning (Chen et al. 2023, Analog Bits) feeds the previous x̂_0 (mask units) as an extra
denoiser channel: zeros, or in half the training steps the estimate of a first no-grad pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from cimd_pipeline.config import ModelParams, SamplingParams, Variant
from cimd_pipeline.diffusion import (
    GaussianDiffusion,
    PredictionType,
    make_betas,
    respaced_diffusion,
    sample,
    space_timesteps,
)
from cimd_pipeline.diffusion.noise import Generator
from cimd_pipeline.models import draws
from cimd_pipeline.models.ambiguity import (
    Covariance,
    GaussianEncoder,
    draw,
    free_bits_kl,
    kl_divergence,
    kl_estimate,
)
from cimd_pipeline.models.denoiser import ConditionalDenoiser


def pick_raters(valid: Tensor, generator: torch.Generator | None) -> Tensor:
    """Index (B,) of one uniformly drawn valid rater per case, from bool ``valid`` (B, R)."""
    return draws.pick_uniform(valid, generator)


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
        self.latent = params.variant is Variant.CIMD_LATENT
        # z as constant input channels, or added to the timestep embedding of every level
        self.latent_embedded = self.latent and params.ambiguity_nets.latent_conditioning == "every_level"
        latent_channels = params.latent_dim if self.latent and not self.latent_embedded else 0
        self.denoiser = ConditionalDenoiser(
            params.unet, image_channels, mask_channels=1, learn_sigma=True,
            extra_channels=(1 if params.self_condition else 0) + latent_channels,
            embedding_dim=params.latent_dim if self.latent_embedded else 0,
        )
        self.diffusion = GaussianDiffusion(
            make_betas(params.noise_schedule, params.num_timesteps, params.beta_start, params.beta_end),
            prediction_type=params.prediction_type,
            learn_sigma=True,
            input_scale=params.input_scale,
            loss_weighting=params.loss_weighting,
            min_snr_gamma=params.min_snr_gamma,
        )
        self.amn: GaussianEncoder | None = None
        self.acn: GaussianEncoder | None = None
        if self.variant.uses_ambiguity_nets:
            covariance = Covariance.FULL if self.variant is Variant.CIMD_FC else Covariance.DIAGONAL
            nets = params.ambiguity_nets
            self.amn = GaussianEncoder(image_channels + 1, params.latent_dim, nets.filters, covariance)
            prior_channels = image_channels if self.latent else image_channels + 1
            self.acn = GaussianEncoder(
                prior_channels, params.latent_dim, nets.filters, covariance, nets.prior_components
            )
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
        scaled = x0 * self.params.input_scale
        t = draws.randint(self.diffusion.num_timesteps, (len(x0),), generator, x0.device)
        noise = draws.randn(x0.shape, generator, x0.device)
        x_t = self.diffusion.q_sample(scaled, t, noise)
        z = kl = None
        if self.latent:
            posterior = self.amn(torch.cat([image, x0], dim=1))
            z = draw(posterior, generator)
            prior, free_nats = self.acn(image), self.params.ambiguity_nets.free_nats
            if free_nats > 0:
                kl = free_bits_kl(posterior, prior, z, free_nats)
            else:
                kl = kl_estimate(posterior, prior, z)
        condition = self._training_condition(x_t, image, t, generator, z)
        out = self.model_output(x_t, image, t, condition, z)
        terms = self.diffusion.training_losses(out, scaled, x_t, t, noise, self.params.vlb_weight)
        loss = terms["loss"]
        if kl is not None:
            loss = loss + self.params.kl_weight * kl
        elif self.amn is not None and self.acn is not None:
            pred_x0 = terms["pred_x0"]
            if self.params.ambiguity_nets.acn_input == "eps":
                acn_view = self.diffusion.predict_eps_from_x0(x_t, t, pred_x0)
            else:
                acn_view = pred_x0 / self.params.input_scale
            posterior = self.amn(torch.cat([image, x0], dim=1))
            prior = self.acn(torch.cat([image, acn_view], dim=1))
            kl = kl_divergence(posterior, prior)
            loss = loss + self.params.kl_weight * kl
        else:
            kl = torch.zeros_like(loss)
        return {"loss": loss.mean(), "mse": terms["mse"].mean(), "vlb": terms["vlb"].mean(), "kl": kl.mean()}

    def model_output(
        self, x_t: Tensor, image: Tensor, t: Tensor, condition: Tensor | None, z: Tensor | None = None
    ) -> Tensor:
        """Denoiser output (N, 2, H, W) in the diffusion's units: an x0 prediction goes through the
        output activation and is scaled by b. ``condition`` (N, 1, H, W) is the self-conditioning
        channel, ``z`` (N, latent_dim) the ``cimd_latent`` code, broadcast over H and W or, with
        ``latent_conditioning: every_level``, added to the timestep embedding."""
        extra = [condition] if self.params.self_condition else []
        if z is not None and not self.latent_embedded:
            extra.append(z[:, :, None, None].expand(-1, -1, *x_t.shape[-2:]).to(x_t.dtype))
        inputs = (x_t, image, t, torch.cat(extra, dim=1) if extra else None)
        out = self.denoiser(*inputs, *((z,) if self.latent_embedded else ())).float()
        p = self.params
        if p.prediction_type is PredictionType.X0 and (p.output_activation == "tanh" or p.input_scale != 1.0):
            prediction, var_values = out[:, :1], out[:, 1:]
            if p.output_activation == "tanh":
                prediction = torch.tanh(prediction)
            out = torch.cat([prediction * p.input_scale, var_values], dim=1)
        return out

    def x0_estimate(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Clipped clean-mask estimate in mask units [-1, 1] from ``model_output`` at ORIGINAL ``t``.

        Respacing keeps alpha-bar at the kept steps, so the full schedule's tables serve any
        respaced sampler that passes original timesteps.
        """
        prediction, _ = self.diffusion.split_output(out)
        b = self.params.input_scale
        return self.diffusion.predict_x0(x_t, t, prediction).clamp(-b, b) / b

    def _training_condition(
        self, x_t: Tensor, image: Tensor, t: Tensor, generator: torch.Generator | None, z: Tensor | None
    ) -> Tensor | None:
        """Self-conditioning input: zeros, or (half the steps) a first pass's detached x̂_0.

        The coin (one per step, from the training generator) stays on the device like every other
        draw of the step: reading it on the host to skip the first pass would stall a GPU's queue
        once per step. The first pass is therefore run every step and the coin selects; the
        values are those of a skipped pass (zeros) or of the pass itself, exactly.
        """
        if not self.params.self_condition:
            return None
        zeros = torch.zeros_like(x_t)
        heads = torch.rand((1,), generator=generator, device=x_t.device) < 0.5
        with torch.no_grad():
            first = self.model_output(x_t, image, t, zeros, None if z is None else z.detach())
            estimate = self.x0_estimate(first, x_t, t)
        return torch.where(heads.view(1, 1, 1, 1), estimate, zeros)

    def sampler_diffusion(self, steps: int) -> GaussianDiffusion:
        """The schedule respaced to ``steps`` (Improved-DDPM respacing; the full one for T steps)."""
        if steps == self.diffusion.num_timesteps:
            return self.diffusion
        return respaced_diffusion(
            self.diffusion.betas,
            space_timesteps(self.diffusion.num_timesteps, steps),
            prediction_type=self.diffusion.prediction_type,
            learn_sigma=True,
            input_scale=self.diffusion.input_scale,
        )

    @torch.no_grad()
    def sample(self, image: Tensor, params: SamplingParams, generator: Generator = None) -> Tensor:
        """Soft masks (B, 1, H, W) in [-1, 1] for images (B, C, H, W); threshold at 0 for binary.

        ``ddpm`` is ancestral sampling with the learned variance, ``ddim`` the deterministic
        (eta = 0) or stochastic DDIM update; both on the respaced schedule of ``params.steps``.
        """
        b, _, h, w = image.shape
        z = draw(self.acn(image), generator) if self.latent else None
        with self._cpu_channels_last(image.device):
            x, _ = sample(
                self.model_fn(image, z),
                self.sampler_diffusion(params.steps),
                (b, 1, h, w),
                method=params.method,
                eta=params.eta,
                generator=generator,
                device=image.device,
            )
        return x / self.diffusion.input_scale

    #: On a CPU, sample with the denoiser's convolution weights in channels_last order: oneDNN's
    #: convolutions then keep every activation channels-last, 1.25x more masks per CPU-second at
    #: 64x64 on one thread (benchmarks/sampling_speed.py, docs/lidc.md). False: the plain layout.
    channels_last_on_cpu = True

    @contextmanager
    def _cpu_channels_last(self, device: torch.device) -> Iterator[None]:
        """The denoiser's 4-D weights in channels_last while sampling on the CPU, put back after
        (training, checkpoints and other devices never see the switch)."""
        if device.type != "cpu" or not self.channels_last_on_cpu:
            yield
            return
        self.denoiser.to(memory_format=torch.channels_last)
        try:
            yield
        finally:
            self.denoiser.to(memory_format=torch.contiguous_format)

    def model_fn(self, image: Tensor, z: Tensor | None = None):
        """The sampler's ``(x_t, t_original) -> model_out`` closure for a fixed image batch (and,
        for ``cimd_latent``, its fixed latent codes ``z`` (N, latent_dim)).

        With self-conditioning the closure keeps the previous step's x̂_0 (zeros before the first
        step), so one closure serves exactly one reverse chain.
        """
        previous: Tensor | None = None

        def call(x_t: Tensor, t: Tensor) -> Tensor:
            nonlocal previous
            condition = None
            if self.params.self_condition:
                condition = torch.zeros_like(x_t) if previous is None else previous
            out = self.model_output(x_t, image, t, condition, z)
            if self.params.self_condition:
                previous = self.x0_estimate(out, x_t, t)
            return out

        return call

