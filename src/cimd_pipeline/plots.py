"""Figures a person would rather look at than a table: rater masks, agreement, sample grids.

Functions return matplotlib figures and never save them; the catalog decides where they go.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

#: characters of a 7-point title that fit over one panel (1.25-1.4 inches wide)
LABEL_WIDTH = 18


def case_label(label: str, width: int = LABEL_WIDTH) -> str:
    """``label`` wrapped into lines of at most ``width`` characters, broken after ``/`` where it can.

    A title is centred over its panel: a case id such as ``LIDC-IDRI-0002/nodule-0/slice-0`` is
    wider than the panel and, over the first column, ran off the figure's left edge.
    """
    lines: list[str] = []
    for part in label.replace("/", "/\n").split("\n"):
        if lines and len(lines[-1]) + len(part) <= width:
            lines[-1] += part
        else:
            lines.extend(textwrap.wrap(part, width, break_long_words=True, break_on_hyphens=False) or [part])
    return "\n".join(lines)


def _show(ax, array: np.ndarray, title: str = "", cmap: str = "gray", **kwargs) -> None:
    ax.imshow(array, cmap=cmap, interpolation="nearest", **kwargs)
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def rater_grid(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    rater_valid: Sequence[np.ndarray],
    labels: Sequence[str],
) -> Figure:
    """One row per case: the image's first channel, then every rater's mask (missing raters blank)."""
    raters = max(len(v) for v in rater_valid)
    fig, axes = plt.subplots(len(images), raters + 1, figsize=(1.4 * (raters + 1), 1.5 * len(images)), squeeze=False)
    for row, (image, mask, valid, label) in enumerate(zip(images, masks, rater_valid, labels)):
        _show(axes[row, 0], image[0], case_label(label))
        for r in range(raters):
            if r < len(valid) and valid[r]:
                _show(axes[row, r + 1], mask[r], f"rater {r + 1}", vmin=0, vmax=1)
            else:
                axes[row, r + 1].axis("off")
    fig.tight_layout()
    return fig


def agreement_histogram(table: pd.DataFrame) -> Figure:
    """Histograms of per-case mean pairwise IoU and rater GED, split by all-empty or not."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, column in zip(axes, ("mean_pairwise_iou", "rater_ged")):
        values = table.loc[~table["all_empty"], column].dropna()
        ax.hist(values, bins=20, color="tab:blue", alpha=0.8)
        ax.set_xlabel(column)
        ax.set_ylabel("cases")
    axes[0].set_title(f"inter-rater agreement ({int(table['all_empty'].sum())} all-empty cases left out)", fontsize=8)
    fig.tight_layout()
    return fig


def sample_grids(cases: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, str]], cols: int = 8) -> Figure:
    """The paper's Fig. 4 layout, one block per case: image, raters, mean and variance maps on the
    first row, then the N samples ``cols`` per row.

    Args:
        cases: (image (C, H, W), valid rater masks (R, H, W), samples (N, H, W), title) per case.
    """
    blocks = [1 + int(np.ceil(len(s) / cols)) for _, _, s, _ in cases]
    width = max(cols, max(len(r) for _, r, _, _ in cases) + 3)
    fig, axes = plt.subplots(sum(blocks), width, figsize=(1.25 * width, 1.35 * sum(blocks)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    top = 0
    for (image, raters, samples, title), rows in zip(cases, blocks):
        _show(axes[top, 0], image[0], case_label(title))
        for r, mask in enumerate(raters):
            _show(axes[top, r + 1], mask, f"rater {r + 1}", vmin=0, vmax=1)
        binary = samples.astype(np.float32)
        _show(axes[top, len(raters) + 1], binary.mean(0), "sample mean", cmap="viridis", vmin=0, vmax=1)
        _show(axes[top, len(raters) + 2], binary.var(0), "variance", cmap="magma", vmin=0, vmax=0.25)
        for i, mask in enumerate(samples):
            _show(axes[top + 1 + i // cols, i % cols], mask, f"sample {i + 1}", vmin=0, vmax=1)
        top += rows
    fig.tight_layout()
    return fig


def metric_histograms(per_case: pd.DataFrame, columns: Sequence[str]) -> Figure:
    """One histogram per metric over the test cases."""
    fig, axes = plt.subplots(1, len(columns), figsize=(2.6 * len(columns), 2.6), squeeze=False)
    for ax, column in zip(axes[0], columns):
        ax.hist(per_case[column].dropna(), bins=20, color="tab:green", alpha=0.8)
        ax.set_title(column, fontsize=8)
    fig.tight_layout()
    return fig
