"""``training.all_raters``: every valid rater of an image in the same step, at the same cost.

By default each of the ``batch_size`` rows of a step is one drawn image with one rater drawn by the
model (`cimd_pipeline.models.cimd.pick_raters`). With ``all_raters`` a row is an (image, rater)
pair instead: images drawn without replacement are taken in draw order and each contributes one row per valid
rater until ``batch_size`` rows are filled, so a step sees fewer images but all of their raters'
masks, and costs what a default step costs. Only the last image taken can be cut short (its first
valid raters, in a rotation drawn for it). Everything is drawn on the CPU from the batch-index
generator, for the whole global batch, so resume and N-process runs see the same rows.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def draw_rater_rows(
    rater_valid: np.ndarray, rows: int, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Case and rater index (``rows`` each) of the step's rows, sorted by case then rater.

    ``rater_valid`` is the train split's bool (N, R) table. The images are drawn without
    replacement (a permutation of the split), so no (image, rater) pair comes twice in a step
    unless the split holds fewer pairs than ``rows``; then the next permutation continues.
    """
    rotation = int(torch.randint(0, rater_valid.shape[1], (1,), generator=generator))
    case_rows: list[int] = []
    rater_rows: list[int] = []
    while len(case_rows) < rows:
        for case in torch.randperm(len(rater_valid), generator=generator).numpy():
            raters = np.flatnonzero(rater_valid[case])
            left = rows - len(case_rows)
            if len(raters) > left:
                raters = np.sort(np.roll(raters, -rotation)[:left])
            case_rows.extend([int(case)] * len(raters))
            rater_rows.extend(int(r) for r in raters)
            if len(case_rows) == rows:
                break
    order = np.lexsort((rater_rows, case_rows))
    return np.asarray(case_rows)[order], np.asarray(rater_rows)[order]


def one_rater(masks: Tensor, raters: Tensor) -> tuple[Tensor, Tensor]:
    """Masks (B, 1, H, W) of the given rater per row and an all-true validity (B, 1), from the
    batch's masks (B, R, H, W) and rater indices (B,): the model's one-rater draw then returns it."""
    chosen = masks[torch.arange(len(masks), device=masks.device), raters][:, None]
    return chosen, torch.ones((len(masks), 1), dtype=torch.bool, device=masks.device)
