"""Where sampling time goes on a CPU, and what each change buys (docs/lidc.md, "Sampling speed").

Draws the same masks through the pipeline's own batch loop (`cimd_pipeline.sample_rows`) under
cumulative configurations, starting from the sampler as it ran before (256 rows a batch, MONAI's
matmul-softmax attention, DDIM-10), and prints masks per CPU-second of this process (robust to
other work on a shared machine) and per wall-second, the median over interleaved rounds, with the
speed-up of each step over the previous one and over the start. Then the operator profile of the
fastest configuration, and the number of AMN/ACN forward calls sampling makes (the encoders act in
training only). Speed does not depend on the weights: without ``--model`` the conf/base network
is built at ``--size`` with fresh weights.

    OMP_NUM_THREADS=1 python benchmarks/sampling_speed.py --size 64
    OMP_NUM_THREADS=1 python benchmarks/sampling_speed.py --model models/lidc_cpu_64/model.pt
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from _direct import load_parameters
from torch.profiler import ProfilerActivity, profile

from cimd_pipeline.config import ModelParams, SamplingParams
from cimd_pipeline.models.cimd import CIMD
from cimd_pipeline.models.trained import TrainedModel
from cimd_pipeline.sample_rows import draw_batches, row_batches


@dataclass(frozen=True)
class Setting:
    label: str
    batch_size: int
    fused_attention: bool
    channels_last: bool
    steps: int
    compiled: bool = False
    bf16: bool = False


def settings(steps: int, batch: int, compiled: bool) -> list[Setting]:
    """The cumulative changes, in the order they are applied."""
    start = Setting("before: 256 rows/batch, MONAI attention, DDIM-10", 256, False, False, 10)
    out = [start]
    out.append(Setting(f"+ {batch} rows/batch", batch, False, False, 10))
    out.append(Setting("+ fused attention (SDPA)", batch, True, False, 10))
    out.append(Setting("+ channels_last weights", batch, True, True, 10))
    out.append(Setting(f"+ DDIM-{steps}", batch, True, True, steps))
    out.append(Setting("+ bfloat16 autocast (sampling.bf16)", batch, True, True, steps, bf16=True))
    if compiled:
        out.append(Setting("+ torch.compile", batch, True, True, steps, compiled=True, bf16=True))
    return out


def configure(net: CIMD, setting: Setting) -> None:
    """Switch the attention kernel and whether sampling runs the weights channels_last."""
    for module in net.modules():
        if hasattr(module, "use_flash_attention"):
            module.use_flash_attention = setting.fused_attention
    net.channels_last_on_cpu = setting.channels_last  # CIMD.sample switches the weights itself


def timed_draw(net: CIMD, images: np.ndarray, setting: Setting, samples: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of drawing ``samples`` masks for each of ``images``."""
    params = SamplingParams(
        method="ddim", steps=setting.steps, batch_size=setting.batch_size, num_samples=samples, progress=False,
        bf16=setting.bf16,
    )
    keys = [f"case-{i}" for i in range(len(images))]
    batches = row_batches(len(images) * samples, setting.batch_size)
    cpu, wall = time.process_time(), time.perf_counter()
    draw_batches(net, images, keys, params, torch.device("cpu"), batches, "benchmark")
    return time.process_time() - cpu, time.perf_counter() - wall


def operator_profile(net: CIMD, images: np.ndarray, setting: Setting, samples: int) -> None:
    """Share of CPU time per operator group for one draw under ``setting``."""
    groups = {
        "convolution": ("convolution",),
        "group norm": ("group_norm",),
        "SiLU": ("silu",),
        "attention": ("attention", "bmm", "softmax", "einsum"),
        "elementwise (add, mul, tanh, ...)": ("add", "mul", "sub", "div", "tanh", "clamp", "exp", "sqrt"),
        "concatenation and copies": ("cat", "copy_", "clone", "contiguous"),
    }
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        timed_draw(net, images, setting, samples)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = {name: 0.0 for name in groups}
    for event in events:
        for name, keys in groups.items():
            if any(key in event.key for key in keys):
                shares[name] += event.self_cpu_time_total / total
                break
    print(f"operator profile of '{setting.label}' (share of CPU time):")
    for name, share in shares.items():
        print(f"    {name:<36s} {100 * share:5.1f} %")
    print(f"    {'other (sampler maths, noise, Python)':<36s} {100 * (1 - sum(shares.values())):5.1f} %")


def encoder_calls(net: CIMD, images: np.ndarray, samples: int) -> int:
    """Forward calls of the AMN and ACN while sampling (0: sampling does not run them)."""
    calls = 0

    def count(*_):
        nonlocal calls
        calls += 1

    hooks = [m.register_forward_hook(count) for m in (net.amn, net.acn) if m is not None]
    timed_draw(net, images[:1], Setting("probe", 16, True, True, 2), min(samples, 2))
    for hook in hooks:
        hook.remove()
    return calls


def build(args: argparse.Namespace) -> CIMD:
    if args.model:
        return TrainedModel.load(args.model).build()
    params = load_parameters()
    return CIMD(ModelParams.model_validate(params["model"]), 1).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model.pt (default: the conf/base network, fresh weights)")
    parser.add_argument("--size", type=int, default=64, help="image size without --model")
    parser.add_argument("--images", type=int, default=16, help="images drawn for (16 masks each)")
    parser.add_argument("--batch", type=int, default=16, help="rows per batch of the faster settings")
    parser.add_argument("--steps", type=int, default=5, help="DDIM steps of the last setting")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is shown")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    args = parser.parse_args()
    torch.manual_seed(0)
    net = build(args)
    size = tuple(args.model and TrainedModel.load(args.model).image_size or (args.size, args.size))
    channels = net.denoiser.image_channels
    images = np.random.default_rng(0).normal(size=(args.images, channels, *size)).astype(np.float32)
    samples = 16
    print(f"sampling {args.images} images x {samples} masks at {size[0]}x{size[1]}, {torch.get_num_threads()} "
          f"thread(s), {args.rounds} rounds; AMN/ACN forward calls while sampling: {encoder_calls(net, images, samples)}")
    plan = settings(args.steps, args.batch, args.compile)
    cpu: dict[str, list[float]] = {s.label: [] for s in plan}
    wall: dict[str, list[float]] = {s.label: [] for s in plan}
    compiled = None
    for _ in range(args.rounds):
        for setting in plan:
            configure(net, setting)
            target = net
            if setting.compiled:
                compiled = compiled or torch.compile(net.denoiser, dynamic=False)
                original, net.denoiser = net.denoiser, compiled
            try:
                timed_draw(target, images[:1], setting, samples)  # warm-up (and compilation)
                c, w = timed_draw(target, images, setting, samples)
            finally:
                if setting.compiled:
                    net.denoiser = original
            cpu[setting.label].append(len(images) * samples / c)
            wall[setting.label].append(len(images) * samples / w)
    print(f"{'setting':<52s} {'masks/CPU-s':>11s} {'step':>6s} {'total':>6s} {'masks/s wall':>12s}")
    first = previous = None
    for setting in plan:
        rate = statistics.median(cpu[setting.label])
        first = first or rate
        step = rate / (previous or rate)
        previous = rate
        print(f"{setting.label:<52s} {rate:11.2f} {step:5.2f}x {rate / first:5.2f}x "
              f"{statistics.median(wall[setting.label]):12.2f}")
    fastest = [s for s in plan if not s.compiled][-1]
    configure(net, fastest)
    operator_profile(net, images[:2], fastest, samples)


if __name__ == "__main__":
    main()
