"""Side-by-side samples of several trained models on the same test cases (the CIMD paper's
supplementary Fig. 4).

The paper compares CIMD with the Probabilistic U-Net and PHiSeg by showing, for the same images,
every rater's mask and 16 samples of each model; a sample that is empty where every rater drew a
structure is the failure a clinician notices first, so it gets a red frame. The functions here
pick the runs and cases, draw the samples and build the figure; ``benchmarks/compare_models.py``
wires them to MLflow and the aligned data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from cimd_pipeline.config import SamplingParams, Variant
from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.ensembles import draw_ensembles
from cimd_pipeline.models.trained import TrainedModel

logger = logging.getLogger(__name__)

__all__ = ["comparison_figure", "draw_for_cases", "latest_runs", "missed_structure", "spread_cases"]


def missed_structure(samples: np.ndarray, raters: np.ndarray) -> np.ndarray:
    """Bool (N,): sample empty although every rater (R, H, W) drew something (False if R == 0)."""
    if len(raters) == 0 or not raters.reshape(len(raters), -1).any(1).all():
        return np.zeros(len(samples), dtype=bool)
    return ~samples.reshape(len(samples), -1).any(1)


def latest_runs(runs: pd.DataFrame, has_model: Callable[[str], bool]) -> dict[str, str]:
    """The newest FINISHED run with a model artefact per ``params.model.variant``, by variant order.

    Args:
        runs: ``mlflow.search_runs`` table (``run_id``, ``status``, ``start_time``, params).
        has_model: whether a run id holds ``model/model.pt`` (runs of evaluation alone do not).
    """
    column = "params.model.variant"
    if column not in runs:
        return {}
    finished = runs[(runs["status"] == "FINISHED") & runs[column].notna()].sort_values("start_time", ascending=False)
    chosen: dict[str, str] = {}
    for variant, run_id in zip(finished[column], finished["run_id"]):
        if variant not in chosen and has_model(run_id):
            chosen[variant] = run_id
    order = {v.value: i for i, v in enumerate(Variant)}
    return dict(sorted(chosen.items(), key=lambda item: order.get(item[0], len(order))))


def spread_cases(data: AlignedSet, count: int) -> np.ndarray:
    """Positions of ``count`` test cases spread over the split (the evaluation figure's rule)."""
    test = np.flatnonzero(data.cases["split"].to_numpy() == "test")
    if len(test) == 0:
        raise ValueError("the aligned data has no test cases")
    return test[np.unique(np.linspace(0, len(test) - 1, max(min(count, len(test)), 1)).astype(int))]


def draw_for_cases(
    trained: TrainedModel, data: AlignedSet, rows: np.ndarray, params: SamplingParams, device: torch.device
) -> np.ndarray:
    """Binary samples uint8 (len(rows), N, H, W) of one model for the cases at ``rows``."""
    if tuple(trained.image_size) != data.image_size:
        raise ValueError(f"model was trained at {tuple(trained.image_size)}, the aligned data is {data.image_size}")
    net = trained.build()
    images = np.asarray(data.images[rows], dtype=np.float32)
    ids = data.cases["case_id"].to_numpy()[rows]
    return draw_ensembles(net, images, ids, params, device).binary


def comparison_figure(
    cases: Sequence[tuple[np.ndarray, np.ndarray, str]], samples: dict[str, np.ndarray], cols: int = 16
) -> Figure:
    """One block per case: image and raters on the first row, then one row per model.

    Args:
        cases: (image (C, H, W), valid rater masks (R, H, W), title) per case.
        samples: model label -> uint8 samples (len(cases), N, H, W); N > ``cols`` wraps.
        cols: samples per row.

    Samples that are empty where every rater drew something get a red frame.
    """
    cols = min(cols, max(s.shape[1] for s in samples.values()))
    per_model = {label: int(np.ceil(s.shape[1] / cols)) for label, s in samples.items()}
    block = 1 + sum(per_model.values())
    width = max(cols, max(len(r) for _, r, _ in cases) + 1)
    fig, axes = plt.subplots(block * len(cases), width, figsize=(0.9 * width, 1.0 * block * len(cases)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")

    def show(ax, array: np.ndarray, title: str = "", frame: str = "lightgray", **kwargs) -> None:
        ax.axis("on")
        ax.imshow(array, cmap="gray", interpolation="nearest", **kwargs)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=6, loc="left")
        for spine in ax.spines.values():
            spine.set_edgecolor(frame)
            spine.set_linewidth(2 if frame == "red" else 0.5)

    for c, (image, raters, title) in enumerate(cases):
        top = c * block
        show(axes[top, 0], image[0], title)
        for r, mask in enumerate(raters):
            show(axes[top, r + 1], mask, f"rater {r + 1}", vmin=0, vmax=1)
        row = top + 1
        for label, drawn in samples.items():
            missed = missed_structure(drawn[c], raters)
            for i, mask in enumerate(drawn[c]):
                show(axes[row + i // cols, i % cols], mask, label if i == 0 else "", "red" if missed[i] else "lightgray",
                     vmin=0, vmax=1)
            row += per_model[label]
    fig.tight_layout(pad=0.3)
    return fig
