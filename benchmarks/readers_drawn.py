"""An evaluation's per-case figures grouped by how many of a case's raters drew anything.

On LIDC most of the ambiguity is whether a lesion is there at all: of four readers, one, some or
all drew it. A model whose samples spread wider than the readers (``diversity_samples`` above
``diversity_raters``) may do so everywhere or only where the readers agree; this table says which,
with GED, its floor and GED's terms per group (docs/metrics.md). It reads the evaluation's
``per_case_metrics.csv`` and the aligned dataset that holds the raters' masks.

    python benchmarks/readers_drawn.py --per-case data/08_reporting/per_case_metrics.csv \\
        --aligned data/03_primary/aligned
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from _kedro import markdown_table

from cimd_pipeline.io.aligned_dataset import AlignedDataset
from cimd_pipeline.scoring import rows_for

FIGURES = ("ged", "ged_floor", "ged_cross", "diversity_samples", "diversity_raters", "hm_iou")


def raters_drawing(masks: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per case (masks (B, R, H, W), valid (B, R)): the number of valid raters and of those whose
    mask is not empty."""
    valid = np.asarray(valid, dtype=bool)
    drew = np.asarray(masks).reshape(*valid.shape, -1).any(axis=-1) & valid
    return valid.sum(axis=1), drew.sum(axis=1)


def group_table(per_case: pd.DataFrame, aligned) -> pd.DataFrame:
    """Mean figures and case count per (raters, raters who drew); the cases of ``per_case`` only."""
    try:
        rows = rows_for(per_case["case_id"].to_numpy(), aligned)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    raters, drew = raters_drawing(aligned.masks[rows], aligned.rater_valid[rows])
    table = per_case.assign(raters=raters, drew=drew)
    grouped = table.groupby(["raters", "drew"])
    out = grouped[list(FIGURES)].mean().assign(cases=grouped.size()).reset_index()
    total = table[list(FIGURES)].mean().to_frame().T.assign(raters="all", drew="all", cases=len(table))
    return pd.concat([out, total], ignore_index=True)[["raters", "drew", "cases", *FIGURES]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-case", type=Path, required=True, help="the evaluation's per_case_metrics.csv")
    parser.add_argument("--aligned", default="data/03_primary/aligned", help="the aligned dataset folder")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this CSV")
    args = parser.parse_args(argv)
    per_case = pd.read_csv(args.per_case)
    lacking = [c for c in ("case_id", *FIGURES) if c not in per_case]
    if lacking:
        raise SystemExit(f"{args.per_case}: lacks {', '.join(lacking)}; is it an evaluation's per_case_metrics.csv?")
    table = group_table(per_case, AlignedDataset(args.aligned).load())
    print(markdown_table(table), end="")
    if args.out:
        table.to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
