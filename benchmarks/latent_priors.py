"""Where a ``cimd_latent`` model draws its codes from at sampling: its learned prior against priors
fitted after training, with the raters' own posteriors as the bound, on the same denoiser.

The denoiser of ``cimd_latent`` samples better from the posterior codes of a case's own raters than
DDPM-Prob-Seg does, and worse from its learned prior p(z | image) (docs/quality.md, "`cimd_latent`").
If a better prior exists for the trained denoiser, one fitted once training is over should find it,
so each ``--priors`` entry replaces the model's prior while sampling:

- ``learned``: the model's own prior (the ACN), as `kedro run` samples it;
- ``training_codes``: the equal mixture of the posteriors q(z | image, mask) of every (image, valid
  rater) pair of the training split, the same for every image: the aggregate posterior, fitted
  after training as in the ex-post density estimation of Ghosh et al. (2020, "From variational to
  deterministic autoencoders");
- ``refit``: a copy of the ACN trained alone for ``--refit-steps`` on draws of those posteriors, by
  their log-likelihood, the denoiser and the AMN fixed (the two-stage fit of a VAE prior; with the
  denoiser fixed, the posterior codes no longer move under the prior);
- ``refit_early``: the same, stopped where the log-likelihood of the validation split's posterior
  codes is best (checked every 100 steps, after 5 checks without a gain);
- ``posterior``: each sample takes the posterior of one of the case's own raters
  (`sampler_quality.PosteriorCodes`), an oracle no sampler has: it bounds what any prior could give.

For each prior the table gives the samples' figures on the first ``--cases`` test cases (as
`sampler_quality.py` scores them) and ``nll_train`` / ``nll_test``: the mean −log p(code | image) of
the posterior means of the raters' masks of the training and test splits under that prior, i.e. how
well it predicts the codes of raters it was, and was not, fitted on (not defined for ``posterior``).

    OMP_NUM_THREADS=1 python benchmarks/latent_priors.py --seeds 0 1 2 \\
        --model 'data/08_reporting/quality_sweep/models/cimd_latent_mix4-{seed}-3000.pt'
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _direct import add_data_arguments, aligned_data
from _kedro import ROOT
from sampler_quality import evaluate, parse_sampler, rater_posterior
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Independent, MixtureSameFamily, Normal

from cimd_pipeline.models.trained import TrainedModel

PRIORS = ("learned", "training_codes", "refit", "refit_early", "posterior")
FIGURES = ("ged", "ged_floor", "ged_oracle", "hm_iou", "dice_max", "ged_cross", "diversity_samples", "diversity_oracle")
#: Validation checks of ``refit_early``: one every CHECK_EVERY steps, stop after PATIENCE without a gain.
CHECK_EVERY, PATIENCE = 100, 5
#: Posterior codes of a split: means and standard deviations (P, k), and the case of each of the P pairs.
Codes = tuple[Tensor, Tensor, np.ndarray]


@torch.no_grad()
def posterior_codes(amn: nn.Module, data, batch: int = 256) -> Codes:
    """Mean and standard deviation (P, k) of q(z | image, mask) for each of the P (case, valid
    rater) pairs of ``data``, and the case index (P,) of each pair."""
    cases, raters = np.nonzero(np.asarray(data.rater_valid))
    means, stds = [], []
    for start in range(0, len(cases), batch):
        c, r = cases[start:start + batch], raters[start:start + batch]
        image = torch.from_numpy(np.asarray(data.images[c], dtype=np.float32))
        posterior = rater_posterior(amn, image, torch.from_numpy(np.asarray(data.masks[c, r]))[:, None])
        means.append(posterior.mean)
        stds.append(posterior.stddev)
    return torch.cat(means), torch.cat(stds), cases


class EqualDiagonalMixture(MixtureSameFamily):
    """An equal-weight mixture of P diagonal Gaussians whose ``log_prob`` is three products of
    (N, k) by (k, P) matrices: the generic one forms N·P·k elementwise terms, minutes of CPU for
    the tens of thousands of codes of a real training split."""

    def log_prob(self, z: Tensor) -> Tensor:
        normal = self.component_distribution.base_dist
        means, precisions = normal.loc[0].double(), normal.scale[0].double().pow(-2)  # (P, k), the same every row
        z = z.double()
        square = z.pow(2) @ precisions.T - 2 * z @ (means * precisions).T + (means.pow(2) * precisions).sum(1)
        log_norm = 0.5 * precisions.log().sum(1) - 0.5 * means.shape[1] * math.log(2 * math.pi)
        return (torch.logsumexp(log_norm - 0.5 * square, dim=1) - math.log(len(means))).float()


class TrainingCodes(nn.Module):
    """The same prior for every image: the equal mixture of the given diagonal Gaussians."""

    def __init__(self, means: Tensor, stds: Tensor) -> None:
        super().__init__()
        self.means, self.stds = means, stds

    def forward(self, image: Tensor) -> Distribution:
        rows, (pairs, k) = len(image), self.means.shape
        normal = Normal(self.means.expand(rows, pairs, k), self.stds.expand(rows, pairs, k), validate_args=False)
        weights = Categorical(logits=torch.zeros(rows, pairs), validate_args=False)
        return EqualDiagonalMixture(weights, Independent(normal, 1, validate_args=False), validate_args=False)


@torch.no_grad()
def code_nll(prior: nn.Module, data, codes: Codes, batch: int = 256) -> float:
    """Mean −log p(posterior mean | image) over ``data``'s (case, valid rater) pairs, whose
    `posterior_codes` are ``codes``."""
    means, _, cases = codes
    total = 0.0
    for start in range(0, len(cases), batch):
        image = torch.from_numpy(np.asarray(data.images[cases[start:start + batch]], dtype=np.float32))
        total -= float(prior(image).log_prob(means[start:start + batch]).sum())
    return total / len(cases)


def refit_prior(acn: nn.Module, train, codes: Codes, steps: int, seed: int, val=None, val_codes: Codes | None = None,
                batch: int = 64, lr: float = 1e-3) -> nn.Module:
    """A copy of ``acn`` trained alone by the log-likelihood of draws of the training posteriors
    ``codes``; with ``val`` and its ``val_codes``, the copy of the step whose validation code NLL
    was lowest (see `CHECK_EVERY`)."""
    means, stds, cases = codes
    images = torch.from_numpy(np.array(train.images, dtype=np.float32))
    prior = copy.deepcopy(acn).train().requires_grad_(True)
    optimiser = torch.optim.Adam(prior.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    best, best_state, stale = float("inf"), None, 0
    for step in range(1, steps + 1):
        pick = torch.randint(len(cases), (batch,), generator=generator)
        z = means[pick] + stds[pick] * torch.randn(batch, means.shape[1], generator=generator)
        loss = -prior(images[cases[pick.numpy()]]).log_prob(z).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if val is not None and step % CHECK_EVERY == 0:
            nll = code_nll(prior, val, val_codes)
            stale = 0 if nll < best else stale + 1
            if nll < best:
                best, best_state = nll, copy.deepcopy(prior.state_dict())
            if stale == PATIENCE:
                break
    if best_state is not None:
        prior.load_state_dict(best_state)
    return prior.eval().requires_grad_(False)


def fit_prior(name: str, net: nn.Module, data, train, codes: Codes, args, seed: int) -> nn.Module | None:
    """The prior module for ``name`` on the built model ``net`` whose ``train`` split's posterior
    codes are ``codes`` (None for ``posterior``); ``refit_early`` stops on ``data``'s val split."""
    if name == "learned":
        return net.acn
    if name == "training_codes":
        return TrainingCodes(*codes[:2])
    if name in ("refit", "refit_early"):
        val = data.subset("val") if name == "refit_early" else None
        val_codes = None if val is None else posterior_codes(net.amn, val)
        return refit_prior(net.acn, train, codes, args.refit_steps, seed, val, val_codes)
    return None


def run_seed(args, seed: int, data) -> list[dict]:
    """One row per prior for the model of ``seed``."""
    path = Path(args.model.format(seed=seed))
    model = TrainedModel.load(path)
    net = model.build().eval()
    if not getattr(net, "latent", False):
        raise SystemExit(f"{path}: latent priors need a cimd_latent model, got {model.params.variant.value}")
    train, test = data.subset("train"), data.subset("test").take(args.cases)
    train_codes, test_codes = posterior_codes(net.amn, train), posterior_codes(net.amn, test)
    rows = []
    for name in args.priors:
        prior = fit_prior(name, net, data, train, train_codes, args, seed)
        sampler = args.sampler + ("+posterior" if prior is None else "")
        row = {"prior": name, "seed": seed}
        if prior is not None:
            row.update(nll_train=code_nll(prior, train, train_codes), nll_test=code_nll(prior, test, test_codes))
        scores = evaluate(model, test, sampler, args.samples, args.batch, seed,
                          prior=None if prior is None else (lambda _net, p=prior: p))
        row.update({k: scores[k] for k in FIGURES if k in scores})
        print(row, flush=True)
        rows.append(row)
    return rows


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Each figure's mean over the seeds, with the standard deviation of GED and HM-IoU, one row
    per prior in the order of the table."""
    figures = [c for c in table.columns if c not in ("prior", "seed")]
    grouped = table.groupby("prior", sort=False)
    spread = grouped[["ged", "hm_iou"]].std().add_suffix("_sd")
    return grouped[figures].mean().join(spread).join(grouped.size().rename("seeds")).reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a cimd_latent model.pt; {seed} stands for each seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="model and sampling seeds")
    parser.add_argument("--priors", nargs="+", choices=PRIORS, default=list(PRIORS))
    parser.add_argument("--cases", type=int, default=60, help="the first K test cases")
    parser.add_argument("--sampler", default="ddim50", help="as sampler_quality.py names it, without +posterior "
                        "(e.g. ddim5+bf16, the LIDC CPU recipe's)")
    parser.add_argument("--samples", type=int, default=16, help="masks per case (N)")
    parser.add_argument("--batch", type=int, default=16, help="rows per sampling batch")
    parser.add_argument("--refit-steps", type=int, default=2000, help="training steps of refit (most for refit_early)")
    parser.add_argument("--out", default=str(ROOT / "data/08_reporting/latent_priors.csv"))
    add_data_arguments(parser)
    args = parser.parse_args()
    if parse_sampler(args.sampler)[4]:
        parser.error("--sampler: the posterior is one of the --priors, not a sampler")
    data = aligned_data(args.aligned, args.env)
    table = pd.DataFrame([row for seed in args.seeds for row in run_seed(args, seed, data)])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    summary = summarise(table)
    summary.to_csv(out.with_name(out.stem + "_summary.csv"), index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
