"""Inter-rater agreement: how ambiguous is each case before any model sees it?

The per-case rater GED is the rater-rater term of the GED (mean of d = 1 - IoU over all ordered
rater pairs, diagonal included), so it reads on the same scale as the models' GED later.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cimd_pipeline.data.aligned import BLOCK_ROWS, AlignedSet, row_blocks
from cimd_pipeline.metrics import pairwise_iou


def case_agreement(masks: np.ndarray, valid: np.ndarray) -> dict[str, float | int | bool]:
    """Agreement statistics of one case's valid raters, masks (R, H, W)."""
    raters = np.asarray(masks)[np.asarray(valid, dtype=bool)]
    iou = pairwise_iou(raters, raters).double().numpy()
    r = len(raters)
    upper = iou[np.triu_indices(r, k=1)]
    return {
        "raters": r,
        "mean_pairwise_iou": float(upper.mean()) if len(upper) else float("nan"),
        "rater_ged": float((1.0 - iou).mean()),
        "all_empty": bool(raters.sum() == 0),
        "foreground_fraction": float(raters.mean()),
    }


def agreement_table(data: AlignedSet) -> pd.DataFrame:
    """One row per case: ids, split, and `case_agreement` (masks read block by block, so a
    memory-mapped set is never resident as a whole)."""
    blocks = zip(range(0, len(data), BLOCK_ROWS), row_blocks(data.masks, BLOCK_ROWS))
    stats = [case_agreement(masks, data.rater_valid[start + i]) for start, block in blocks for i, masks in enumerate(block)]
    ids = zip(data.cases["case_id"], data.cases["split"])
    return pd.DataFrame([{"case_id": cid, "split": split, **row} for (cid, split), row in zip(ids, stats)])


def agreement_summary(table: pd.DataFrame) -> dict[str, float]:
    """Dataset-level figures: share of all-empty cases and mean agreement over the rest."""
    annotated = table[~table["all_empty"]]
    return {
        "cases": float(len(table)),
        "all_empty_share": float(table["all_empty"].mean()),
        "mean_pairwise_iou": float(annotated["mean_pairwise_iou"].mean()),
        "mean_rater_ged": float(table["rater_ged"].mean()),
    }
