"""Training step time with 1 and N data-parallel processes (torch.distributed, gloo on the CPU).

Every configuration trains the conf/base model (or ``--lidc``'s reference UNet) on synthetic
cases at the same global batch for the same steps; the figure is the training loop's own time
(`TrainResult.seconds`: the steps, not process start-up or model construction) per step, and
images per second. On a GPU machine the N processes use NCCL, one GPU each.

The model FLOPs of one training step (forward and backward of the loss, counted by PyTorch's
`FlopCounterMode` on one batch) turn the step time into achieved TFLOP/s, and with
``--peak-tflops`` (the accelerator's dense peak at the training precision, e.g. about 990 for an
H100/H200 SXM at bf16) into model FLOP utilisation.

    python benchmarks/distributed_training.py --processes 1 2 --steps 30
    python benchmarks/distributed_training.py --lidc --processes 1 --steps 20 --peak-tflops 990
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import torch
import yaml

from cimd_pipeline.config import ModelParams, TrainingParams
from cimd_pipeline.data.alignment import Normalisation, ResizeMode, align_cases, stack_cases
from cimd_pipeline.data.synthetic import SyntheticConfig, generate
from cimd_pipeline.models.trained import build_model
from cimd_pipeline.training.distributed import spawn_training
from cimd_pipeline.training.loop import select_device, train
from cimd_pipeline.training.model_flops import training_step_flops

ROOT = Path(__file__).resolve().parents[1]


def conf_block(name: str, env: str) -> dict:
    path = ROOT / "conf" / env / f"parameters_{name}.yml"
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16, help="global batch size")
    parser.add_argument("--lidc", action="store_true", help="conf/lidc's model at 128x128")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak TFLOP/s at the training precision (for MFU)")
    args = parser.parse_args()
    env = "lidc" if args.lidc else "base"
    model = {**conf_block("training", "base")["model"], **conf_block("training", env).get("model", {})}
    size = 128 if args.lidc else int(conf_block("mask_alignment", "base")["alignment"]["image_size"])
    params = ModelParams.model_validate(model)
    cases = align_cases(
        generate(SyntheticConfig(num_cases=64, image_size=size)), (size, size), ResizeMode.RESIZE,
        Normalisation.ZSCORE, None, 2, 0.0, 0,
    )
    data = stack_cases(cases, {"train": 1.0, "test": 0.0001}, 0).subset("train")
    device = select_device("auto")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    print(f"model: {env} {params.variant.value}, UNet {list(params.unet.channels)} at {size}x{size}, "
          f"global batch {args.batch}, {args.steps} steps")
    torch.manual_seed(0)
    flops = training_step_flops(build_model(params, data.image_channels), data, args.batch)
    print(f"model FLOPs per training step (batch {args.batch}): {flops / 1e12:.3f} TFLOP")
    print("| processes | s/step | images/s | speed-up | TFLOP/s | MFU |\n|---|---|---|---|---|---|")
    first = None
    for n in args.processes:
        torch.manual_seed(0)
        net = build_model(params, data.image_channels)
        training = TrainingParams(max_steps=args.steps, batch_size=args.batch, num_processes=n, progress=False,
                                  checkpoint_every=10**6, log_every=args.steps)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "last.pt"
            result = train(net, data, training, path, "bench") if n == 1 else spawn_training(net, data, training, path, "bench")
        per_step = result.seconds / args.steps
        first = first or per_step
        achieved = flops / per_step / 1e12
        mfu = f"{achieved / args.peak_tflops:.1%}" if args.peak_tflops else "-"
        print(f"| {n} | {per_step:.3f} | {args.batch / per_step:.1f} | {first / per_step:.2f}x "
              f"| {achieved:.3g} | {mfu} |", flush=True)


if __name__ == "__main__":
    main()
