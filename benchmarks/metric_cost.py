"""Cost of scoring a test split: 3,107 cases x 100 samples x 4 raters at 128 x 128 by default.

Times the evaluation pipeline's own scoring function (`scoring.score_samples`: GED100, GED16,
HM-IoU, Dice_max, CI in both readings, the floors) plus the summary with its bootstrap intervals
(`scoring.summarise`), and prints two ratios against a plain per-pair Python loop (GED, HM-IoU on
the lcm-expanded matrix, Dice_max, CI; the loop of benchmarks/speed.py):

* the pipeline's path, and
* the previous vectorised path (one float64 Gram matrix per case over all pixels, no
  compaction to the used pixels), re-created here by swapping the Gram function (its input
  checks and unions are today's faster ones, so this understates the previous cost).

The loop and the previous path are timed on a few cases and extrapolated to the full count (said
so in the output). Masks: ``nodule`` (default) draws raters and samples from the synthetic
benchmark's LIDC-like nodule rater model at the chosen size (a few per cent of the image, like
LIDC nodules); ``dense`` draws independent pixels with density 0.3 everywhere, the worst case
for the compaction. To keep memory small, a pool of ``--pool`` distinct cases is generated once
and scored over and over until ``--cases`` cases are scored (the cost depends on the masks, not
on which case they belong to).

    python benchmarks/metric_cost.py                        # 3,107 x 100 x 4 at 128 x 128
    python benchmarks/metric_cost.py --masks dense --cases 500
    python benchmarks/metric_cost.py --device cuda          # when a GPU is there
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from speed import loop_metrics

from cimd_pipeline import metrics
from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.data.synthetic import SyntheticConfig, make_case
from cimd_pipeline.ensembles import SampleSet
from cimd_pipeline.scoring import score_samples, summarise


def pool_of_cases(kind: str, pool: int, samples: int, raters: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 samples [pool, N, H, W] and raters [pool, R, H, W]."""
    if kind == "dense":
        rng = np.random.default_rng(0)
        draw = lambda n: (rng.random((n, size, size)) < 0.3).astype(np.uint8)
        return np.stack([draw(samples) for _ in range(pool)]), np.stack([draw(raters) for _ in range(pool)])
    cfg = SyntheticConfig(num_cases=pool, image_size=size, oracle_samples=0, family_weights=(1.0, 0.0, 0.0))
    s, y = [], []
    for index in range(pool):
        _, model = make_case(cfg, index, seed=0)
        rng = np.random.default_rng(index)
        y.append(model.draw(raters, rng))
        s.append(model.draw(samples, rng))
    return np.stack(s), np.stack(y)


def dense_gram(s: torch.Tensor, y: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """The previous path's Gram: float64 over every pixel (``used`` ignored)."""
    x = torch.cat([s, y], dim=1).double()
    return torch.bmm(x, x.transpose(1, 2))


@contextmanager
def gram_swapped(fn):
    original = metrics._gram
    metrics._gram = fn
    try:
        yield
    finally:
        metrics._gram = original


def score_split(samples: np.ndarray, raters: np.ndarray, cases: int, device: str, resamples: int) -> tuple[float, float, pd.DataFrame]:
    """Seconds to score ``cases`` cases with the pipeline's function, cycling the pool; seconds
    of the summary with intervals; the per-case table."""
    pool = len(samples)
    ids = np.array([f"case{i:05d}" for i in range(pool)])
    table = pd.DataFrame({"case_id": ids, "group_id": ids, "split": "test"})
    images = np.zeros((pool, 1, *raters.shape[2:]), np.float32)
    data = AlignedSet(images, raters, np.ones(raters.shape[:2], bool), table)
    started = time.perf_counter()
    parts, done = [], 0
    while done < cases:
        take = min(pool, cases - done)
        chunk = SampleSet(ids[:take], samples[:take], samples[:take], {})
        parts.append(score_samples(chunk, data, device=device))
        done += take
    scoring = time.perf_counter() - started
    per_case = pd.concat(parts, ignore_index=True)
    started = time.perf_counter()
    summarise(per_case, {}, resamples=resamples)
    return scoring, time.perf_counter() - started, per_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=3107)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--raters", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--masks", choices=("nodule", "dense"), default="nodule")
    parser.add_argument("--pool", type=int, default=64, help="distinct cases generated and cycled")
    parser.add_argument("--loop-cases", type=int, default=2, help="cases the per-pair loop is timed on")
    parser.add_argument("--previous-cases", type=int, default=64, help="cases the previous path is timed on")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see docs/metrics.md on 1 vs 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the summary")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"machine: {args.device} ({name}), {os.cpu_count()} CPUs visible, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    samples, raters = pool_of_cases(args.masks, args.pool, args.samples, args.raters, args.size)
    share = float(np.concatenate([samples, raters], 1).mean())
    print(f"scoring {args.cases} cases x {args.samples} samples x {args.raters} raters at {args.size}x{args.size} "
          f"({args.masks} masks, {share:.1%} of pixels set; a pool of {args.pool} cases scored in turn)")

    loop_cases = min(args.loop_cases, args.pool)
    started = time.perf_counter()
    for i in range(loop_cases):
        loop_metrics(samples[i].astype(bool), raters[i].astype(bool))
    loop = (time.perf_counter() - started) * args.cases / loop_cases

    previous_cases = min(args.previous_cases, args.pool)
    with gram_swapped(dense_gram):
        seconds, _, _ = score_split(samples[:previous_cases], raters[:previous_cases], previous_cases, args.device, 1)
    previous = seconds * args.cases / previous_cases

    score_split(samples[:4], raters[:4], 4, args.device, 10)  # warm-up
    scoring, summary, per_case = score_split(samples, raters, args.cases, args.device, args.resamples)
    total = scoring + summary
    print(f"  per-pair Python loop ({loop_cases} cases timed, extrapolated): {loop:9.1f} s  1.0x")
    print(f"  previous vectorised path, float64 Gram over all pixels ({previous_cases} cases timed, "
          f"extrapolated): {previous:9.1f} s  {loop / previous:.1f}x")
    print(f"  pipeline path (score_samples, all {args.cases} cases): {scoring:9.1f} s  {loop / scoring:.1f}x")
    print(f"  + summary with {args.resamples}-resample bootstrap intervals: {summary:.2f} s; "
          f"wall time {total:.1f} s, {loop / total:.1f}x the loop, {previous / total:.1f}x the previous path")
    means = {k: per_case[k].mean() for k in ("ged", "ged16", "ged_floor", "hm_iou", "dice_max", "ci") if k in per_case}
    print("  means: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))


if __name__ == "__main__":
    main()
