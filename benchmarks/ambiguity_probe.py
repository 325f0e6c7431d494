"""How much do the AMN and ACN shape a trained CIMD model? KL, input sensitivity, gradient share.

The CIMD paper (Rahman et al., CVPR 2023) credits beta·KL(AMN ‖ ACN) with making the samples match the raters' distribution. In
CIMD the latent never enters the denoiser (samples come from the reverse chain alone, supplementary D),
so the KL is zero whenever both encoders return the same distribution whatever their inputs, and
nothing asks the AMN to encode the rater's mask. This script measures, on training cases of the
aligned set, for the model's own encoders and for the same UNet with encoders as initialised here
(1x1 head ~ N(0, 0.01²)) and at PyTorch's default initialisation (the public code's encoders are
never trained, so they stay there):

- ``kl``: mean KL(AMN ‖ ACN) per case;
- ``amn_spread``: standard deviation of the AMN mean across cases, in units of its own sigma
  (0: the posterior ignores its input);
- ``rater_shift``: mean |AMN mean of rater a - of rater b| for the same image, in sigma units
  (0: the posterior does not tell the raters apart);
- ``grad_share``: |grad of beta·KL| / |grad of the diffusion loss| over the UNet's weights on the
  same batch, noise and timesteps (beta = ``model.kl_weight`` of the trained model); 0 for
  ``cimd_latent``, whose KL does not depend on the UNet;
- ``amn_kl_fraction``: |grad of beta·KL| / (|grad of beta·KL| + |grad of the diffusion loss|) over
  the AMN's weights: 1 when only the KL trains the posterior (``cimd_aa``), near 0 when the KL
  barely restrains what the diffusion loss asks of it.
- ``z_flip`` (``cimd_latent`` only): share of the pixels of x̂₀ at t = T - 1 (x_t drawn from rater
  a's mask) whose sign changes when the denoiser gets rater b's posterior mean instead of rater
  a's, beside ``rater_disagreement``, the share of pixels on which the two raters' masks differ:
  a denoiser that turns z into the rater's mask flips about as many pixels as the raters differ on,
  one that ignores z flips none.

    python benchmarks/ambiguity_probe.py --model data/06_models/model.pt --cases 64
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch
from torch import nn

from _direct import add_data_arguments, aligned_data
from _kedro import ROOT, markdown_table
from cimd_pipeline.models.ambiguity import Covariance, GaussianEncoder
from cimd_pipeline.models.cimd import CIMD
from cimd_pipeline.models.trained import TrainedModel


def fresh_encoder(like: GaussianEncoder, net: CIMD, default_init: bool) -> GaussianEncoder:
    """A newly initialised encoder with ``like``'s inputs (the latent variant's ACN sees the image only)."""
    nets = net.params.ambiguity_nets
    encoder = GaussianEncoder(
        like.in_channels, net.params.latent_dim, nets.filters, Covariance.DIAGONAL, like.components
    )
    if default_init:
        encoder.head.reset_parameters()
    return encoder


def posterior_means(amn: nn.Module, image: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor):
    """AMN mean and sigma for every (case, rater) pair: (B, R, k) each; invalid raters are NaN."""
    means, sigmas = [], []
    for r in range(masks.shape[1]):
        dist = amn(torch.cat([image, 2.0 * masks[:, r : r + 1].float() - 1.0], dim=1))
        means.append(dist.mean)
        sigmas.append(dist.stddev)
    nan = torch.tensor(float("nan"))
    mean = torch.where(valid[..., None], torch.stack(means, 1), nan)
    return mean, torch.where(valid[..., None], torch.stack(sigmas, 1), nan)


def probe(net: CIMD, image: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, seed: int) -> dict:
    with torch.no_grad():
        mean, sigma = posterior_means(net.amn, image, masks, valid)
    scale = sigma.nanmean()
    first = mean[:, 0]  # every case has rater 0
    pairs = valid[:, 0] & valid[:, 1]
    terms = net.losses(image, masks, valid, torch.Generator().manual_seed(seed))
    kl_part = net.params.kl_weight * terms["kl"]

    def norms(module: nn.Module) -> tuple[float, float]:
        """|grad of the diffusion loss| and |grad of beta·KL| over ``module``'s weights."""
        weights = [p for p in module.parameters() if p.requires_grad]
        if not weights:  # frozen encoders (ambiguity_nets.trainable: false)
            return float("nan"), float("nan")
        diffusion = torch.autograd.grad(terms["loss"] - kl_part, weights, retain_graph=True, allow_unused=True)
        kl_grad = torch.autograd.grad(kl_part, weights, retain_graph=True, allow_unused=True)
        norm = lambda grads: float(torch.sqrt(sum(((g**2).sum() for g in grads if g is not None), torch.tensor(0.0))))  # noqa: E731
        return norm(diffusion), norm(kl_grad)

    unet_diffusion, unet_kl = norms(net.denoiser)
    amn_diffusion, amn_kl = norms(net.amn)
    return {
        "kl": float(terms["kl"].detach()),
        "amn_spread": float(first.std(0).mean() / scale),
        "rater_shift": float((mean[pairs, 0] - mean[pairs, 1]).abs().mean() / scale),
        "grad_share": unet_kl / unet_diffusion,
        "amn_kl_fraction": amn_kl / max(amn_kl + amn_diffusion, 1e-30),
        **z_effect(net, image, masks, mean, pairs, seed),
    }


def z_effect(net: CIMD, image: torch.Tensor, masks: torch.Tensor, mean: torch.Tensor, pairs: torch.Tensor,
             seed: int) -> dict:
    """``z_flip`` and ``rater_disagreement`` over the cases with two raters (NaN without a latent)."""
    if not net.latent or not pairs.any():
        return {"z_flip": float("nan"), "rater_disagreement": float("nan")}
    image, masks, mean = image[pairs], masks[pairs], mean[pairs]
    x0 = (2.0 * masks[:, :1].float() - 1.0) * net.params.input_scale
    t = torch.full((len(x0),), net.diffusion.num_timesteps - 1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    x_t = net.diffusion.q_sample(x0, t, noise)
    with torch.no_grad():  # one denoiser call per rater's code, as the first step of a sampling chain
        signs = [net.x0_estimate(net.model_fn(image, mean[:, r])(x_t, t), x_t, t) > 0 for r in (0, 1)]
    return {"z_flip": float((signs[0] != signs[1]).float().mean()),
            "rater_disagreement": float((masks[:, 0] != masks[:, 1]).float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "data/06_models/model.pt"))
    add_data_arguments(parser)
    parser.add_argument("--cases", type=int, default=64, help="training cases in the batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "data/08_reporting/ambiguity_probe.csv"))
    args = parser.parse_args()

    trained = TrainedModel.load(args.model)
    if not trained.params.variant.uses_ambiguity_nets:
        raise SystemExit(f"{args.model} is a {trained.params.variant.value} model: it has no AMN/ACN to probe")
    aligned = aligned_data(args.aligned, args.env).subset("train").take(args.cases)
    image = torch.from_numpy(aligned.images)
    masks = torch.from_numpy(aligned.masks)
    valid = torch.from_numpy(aligned.rater_valid)
    net = trained.build(args.model)
    rows = [{"encoders": "trained", **probe(net, image, masks, valid, args.seed)}]
    for label, default_init in (("fresh, head N(0, 0.01^2)", False), ("fresh, PyTorch default init", True)):
        torch.manual_seed(args.seed)
        net.amn, net.acn = (fresh_encoder(encoder, net, default_init) for encoder in (net.amn, net.acn))
        rows.append({"encoders": label, **probe(net, image, masks, valid, args.seed)})
    table = pd.DataFrame(rows)
    table.to_csv(args.out, index=False)
    print(f"{trained.params.variant.value} model {args.model}, {len(image)} training cases, "
          f"beta = {trained.params.kl_weight}, {trained.info.get('steps', '?')} steps\n")
    print(markdown_table(table.map(lambda v: f"{v:.3g}" if isinstance(v, float) else v)))


if __name__ == "__main__":
    main()
