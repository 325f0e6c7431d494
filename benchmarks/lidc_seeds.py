"""One table of an LIDC recipe over training seeds, from each seed's evaluation ``metrics.json``.

Each seed is its own run of the recipe, training then sampling and evaluation, with the seed set
for both (docs/lidc.md, "Figures beside the published ones"), in a project folder of its own so that the runs do not
share checkpoints or outputs. This script reads the ``data/08_reporting/metrics.json`` of each,
prints one row per run and the mean ± standard deviation over runs (the spread between seeds,
next to which the slice-bootstrap interval of one run is small), and writes the table as CSV with
``--out``.

    python benchmarks/lidc_seeds.py seed0/data/08_reporting/metrics.json \\
        seed1/data/08_reporting/metrics.json seed2/data/08_reporting/metrics.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from _kedro import markdown_table

#: metrics.json key -> column; GED16 − floor is computed from the first two.
COLUMNS = {
    "ged": "GED", "ged_floor": "floor", "ged_floor_100": "floor (100)", "hm_iou": "HM-IoU",
    "dice_max": "Dice_max", "ci": "CI", "ci_var": "CI (variance)", "diversity_samples": "diversity",
    "diversity_raters": "rater diversity", "train_steps": "train steps", "train_seconds": "train s",
    "sampling_seconds": "sampling s",
}


def read_run(path: Path) -> dict[str, object]:
    """The columns of one run; SystemExit naming the file when it is missing or lacks a figure."""
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such metrics file (run the evaluation pipeline of that seed first)") from None
    except json.JSONDecodeError as error:
        raise SystemExit(f"{path}: not a JSON file ({error})") from None
    missing = [key for key in COLUMNS if key not in metrics]
    if missing:
        raise SystemExit(f"{path}: lacks {', '.join(missing)}; is it an evaluation metrics.json?")
    row: dict[str, object] = {"run": str(path), "cases": metrics["test_cases"], "N": metrics["num_samples"]}
    row.update({label: float(metrics[key]) for key, label in COLUMNS.items()})
    row["GED − floor"] = row["GED"] - row["floor"]
    return row


def seed_table(paths: list[Path]) -> pd.DataFrame:
    """One row per run, then ``mean`` and ``sd`` (sample standard deviation) over the runs."""
    runs = pd.DataFrame([read_run(path) for path in paths])
    if runs["cases"].nunique() > 1 or runs["N"].nunique() > 1:
        raise SystemExit(f"the runs scored different slices or N: {runs[['run', 'cases', 'N']].to_dict('records')}")
    figures = runs.drop(columns=["run"])
    summary = pd.DataFrame([figures.mean(), figures.std(ddof=1)], index=["mean", "sd"]).assign(run=["mean", "sd"])
    table = pd.concat([runs, summary], ignore_index=True)
    for column in ("cases", "N", "train steps"):  # counts print as counts where they are whole
        table[column] = [int(v) if float(v).is_integer() else float(v) for v in table[column]]
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", type=Path, help="the metrics.json of each seed's run")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this CSV")
    args = parser.parse_args(argv)
    if len(args.metrics) < 2:
        parser.error("give the metrics.json of at least two runs: a spread needs two seeds")
    table = seed_table(args.metrics)
    order = ["run", "cases", "N", "GED", "floor", "GED − floor", *[c for c in COLUMNS.values() if c not in ("GED", "floor")]]
    print(markdown_table(table[order]), end="")
    if args.out:
        table[order].to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
