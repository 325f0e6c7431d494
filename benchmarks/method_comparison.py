"""The CIMD paper's method comparison in one command: every variant, every seed, two training budgets.

CIMD and the baselines cost very different amounts per training step, so "the same budget" has two
readings and the table gives both:

* ``steps``: every variant trains ``training.max_steps`` steps (conf, or ``--steps``);
* ``time``: the baselines train as many steps as fit into the reference variant's (CIMD-AA's)
  training time, from each variant's per-step cost measured *alone* before anything else runs.

Runs go to ``--jobs`` worker processes that share the machine (on a GPU node: one GPU, many
launch-bound small models), so their own wall times are loaded; the table's ``train_seconds`` and
``seconds_per_16_samples`` are therefore the costs measured alone. The chain is the pipeline's own
node code run in-process (`_direct`), so this needs torch, MONAI and pydantic but neither Kedro nor
MLflow. Each finished run is one CSV under ``OUT/rows``; an interrupted comparison resumes where it
stopped. Writes ``OUT/method_comparison.{csv,md,png}``.

    python benchmarks/method_comparison.py --seeds 0 1 2 --jobs 8
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from _direct import load_parameters, prepare_data, run_chain
from _kedro import ROOT, parse_params
from _workers import run_workers, stop_if_failed
from ablation import VARIANTS, plot, seconds_per_16_samples, summarise

QUALITY = ("ged", "hm_iou", "dice_max", "ci", "ged_oracle")
TABLE = ("steps", *QUALITY, "train_seconds", "seconds_per_16_samples")
logger = logging.getLogger("method_comparison")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--time-variants", nargs="*", default=["prob_unet", "phiseg"],
                        help="variants that also get the equal-time budget")
    parser.add_argument("--reference", default="cimd_aa", help="variant whose training time sets the budget")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: training.max_steps)")
    parser.add_argument("--cost-steps", type=int, nargs=2, default=[50, 250], metavar=("N1", "N2"),
                        help="per-step cost = (time(N2) - time(N1)) / (N2 - N1), each variant alone")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--env", default=None, help="conf/<env> over conf/base")
    parser.add_argument("--params", default="", help="more parameters, 'a.b=1,c.d=2'")
    parser.add_argument("--out", type=Path, default=ROOT / "data/08_reporting/method_comparison")
    parser.add_argument("--report", action="store_true", help="only tabulate the runs already finished")
    parser.add_argument("--worker", nargs=4, metavar=("VARIANT", "SEED", "BUDGET", "STEPS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def parameters(args: argparse.Namespace, variant: str, seed: int, steps: int) -> dict:
    overrides = parse_params(args.params)
    overrides.update({"model.variant": variant, "training.seed": seed, "sampling.seed": seed,
                      "training.max_steps": steps, "training.progress": False, "sampling.progress": False})
    return load_parameters(args.env, overrides)


def default_steps(args: argparse.Namespace) -> int:
    return args.steps or int(load_parameters(args.env)["training"]["max_steps"])


def measure_costs(args: argparse.Namespace, path: Path) -> pd.DataFrame:
    """Seconds per training step and per 16 samples of each variant, alone on the machine."""
    if path.exists():
        return pd.read_csv(path)
    first, second = args.cost_steps
    data = prepare_data(parameters(args, args.reference, 0, first))
    rows = []
    for variant in args.variants:
        short = run_chain(data, parameters(args, variant, 0, first), sample=False)
        long = run_chain(data, parameters(args, variant, 0, second))
        rows.append({
            "variant": variant,
            "step_seconds": (long["train_seconds"] - short["train_seconds"]) / (second - first),
            "seconds_per_16_samples": seconds_per_16_samples(long),
        })
        logger.info("cost of %s: %.4f s/step, %.3f s per 16 samples", variant, rows[-1]["step_seconds"],
                    rows[-1]["seconds_per_16_samples"])
    costs = pd.DataFrame(rows)
    costs.to_csv(path, index=False)
    return costs


def plan(args: argparse.Namespace, costs: pd.DataFrame) -> list[tuple[str, int, str, int]]:
    """(variant, seed, budget, steps) for every run; equal-time steps from the measured costs."""
    steps = default_steps(args)
    step_seconds = costs.set_index("variant")["step_seconds"]
    budget = steps * step_seconds[args.reference]
    time_variants = [v for v in args.time_variants if v in args.variants]
    jobs = []
    for seed in args.seeds:  # seed by seed, so that a cut-off comparison still has whole seeds
        jobs += [(variant, seed, "steps", steps) for variant in args.variants]
        jobs += [(variant, seed, "time", max(1, round(budget / step_seconds[variant]))) for variant in time_variants]
    return jobs


def row_path(out: Path, variant: str, seed: int, budget: str) -> Path:
    return out / "rows" / f"{variant}-{seed}-{budget}.csv"


def work(args: argparse.Namespace) -> None:
    """One run in this process: train, sample, score; one CSV row, written atomically."""
    variant, seed, budget, steps = args.worker[0], int(args.worker[1]), args.worker[2], int(args.worker[3])
    params = parameters(args, variant, seed, steps)
    summary = run_chain(prepare_data(params), params)
    row = {"variant": variant, "seed": seed, "budget": budget, "steps": steps,
           **{k: summary.get(k, float("nan")) for k in QUALITY},
           "loaded_train_seconds": summary["train_seconds"], "loaded_sampling_seconds": summary["sampling_seconds"],
           "device": machine()}
    target = row_path(args.out, variant, seed, budget)
    partial = target.with_suffix(".part")
    pd.DataFrame([row]).to_csv(partial, index=False)
    partial.replace(target)


def machine() -> str:
    """The accelerator (GPU name) or the CPU a run used, for the table's title."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {os.cpu_count()} cores"


def launch(args: argparse.Namespace, job: tuple[str, int, str, int], threads: int) -> str:
    variant, seed, budget, steps = job
    command = [sys.executable, __file__, "--worker", variant, str(seed), budget, str(steps), "--out", str(args.out),
               "--params", args.params] + (["--env", args.env] if args.env else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "KEDRO_DISABLE_TELEMETRY": "1"}
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return f"FAILED {variant} seed {seed} ({budget}): {proc.stderr[-2000:]}"
    return f"done {variant} seed {seed} ({budget}, {steps} steps) in {time.perf_counter() - started:.0f} s"


def report(args: argparse.Namespace, costs: pd.DataFrame) -> pd.DataFrame:
    """Combine the rows with the alone-costs into the csv, markdown table and figure."""
    paths = sorted((args.out / "rows").glob("*.csv"))
    if not paths:
        raise SystemExit(f"no finished runs under {args.out / 'rows'}")
    rows = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    rows = rows.merge(costs, on="variant", how="left")
    rows["train_seconds"] = rows["steps"] * rows["step_seconds"]
    order = {v: i for i, v in enumerate(VARIANTS)}
    rows = rows.sort_values(["budget", "variant", "seed"],
                            key=lambda c: c.map(order) if c.name == "variant" else c)
    rows.to_csv(args.out / "method_comparison.csv", index=False)
    device = ", ".join(sorted(set(rows["device"].astype(str))))
    table = summarise(rows, TABLE, by=("budget", "variant"))
    text = (f"# Method comparison ({device})\n\n`train_seconds` and `seconds_per_16_samples` are costs measured "
            f"with each variant alone; `steps` budget: {default_steps(args)} steps each, `time` budget: "
            f"{args.reference}'s training time.\n\n{table}")
    (args.out / "method_comparison.md").write_text(text)
    plot(rows, args.out / "method_comparison.png", by=("variant", "budget"))
    print(text)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.worker:
        work(args)
        return
    unknown = set(args.variants) - set(VARIANTS)
    if unknown or args.reference not in args.variants:
        raise SystemExit(f"unknown variants {sorted(unknown)} or --reference {args.reference!r} not among --variants")
    (args.out / "rows").mkdir(parents=True, exist_ok=True)
    if args.report:
        report(args, pd.read_csv(args.out / "costs.csv"))
        return
    costs = measure_costs(args, args.out / "costs.csv")
    jobs = [job for job in plan(args, costs) if not row_path(args.out, job[0], job[1], job[2]).exists()]
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    failed = run_workers(jobs, lambda job: launch(args, job, threads), args.jobs)
    report(args, costs)
    stop_if_failed(failed, len(jobs))


if __name__ == "__main__":
    main()
