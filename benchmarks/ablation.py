"""Ablation: the CIMD paper's supplementary Tables 1-3 on the synthetic benchmark, one MLflow run per variant and seed.

Every variant trains on the same aligned data with the same budget and seed, then samples and is
scored by the same code. Writes ``data/08_reporting/ablation.csv`` (one row per run),
``ablation.md`` (mean ± std over seeds) and ``ablation.png``.

    python benchmarks/ablation.py --steps 1500 --seeds 0 1 2

Runs spread over several invocations or project copies (e.g. two parallel streams with
``OMP_NUM_THREADS=1``) are combined without training anything by

    python benchmarks/ablation.py --summarise streamA/ablation.csv streamB/ablation.csv
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from _kedro import ROOT, kedro_run, parse_params, read_metrics, tag_latest_run  # noqa: E402

VARIANTS = ("cimd_aa", "cimd_fc", "ddpm_det", "ddpm_prob", "prob_unet", "phiseg")  # last two: baselines (docs/baselines.md)
COLUMNS = ("ged", "hm_iou", "dice_max", "ci", "ged_oracle", "train_seconds", "sampling_seconds",
           "seconds_per_16_samples")
logger = logging.getLogger("ablation")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: conf)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training/sampling seeds")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help="model.variant values")
    parser.add_argument("--device", default=None, help="training.device (auto, cpu, cuda, mps)")
    parser.add_argument("--env", default=None, help="Kedro environment (default: base + local)")
    parser.add_argument("--sampling-steps", type=int, default=None, help="sampling.steps (default: conf)")
    parser.add_argument("--reuse-data", action="store_true", help="skip ingestion and alignment")
    parser.add_argument("--extra", default="", help="more Kedro params, 'a.b=1,c.d=2'")
    parser.add_argument("--summarise", nargs="+", metavar="CSV", default=None,
                        help="only combine these ablation.csv files into the table and figure")
    return parser.parse_args()


def seconds_per_16_samples(metrics: dict) -> float:
    """Seconds to draw 16 samples for one image (the paper's speed comparison), from metrics.json."""
    try:
        return metrics["sampling_seconds"] / metrics["test_cases"] * 16 / metrics["num_samples"]
    except (KeyError, TypeError, ZeroDivisionError):
        return float("nan")


def summarise(rows: pd.DataFrame, columns: tuple[str, ...] = COLUMNS, by: tuple[str, ...] = ("variant",)) -> str:
    """Markdown table of mean ± std per group (std over seeds; blank with one seed)."""
    lines = ["| " + " | ".join(by) + " | runs | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + len(by) + 1) + "|"]
    for key, group in rows.groupby(list(by), sort=False):
        cells = []
        for column in columns:
            values = group[column]
            if values.nunique() <= 1:  # a setting (steps) or a data property (ged_oracle): no spread
                cells.append(f"{values.iloc[0]:g}" if values.iloc[0] == round(values.iloc[0]) else f"{values.iloc[0]:.3f}")
            else:
                cells.append(f"{values.mean():.3f} ± {values.std():.3f}")
        lines.append("| " + " | ".join(map(str, key)) + f" | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: pd.DataFrame, path: Path, by: tuple[str, ...] = ("variant",)) -> None:
    """GED, HM-IoU, Dice_max and CI per group: mean with the std over seeds, oracle GED dashed."""
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
    for ax, metric in zip(axes, ("ged", "hm_iou", "dice_max", "ci")):
        stats = rows.groupby(list(by), sort=False)[metric].agg(["mean", "std"])
        labels = ["\n".join(map(str, key)) if isinstance(key, tuple) else str(key) for key in stats.index]
        ax.bar(labels, stats["mean"], yerr=stats["std"].fillna(0), color="tab:blue")
        if metric == "ged":
            ax.axhline(rows["ged_oracle"].mean(), color="k", ls="--", lw=1, label="oracle")
            ax.legend(fontsize=7)
        ax.set_title(metric + (" (lower is better)" if metric == "ged" else ""), fontsize=9)
        ax.tick_params(axis="x", labelrotation=60 if len(by) > 1 else 30, labelsize=6 if len(by) > 1 else 7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(table: pd.DataFrame, title: str) -> None:
    out = ROOT / "data/08_reporting"
    table.to_csv(out / "ablation.csv", index=False)
    summary = summarise(table)
    (out / "ablation.md").write_text(f"# {title}\n\n" + summary)
    plot(table, out / "ablation.png")
    print(summary)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.summarise:
        table = pd.concat([pd.read_csv(path) for path in args.summarise], ignore_index=True)
        order = {v: i for i, v in enumerate(VARIANTS)}
        table = table.sort_values(["variant", "seed"], key=lambda c: c.map(order) if c.name == "variant" else c)
        write_report(table, "Ablation (combined: " + ", ".join(args.summarise) + ")")
        return
    if not args.reuse_data:
        logger.info("preparing data: %.0f s", kedro_run("--pipelines", "data_ingestion,mask_alignment", env=args.env))
    group = time.strftime("ablation-%Y%m%d-%H%M%S")
    rows = []
    for seed in args.seeds:
        for variant in args.variants:
            params = {"model.variant": variant, "training.seed": seed, "sampling.seed": seed,
                      "training.resume": "false", "training.progress": "false", "sampling.progress": "false"}
            if args.steps:
                params["training.max_steps"] = args.steps
            if args.device:
                params["training.device"] = args.device
            if args.sampling_steps:
                params["sampling.steps"] = args.sampling_steps
            params.update(parse_params(args.extra))
            wall = kedro_run("--pipelines", "training,sampling,evaluation", env=args.env, params=params)
            metrics = read_metrics()
            metrics["seconds_per_16_samples"] = seconds_per_16_samples(metrics)
            run_id = tag_latest_run({"variant": variant, "seed": str(seed), "ablation": group})
            rows.append({"variant": variant, "seed": seed, "run_id": run_id, "wall_seconds": wall,
                         **{c: metrics.get(c, float("nan")) for c in COLUMNS}})
            logger.info("%s seed %d: GED %.3f (oracle %.3f), %.0f s", variant, seed, metrics["ged"],
                        metrics.get("ged_oracle", float("nan")), wall)
    write_report(pd.DataFrame(rows), f"Ablation {group}")


if __name__ == "__main__":
    main()
