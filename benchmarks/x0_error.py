"""Mean clean-mask error per timestep bucket: where along the chain a trained model predicts badly.

For each model, every test case is noised to x_t at timesteps spread over each bucket of the
training schedule (one valid rater per case as x_0, fixed noise seed) and the model's clipped
estimate x0_hat (mask units, as the samplers use it) is compared with x_0: mean squared error and
the share of pixels on the wrong side of 0. A model whose error grows again at small t samples
worse with more steps (the "fewer steps are better" symptom of docs/quality.md).

    python benchmarks/x0_error.py data/08_reporting/quality_sweep/models/default-0-500.pt \
        data/08_reporting/quality_sweep/models/literature-0-500.pt --buckets 10
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from _direct import add_data_arguments, aligned_data
from _kedro import ROOT, markdown_table

from cimd_pipeline.models.ambiguity import draw
from cimd_pipeline.models.cimd import CIMD, pick_raters
from cimd_pipeline.models.trained import TrainedModel

logger = logging.getLogger("x0_error")


def bucket_edges(num_timesteps: int, buckets: int) -> np.ndarray:
    """Log-spaced bucket edges over [0, T): the small-t end, where the anomaly lives, gets resolution."""
    edges = np.unique(np.round(np.geomspace(1, num_timesteps, buckets + 1)).astype(int) - 1)
    edges[-1] = num_timesteps
    return edges


@torch.no_grad()
def x0_errors(net: CIMD, image: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, buckets: int,
              per_bucket: int, seed: int) -> pd.DataFrame:
    """One row per bucket: its t range, mean squared x0_hat error and wrong-sign pixel share."""
    generator = torch.Generator().manual_seed(seed)
    x0 = 2.0 * masks[torch.arange(len(masks)), pick_raters(valid, generator)][:, None].float() - 1.0
    edges = bucket_edges(net.diffusion.num_timesteps, buckets)
    rows = []
    for low, high in zip(edges[:-1], edges[1:]):
        errors, wrong = [], []
        for t_value in np.unique(np.linspace(low, high - 1, per_bucket).round().astype(int)):
            t = torch.full((len(x0),), int(t_value), dtype=torch.long)
            noise = torch.randn(x0.shape, generator=generator)
            x_t = net.diffusion.q_sample(x0 * net.params.input_scale, t, noise)
            z = None
            if net.latent:  # the latent variant samples z from its image prior
                z = draw(net.acn(image), generator)
            estimate = net.x0_estimate(net.model_fn(image, z)(x_t, t), x_t, t)  # a chain's first call
            errors.append(float(((estimate - x0) ** 2).mean()))
            wrong.append(float(((estimate > 0) != (x0 > 0)).float().mean()))
        rows.append({"t_low": int(low), "t_high": int(high - 1), "x0_mse": float(np.mean(errors)),
                     "wrong_pixels": float(np.mean(wrong))})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="model.pt files (diffusion variants)")
    add_data_arguments(parser)
    parser.add_argument("--split", default="test")
    parser.add_argument("--buckets", type=int, default=10)
    parser.add_argument("--per-bucket", type=int, default=4, help="timesteps evaluated per bucket")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "data/08_reporting/x0_error")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data = aligned_data(args.aligned, args.env).subset(args.split)
    image = torch.from_numpy(np.asarray(data.images, dtype=np.float32))
    masks = torch.from_numpy(np.asarray(data.masks))
    valid = torch.from_numpy(np.asarray(data.rater_valid, dtype=bool))
    tables = []
    for path in args.models:
        trained = TrainedModel.load(path)
        net = trained.build(path)
        if not isinstance(net, CIMD):
            raise SystemExit(f"{path} is a {trained.params.variant.value} model, not a diffusion model")
        table = x0_errors(net, image, masks, valid, args.buckets, args.per_bucket, args.seed)
        table.insert(0, "model", path.stem)
        tables.append(table)
        logger.info("%s: x0 MSE %.3f at the smallest t, %.3f at the largest", path.stem, table["x0_mse"].iloc[0],
                    table["x0_mse"].iloc[-1])
    result = pd.concat(tables, ignore_index=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result.to_csv(args.out / "x0_error.csv", index=False)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, group in result.groupby("model", sort=False):
        middle = (group["t_low"] + group["t_high"]) / 2 + 1
        for ax, column in zip(axes, ("x0_mse", "wrong_pixels")):
            ax.plot(middle, group[column], marker="o", label=name)
    for ax, column in zip(axes, ("mean squared x0_hat error (mask units)", "share of wrong-sign pixels")):
        ax.set_xscale("log")
        ax.set_xlabel("timestep t (bucket middle)")
        ax.set_title(column, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "x0_error.png", dpi=110)
    print(markdown_table(result.map(lambda v: f"{v:.3g}" if isinstance(v, float) else v)))


if __name__ == "__main__":
    main()
