"""CPU-seconds of one training step of `quality_sweep` configurations, measured side by side.

Comparing recipes at equal CPU time (a wider U-Net against more steps of a narrow one,
self-conditioning's extra pass) needs each one's step cost on one machine under one load. Every
configuration's model takes ``--steps`` optimiser steps per round on a random batch of its
parameters' shape (``training.batch_size`` images of ``alignment.image_size``, four raters), the
configurations interleaved over ``--rounds`` rounds so that a change in the machine's load hits
them alike; each is timed in CPU-seconds of this process (other work on the machine counts less
than in wall time) and printed with its median per step and the ratio to the first configuration.
The step is the model's loss, backward pass and AdamW update: the per-step draws of augmentation
and dropout masks are not in it.

    OMP_NUM_THREADS=1 python benchmarks/step_cost.py --configs default unet_32_64_64 unet_16_32_64
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch
from _direct import load_parameters
from _kedro import markdown_table
from quality_sweep import CONFIGS

from cimd_pipeline.config import ModelParams
from cimd_pipeline.models.trained import build_model


def step_seconds(configs: list[str], env: str | None, steps: int, rounds: int, seed: int = 0) -> dict[str, list[float]]:
    """CPU-seconds per step of each configuration, one figure per round."""
    runs = {}
    for config in configs:
        params = load_parameters(env, CONFIGS[config])
        torch.manual_seed(seed)
        net = build_model(ModelParams.model_validate(params["model"]), image_channels=1)
        optimiser = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=params["training"]["lr"])
        size, batch = params["alignment"]["image_size"], params["training"]["batch_size"]
        g = torch.Generator().manual_seed(seed)
        image = torch.randn(batch, 1, size, size, generator=g)
        masks = (torch.rand(batch, 4, size, size, generator=g) > 0.7).to(torch.uint8)
        runs[config] = (net, optimiser, image, masks, torch.ones(batch, 4, dtype=torch.bool), g)
    seconds: dict[str, list[float]] = {config: [] for config in configs}
    for _ in range(rounds):
        for config, (net, optimiser, image, masks, valid, g) in runs.items():
            started = time.process_time()
            for _ in range(steps):
                optimiser.zero_grad(set_to_none=True)
                net.losses(image, masks, valid, g)["loss"].backward()
                optimiser.step()
            seconds[config].append((time.process_time() - started) / steps)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["default"], choices=list(CONFIGS))
    parser.add_argument("--env", default=None, help="conf/<env> over conf/base")
    parser.add_argument("--steps", type=int, default=10, help="steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    seconds = step_seconds(args.configs, args.env, args.steps, args.rounds)
    first = float(np.median(seconds[args.configs[0]]))
    rows = [{"config": c, "cpu_s_per_step": float(np.median(s)), "ratio": float(np.median(s)) / first,
             "rounds": ", ".join(f"{v:.3f}" for v in s)} for c, s in seconds.items()]
    print(f"{torch.get_num_threads()} thread(s), {args.rounds} rounds of {args.steps} steps, median per step")
    print(markdown_table(pd.DataFrame(rows)))


if __name__ == "__main__":
    main()
