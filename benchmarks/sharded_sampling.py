"""Sampling throughput with ``sampling.num_processes`` workers, and their bit-identity.

Draws ``--samples`` masks for ``--cases`` random images with the conf/base model (random weights:
the cost of a sampling step does not depend on them) once per process count, prints masks/s and
whether each sharded result equals the single-process arrays bit for bit. The parent's torch
threads are shared out among the workers, so every count uses the same cores.

    python benchmarks/sharded_sampling.py --processes 1 2          # the CPU's cores
    python benchmarks/sharded_sampling.py --device cuda --processes 1 2 4 8
"""

from __future__ import annotations

import argparse
import os
import platform

import numpy as np
import torch
import yaml

from _kedro import ROOT
from cimd_pipeline.config import ModelParams, SamplingParams
from cimd_pipeline.ensembles import draw_ensembles
from cimd_pipeline.models.trained import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=32)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in all")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    block = yaml.safe_load((ROOT / "conf/base/parameters_training.yml").read_text())["model"]
    size = yaml.safe_load((ROOT / "conf/base/parameters_mask_alignment.yml").read_text())["alignment"]["image_size"]
    torch.manual_seed(0)
    net = build_model(ModelParams.model_validate(block), 1).eval()
    with torch.no_grad():
        for weight in net.parameters():  # the zero-initialised output layers would sample nothing
            weight.add_(0.05 * torch.randn_like(weight))
    images = np.random.default_rng(0).normal(size=(args.cases, 1, size, size)).astype(np.float32)
    ids = np.array([f"case_{i:04d}" for i in range(args.cases)])
    device = torch.device(args.device)
    print(f"{args.cases} images x {args.samples} samples, DDPM-{args.steps}, {size}x{size}, UNet "
          f"{list(net.denoiser.cfg.channels)}, batch {args.batch_size}, {args.threads} torch thread(s), "
          f"{device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    reference = None
    for count in args.processes:
        params = SamplingParams(num_samples=args.samples, method="ddpm", steps=args.steps,
                                batch_size=args.batch_size, progress=False, num_processes=count)
        drawn = draw_ensembles(net, images, ids, params, device)
        reference = drawn.soft if reference is None else reference
        same = np.array_equal(drawn.soft, reference)
        print(f"processes {count}: {drawn.info['masks_per_second']:.2f} masks/s "
              f"({drawn.info['seconds']:.1f} s, worker start-up included); "
              f"identical to the first count: {same}")


if __name__ == "__main__":
    main()
