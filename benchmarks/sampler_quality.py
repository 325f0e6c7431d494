"""Quality and cost of a trained model under several samplers, on the first K cases of a split.

For each sampler (``ddim10``, ``ddpm10``, ``ddim5``, ``ddim5+bf16`` for bfloat16 autocast,
``ddim50+t0.8`` for every noise draw of the sampler times 0.8, ``ddim50+posterior`` for a
``cimd_latent`` model's codes drawn from its posterior on the raters' own masks ...) draws ``--samples`` masks per case with
the pipeline's own code (`cimd_pipeline.ensembles.draw_ensembles`) and scores them as the
evaluation pipeline does (`cimd_pipeline.scoring`): GED, the perfect-sampler floor for the N
drawn and GED − floor, HM-IoU, Dice_max and CI (both readings: ``ci`` and ``ci_var``, docs/metrics.md), with masks per CPU-second of this
process (robust to other work on a shared machine), and GED's three terms. Choose samplers on ``--split val``; report on
the test split. docs/lidc.md, "Sampling speed" and "Fewer steps".

    OMP_NUM_THREADS=1 python benchmarks/sampler_quality.py --model models/lidc_cpu_64/model.pt \\
        --aligned data/03_primary/aligned --split val --max-cases 32 --samplers ddim10 ddim5 ddim3
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from cimd_pipeline.config import SamplingParams
from cimd_pipeline.diffusion.noise import RowGenerators
from cimd_pipeline.ensembles import draw_ensembles
from cimd_pipeline.io.aligned_dataset import AlignedDataset
from cimd_pipeline.models.trained import TrainedModel
from cimd_pipeline.scoring import score_samples

# GED's terms beside the figures (ged = 2 ged_cross - diversity_samples - diversity_raters, docs/metrics.md),
# so that a GED bought with samples more diverse than the raters shows; the oracle's GED and terms
# where the data has a known rater model (the synthetic benchmark)
COLUMNS = ("ged", "ged_floor", "ged_minus_floor", "hm_iou", "dice_max", "ci", "ci_var",
           "ged_cross", "diversity_samples", "diversity_raters", "ged_oracle", "ged_cross_oracle", "diversity_oracle")


def parse_sampler(name: str) -> tuple[str, int, bool, float, bool]:
    """``ddim10`` -> ("ddim", 10, False, 1.0, False); ``ddim5+bf16`` -> ("ddim", 5, True, 1.0, False),
    bfloat16 autocast; ``ddim50+t0.8`` -> ("ddim", 50, False, 0.8, False), a sampling temperature;
    ``ddim50+posterior`` -> ("ddim", 50, False, 1.0, True), `PosteriorCodes` for the prior."""
    match = re.fullmatch(r"(ddim|ddpm)(\d+)(\+bf16)?(?:\+t(\d*\.?\d+))?(\+posterior)?", name)
    if not match or (match.group(4) and float(match.group(4)) <= 0):
        raise argparse.ArgumentTypeError(
            f"{name!r}: expected ddim<steps> or ddpm<steps>, optionally +bf16, +t<temperature > 0> and "
            "+posterior, e.g. ddim10, ddim5+bf16, ddim50+t0.8 or ddim50+posterior"
        )
    return match.group(1), int(match.group(2)), bool(match.group(3)), float(match.group(4) or 1.0), bool(match.group(5))


def rater_posterior(amn: nn.Module, image: torch.Tensor, mask: torch.Tensor):
    """q(z | image, mask) of a ``cimd_latent`` model for rater masks (B, 1, H, W) in {0, 1}, fed to
    the AMN in [-1, 1] as in training."""
    return amn(torch.cat([image, 2.0 * mask.to(image.device, torch.float32) - 1.0], dim=1))


class PosteriorCodes(nn.Module):
    """Stands in for ``cimd_latent``'s prior p(z | image) while sampling: flat row r (member r % N of
    case r // N, `cimd_pipeline.sample_rows`) gets the posterior q(z | image, mask) of the case's
    (r % N mod R)-th valid rater, so the N samples cycle through the R raters' codes.

    An oracle prior: it reads the raters' masks, which no sampler has, so it bounds what any prior
    could give the same denoiser. If it samples no better than the model's own prior, the prior is
    not what holds the latent variant back. Rows must come in order, one process (as here).
    """

    def __init__(self, amn: nn.Module, masks: np.ndarray, valid: np.ndarray, samples: int) -> None:
        super().__init__()
        self.amn, self.masks, self.valid, self.samples, self.next_row = amn, masks, valid, samples, 0

    def forward(self, image: torch.Tensor):
        rows = np.arange(self.next_row, self.next_row + len(image))
        self.next_row += len(image)
        cases, members = rows // self.samples, rows % self.samples
        raters = [np.flatnonzero(self.valid[c])[m % self.valid[c].sum()] for c, m in zip(cases, members)]
        return rater_posterior(self.amn, image, torch.from_numpy(np.asarray(self.masks[cases, raters]))[:, None])


class TemperedRows(RowGenerators):
    """The rows' own noise streams, every draw times ``temperature``: x_T and, for DDPM (and
    cimd_latent's z), each step's noise. Below 1 the samples gather towards the model's modes
    (the reduced-temperature sampling of Kingma & Dhariwal 2018, "Glow"), a measure of how much of
    a model's GED rests on the spread of its samples."""

    def __init__(self, rows: RowGenerators, temperature: float) -> None:
        self.device, self.generators, self.temperature = rows.device, rows.generators, temperature

    def randn(self, shape, dtype=None) -> torch.Tensor:
        return super().randn(shape, dtype) * self.temperature


def tempered(net: torch.nn.Module, temperature: float) -> torch.nn.Module:
    """``net`` whose ``sample`` draws from `TemperedRows` (itself where the temperature is 1)."""
    if temperature != 1.0:
        plain = net.sample
        net.sample = lambda image, params, generator: plain(image, params, TemperedRows(generator, temperature))
    return net


def evaluate(model: TrainedModel, data, sampler: str, samples: int, batch: int, seed: int,
             prior: Callable[[nn.Module], nn.Module] | None = None) -> dict[str, float]:
    """Mean metrics over ``data``'s cases and the sampling cost of ``sampler``; ``prior`` (built
    network -> module) replaces a ``cimd_latent`` model's prior p(z | image), as ``+posterior`` does."""
    method, steps, bf16, temperature, posterior = parse_sampler(sampler)
    params = SamplingParams(
        method=method, steps=steps, num_samples=samples, batch_size=batch, seed=seed, progress=False, bf16=bf16
    )
    net = tempered(model.build(), temperature)
    if posterior:
        prior = lambda built: PosteriorCodes(built.amn, data.masks, data.rater_valid, samples)
    if prior is not None:
        if not getattr(net, "latent", False):
            raise SystemExit(f"{sampler}: another prior needs a cimd_latent model, got {model.params.variant.value}")
        net.acn = prior(net)
    started = time.process_time()
    drawn = draw_ensembles(net, data.images, data.cases["case_id"].to_numpy(), params, torch.device("cpu"))
    cpu = time.process_time() - started
    per_case = score_samples(drawn, data)
    per_case["ged_minus_floor"] = per_case["ged"] - per_case["ged_floor"]
    row = {"sampler": sampler, "cases": len(per_case)}
    row.update({k: float(per_case[k].mean()) for k in COLUMNS if k in per_case})
    row["masks_per_cpu_s"] = drawn.binary.size / (drawn.binary.shape[2] * drawn.binary.shape[3]) / cpu
    row["masks_per_s"] = float(drawn.info["masks_per_second"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model.pt")
    parser.add_argument("--aligned", default="data/03_primary/aligned", help="the aligned dataset folder")
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument("--max-cases", type=int, default=32, help="the first K cases of the split")
    parser.add_argument("--samplers", nargs="+", default=["ddim10", "ddim5"])
    parser.add_argument("--samples", type=int, default=16, help="masks per case (N)")
    parser.add_argument("--batch", type=int, default=16, help="rows per batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the table to this CSV")
    args = parser.parse_args()
    for sampler in args.samplers:
        parse_sampler(sampler)
    model = TrainedModel.load(args.model)
    data = AlignedDataset(args.aligned).load().subset(args.split)
    data = data.take(np.arange(min(args.max_cases, len(data))))
    rows = [evaluate(model, data, s, args.samples, args.batch, args.seed) for s in args.samplers]
    table = pd.DataFrame(rows)
    print(f"{args.model} on the first {len(data)} {args.split} cases, N = {args.samples}, seed {args.seed}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out:
        table.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
