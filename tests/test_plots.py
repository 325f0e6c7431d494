"""Figures: long case ids (the LIDC slice tree's ``LIDC-IDRI-0002/nodule-0/slice-0``) stay readable."""

from __future__ import annotations

import numpy as np
import pytest

from cimd_pipeline.plots import case_label, rater_grid, sample_grids

LONG_IDS = ["LIDC-IDRI-0002/nodule-0/slice-0", "LIDC-IDRI-0871/nodule-12/slice-104", "x" * 45]


def _titles_inside(fig) -> list[str]:
    """Titles whose drawn box leaves the figure (cut off in the saved PNG)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.canvas.get_width_height()
    outside = []
    for ax in fig.axes:
        title = ax.title
        if not title.get_text():
            continue
        box = title.get_window_extent(renderer)
        if box.x0 < 0 or box.x1 > width or box.y1 > height:
            outside.append(title.get_text())
    return outside


@pytest.mark.parametrize("label", [*LONG_IDS, "case_7", "LIDC-IDRI-0001"])
def test_case_label_keeps_every_character_in_short_lines(label):
    wrapped = case_label(label)
    assert wrapped.replace("\n", "") == label
    assert all(len(line) <= 18 for line in wrapped.split("\n"))
    assert "\n" not in case_label("case_7")


def test_case_label_breaks_after_the_path_separators():
    assert case_label("LIDC-IDRI-0002/nodule-0/slice-0") == "LIDC-IDRI-0002/\nnodule-0/slice-0"


def test_sample_grid_titles_stay_inside_the_figure():
    rng = np.random.default_rng(0)
    cases = [
        (rng.normal(size=(1, 64, 64)), rng.random((4, 64, 64)) > 0.5, rng.random((16, 64, 64)) > 0.5, case_id)
        for case_id in LONG_IDS
    ]
    fig = sample_grids(cases)
    assert _titles_inside(fig) == []
    first_column = [fig.axes[8 * 3 * i].title.get_text() for i in range(len(LONG_IDS))]
    assert [t.replace("\n", "") for t in first_column] == LONG_IDS


def test_rater_grid_titles_stay_inside_the_figure():
    rng = np.random.default_rng(1)
    images = [rng.normal(size=(1, 64, 64)) for _ in LONG_IDS]
    masks = [rng.random((4, 64, 64)) > 0.5 for _ in LONG_IDS]
    valid = [np.ones(4, dtype=bool) for _ in LONG_IDS]
    assert _titles_inside(rater_grid(images, masks, valid, LONG_IDS)) == []
