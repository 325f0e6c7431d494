"""``cimd-pipeline evaluate SAMPLES RATERS [--out DIR]``: the evaluator without a Kedro project.

Prints the aggregate metrics as JSON on stdout (with ``--compare``: both sets' and the paired
comparison); a file that cannot be scored ends the command
with exit status 2 and one line naming the file and the problem, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from cimd_pipeline.errors import DataError

USAGE_EXAMPLE = """examples:
  cimd-pipeline evaluate my_samples/ LIDC-IDRI-slices/ --out scores/
  cimd-pipeline evaluate samples.npz data/03_primary/aligned --split test --out scores/
  cimd-pipeline evaluate model_a/ LIDC-IDRI-slices/ --compare model_b/ --out a_vs_b/

SAMPLES: a folder with one folder of PNG masks per case (its path below SAMPLES is the case id,
e.g. LIDC-IDRI-0001/nodule-0/slice-3/*.png), an .npz (keys samples, case_ids), an .npy with
<name>.case_ids.txt beside it, or NIfTI files. RATERS: an LIDC slice tree, another rater tree
(--reader-option), or an aligned dataset written by the pipeline. MLflow: set MLFLOW_TRACKING_URI.
"""


def _option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, yaml.safe_load(value)


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(
        prog="cimd-pipeline evaluate",
        description="Score samples of any segmentation model against every rater: GED, HM-IoU, "
        "Dice_max, CI; per-case table and figures.",
        epilog=USAGE_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cli.add_argument("samples", help="samples: PNG case folders, .npz/.npy, or NIfTI")
    cli.add_argument("raters", help="rater tree (e.g. LIDC-IDRI-slices) or aligned dataset folder")
    cli.add_argument("--out", help="folder for metrics.json, per_case_metrics.csv and the figures")
    cli.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                     help="aligned dataset only: the split scored (default test)")
    cli.add_argument("--resize", action="store_true", help="resize samples of another size (nearest neighbour)")
    cli.add_argument("--threshold", type=float, help="soft samples: foreground is value > THRESHOLD")
    cli.add_argument("--only-sampled", action="store_true",
                     help="score the rater cases that have samples instead of refusing missing ones")
    cli.add_argument("--reader-option", type=_option, action="append", default=None, metavar="KEY=VALUE",
                     help="folders-reader option for a rater tree that is not LIDC's (repeatable)")
    cli.add_argument("--figure-cases", type=int, default=4, help="cases in the sample grid (default 4)")
    cli.add_argument("--compare", metavar="SAMPLES_B",
                     help="a second sample set of the same cases: paired difference SAMPLES - SAMPLES_B "
                     "per metric with its bootstrap 95%% interval (comparison.csv)")
    cli.add_argument("--run-name", help="MLflow run name (with MLFLOW_TRACKING_URI set)")
    return cli


def evaluate_main(argv: Sequence[str]) -> int:
    args = parser().parse_args(list(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from cimd_pipeline.evaluate import evaluate

    try:
        result = evaluate(
            args.samples,
            args.raters,
            args.out,
            split=args.split,
            resize=args.resize,
            threshold=args.threshold,
            only_sampled=args.only_sampled,
            reader_options=dict(args.reader_option) if args.reader_option else None,
            figure_cases=args.figure_cases,
            run_name=args.run_name,
            compare_with=args.compare,
        )
    except DataError as exc:
        sys.stderr.write(f"cimd-pipeline evaluate: {exc}\n")
        return 2
    shown: dict[str, Any] = result.summary
    if result.comparison is not None:
        shown = {"samples": result.summary, "compare": result.compared.summary,
                 "comparison": result.comparison.to_dict(orient="records")}
    sys.stdout.write(json.dumps(shown, indent=2) + "\n")
    return 0
