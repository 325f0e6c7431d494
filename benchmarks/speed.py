"""Speed figures, each printed as a ratio against its baseline measured in the same run.

(a) sampling throughput (masks/s): the reference code's loop (one ensemble member at a time,
    batch 1, 1000 DDPM steps) against the pipeline's batched DDPM-1000 and DDIM-50/25/10;
(b) training throughput (images/s): fp32 against bf16 autocast (``training.bf16`` on CUDA,
    ``training.cpu_bf16`` on the CPU, where it pays only on CPUs with bf16 units: AMX, AVX-512 BF16);
(c) metrics: vectorised GED + HM-IoU + CI for 16 samples x 4 raters over 1,000 cases against a
    per-pair Python loop;
(d) Kedro + MLflow overhead: one training budget as a bare Python call and through ``kedro run``.
Long baselines are timed over a few steps and extrapolated (said so in the output).

    python benchmarks/speed.py                 # the conf/base model at its image size
    python benchmarks/speed.py --lidc          # the reference-size UNet at 128x128
    python benchmarks/speed.py --env lidc_cpu --parts b   # training only, the LIDC CPU recipe (64x64)
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time

import numpy as np
import torch
import yaml

from _kedro import ROOT, kedro_run
from cimd_pipeline.config import AlignmentParams, ModelParams, SamplingParams, TrainingParams
from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.metrics import evaluate_batch
from cimd_pipeline.models.cimd import CIMD
from cimd_pipeline.training.loop import select_device, train


def conf_block(name: str, env: str = "base") -> dict:
    path = ROOT / "conf" / env / f"parameters_{name}.yml"
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def timed(fn, repeat: int = 1) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeat


def sampling_figures(net: CIMD, size: int, device: torch.device, cases: int, probe_steps: int) -> None:
    """(a): masks/s of each sampler, the reference loop extrapolated from ``probe_steps`` steps."""
    image = torch.randn(1, net.denoiser.image_channels, size, size, device=device)
    t = torch.full((1,), 500, device=device)
    x = torch.randn(1, 1, size, size, device=device)
    with torch.no_grad():
        per_step = timed(lambda: net.denoiser(x, image, t), repeat=probe_steps)
    reference = 1.0 / (per_step * 1000)
    print(f"(a) sampling, {cases} cases x 16 samples at {size}x{size} on {device}")
    print(f"    reference loop (batch 1, DDPM-1000, {probe_steps} steps timed): {reference:.3f} masks/s  1.0x")
    batch = cases * 16
    images = torch.randn(batch, net.denoiser.image_channels, size, size, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        xs = torch.randn(batch, 1, size, size, device=device)
        ts = torch.full((batch,), 500, device=device)
        ddpm_step = timed(lambda: net.denoiser(xs, images, ts), repeat=max(1, probe_steps // 4))
        rate = batch / (ddpm_step * 1000)
        print(f"    batched DDPM-1000 (batch {batch}, extrapolated): {rate:.2f} masks/s  {rate / reference:.1f}x")
        for steps in (50, 25, 10):
            params = SamplingParams(method="ddim", steps=steps, batch_size=batch)
            seconds = timed(lambda: net.sample(images, params, g))
            rate = batch / seconds
            print(f"    batched DDIM-{steps} (batch {batch}): {rate:.2f} masks/s  {rate / reference:.1f}x")


def training_figures(net: CIMD, size: int, device: torch.device, batch: int) -> None:
    """(b): images/s of a training step in fp32 and under bf16 autocast."""
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    image = torch.randn(batch, net.denoiser.image_channels, size, size, device=device)
    masks = (torch.rand(batch, 4, size, size, device=device) > 0.8).to(torch.uint8)
    valid = torch.ones(batch, 4, dtype=torch.bool, device=device)
    g = torch.Generator(device=device).manual_seed(0)

    def step(bf16: bool) -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = net.losses(image, masks, valid, g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    def rates(bf16: bool) -> tuple[float, float]:
        """Images/s, and CPU-seconds a step (robust to other work on a shared machine; the CPU
        clock also counts the warm-up step)."""
        started = time.process_time()
        wall = timed(lambda: step(bf16), repeat=5)
        return batch / wall, (time.process_time() - started) / 6

    (fp32, cpu_fp32), (bf16, cpu_bf16) = rates(False), rates(True)
    note = "" if device.type == "cuda" else " (CPU: training.cpu_bf16)"
    print(f"(b) training step, batch {batch} at {size}x{size} on {device}{note}")
    print(f"    fp32: {fp32:.1f} images/s  1.0x  ({cpu_fp32:.3f} CPU-s a step)")
    print(f"    bf16 autocast: {bf16:.1f} images/s  {bf16 / fp32:.2f}x  ({cpu_bf16:.3f} CPU-s a step, "
          f"{cpu_fp32 / cpu_bf16:.2f}x)")


def loop_metrics(samples: np.ndarray, raters: np.ndarray) -> tuple[float, float, float]:
    """GED, HM-IoU and CI for one case with plain Python loops over pairs (the baseline)."""
    from scipy.optimize import linear_sum_assignment

    def iou(a, b):
        union = np.logical_or(a, b).sum()
        return 1.0 if union == 0 else np.logical_and(a, b).sum() / union

    def dice(a, b):
        total = a.sum() + b.sum()
        return 1.0 if total == 0 else 2 * np.logical_and(a, b).sum() / total

    d = lambda a, b: 1 - iou(a, b)  # noqa: E731
    sy = np.mean([d(s, y) for s in samples for y in raters])
    ss = np.mean([d(a, b) for a in samples for b in samples])
    yy = np.mean([d(a, b) for a in raters for b in raters])
    n, r = len(samples), len(raters)
    size = np.lcm(n, r)
    matrix = np.array([[iou(samples[i % n], raters[j % r]) for j in range(size)] for i in range(size)])
    rows, cols = linear_sum_assignment(-matrix)
    union_y, union_s = raters.any(0), samples.any(0)
    s_c = 1.0 if union_y.sum() == 0 and union_s.sum() == 0 else (np.logical_and(union_s, union_y).sum() / max(union_y.sum(), 1))
    d_max = np.mean([max(dice(s, y) for s in samples) for y in raters])
    spread = lambda m: [1 - dice(a, b) for a, b in itertools.combinations(m, 2)]  # noqa: E731
    vs, vy = spread(samples), spread(raters)
    d_a = 1 - (abs(max(vs) - max(vy)) + abs(min(vs) - min(vy))) / 2
    ci = 3 * s_c * d_max * d_a / max(s_c + d_max + d_a, 1e-12)
    return 2 * sy - ss - yy, matrix[rows, cols].mean(), ci


def metric_figures(size: int, device: torch.device, cases: int = 1000, loop_cases: int = 20) -> None:
    """(c): vectorised metrics over ``cases`` cases against the loop on ``loop_cases`` (extrapolated)."""
    rng = np.random.default_rng(0)
    samples = rng.random((cases, 16, size, size)) > 0.7
    raters = rng.random((cases, 4, size, size)) > 0.7
    loop = timed(lambda: [loop_metrics(samples[i], raters[i]) for i in range(loop_cases)]) * cases / loop_cases
    s, y = torch.as_tensor(samples, device=device), torch.as_tensor(raters, device=device)
    vectorised = timed(lambda: [evaluate_batch(s[i : i + 250], y[i : i + 250]) for i in range(0, cases, 250)])
    print(f"(c) metrics, {cases} cases x 16 samples x 4 raters at {size}x{size}")
    print(f"    per-pair Python loop ({loop_cases} cases timed): {loop:.1f} s  1.0x")
    print(f"    vectorised ({device}): {vectorised:.2f} s  {loop / vectorised:.1f}x")


def overhead_figures(model: ModelParams, steps: int) -> None:
    """(d): the same training budget bare and through ``kedro run --pipeline training``."""
    from cimd_pipeline.io.aligned_dataset import AlignedDataset

    data: AlignedSet = AlignedDataset(str(ROOT / "data/03_primary/aligned")).load().subset("train")
    params = TrainingParams(max_steps=steps, resume=False, progress=False, checkpoint_every=steps)
    torch.manual_seed(0)
    net = CIMD(model, data.image_channels)
    started = time.perf_counter()
    train(net, data, params, ROOT / "data/06_models/speed_probe.pt", "speed-probe")
    bare = time.perf_counter() - started
    (ROOT / "data/06_models/speed_probe.pt").unlink(missing_ok=True)
    through = kedro_run(
        "--pipeline", "training",
        params={"training.max_steps": steps, "training.resume": "false", "training.progress": "false"},
    )
    print(f"(d) training {steps} steps: bare Python {bare:.1f} s  1.0x; kedro run (+ MLflow) {through:.1f} s  "
          f"{through / bare:.2f}x (+{through - bare:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lidc", action="store_true", help="use conf/lidc's model and image size (--env lidc)")
    parser.add_argument("--env", default="base", help="conf/<env> over conf/base for the model and image size")
    parser.add_argument("--parts", default="abcd", help="which figures: any of a, b, c, d")
    parser.add_argument("--cases", type=int, default=16, help="cases sampled together in (a)")
    parser.add_argument("--probe-steps", type=int, default=20, help="steps timed for extrapolated loops")
    parser.add_argument("--overhead-steps", type=int, default=100, help="training steps for (d); 0 skips")
    args = parser.parse_args()
    env = "lidc" if args.lidc else args.env
    model_block = {**conf_block("training")["model"], **(conf_block("training", env).get("model") or {})}
    model = ModelParams.model_validate(model_block)
    size = AlignmentParams.model_validate(
        conf_block("mask_alignment", env).get("alignment", conf_block("mask_alignment")["alignment"])
    ).image_size
    device = select_device("auto")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"machine: {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"model {model.variant.value}, UNet {list(model.unet.channels)}, image {size}x{size}")
    torch.manual_seed(0)
    net = CIMD(model, 1).to(device).eval()
    if "a" in args.parts:
        sampling_figures(net, size, device, args.cases, args.probe_steps)
    if "b" in args.parts:
        training_figures(net.train(), size, device, batch=16)
    if "c" in args.parts:
        metric_figures(size, device)
    if "d" in args.parts and args.overhead_steps and env == "base":
        overhead_figures(model, args.overhead_steps)


if __name__ == "__main__":
    main()
