import numpy as np
import pandas as pd
import pytest

from cimd_pipeline.comparison import comparison_figure, latest_runs, missed_structure, spread_cases
from cimd_pipeline.data.aligned import AlignedSet


def masks(*filled: bool, size=4) -> np.ndarray:
    out = np.zeros((len(filled), size, size), dtype=np.uint8)
    out[np.asarray(filled, dtype=bool), 1, 1] = 1
    return out


def test_missed_structure_only_where_every_rater_drew_something():
    samples = masks(False, True, False)
    assert missed_structure(samples, masks(True, True)).tolist() == [True, False, True]
    assert not missed_structure(samples, masks(True, False)).any()  # one rater saw nothing
    assert not missed_structure(samples, masks()).any()  # no valid raters


def test_latest_runs_takes_the_newest_finished_run_with_a_model_per_variant():
    runs = pd.DataFrame({
        "run_id": ["a", "b", "c", "d", "e", "f"],
        "status": ["FINISHED", "FAILED", "FINISHED", "FINISHED", "FINISHED", "FINISHED"],
        "start_time": pd.to_datetime([1, 6, 2, 3, 5, 4], unit="s"),
        "params.model.variant": ["phiseg", "phiseg", "phiseg", "cimd_aa", "prob_unet", None],
    })
    chosen = latest_runs(runs, has_model=lambda run_id: run_id != "e")
    assert chosen == {"cimd_aa": "d", "phiseg": "c"}  # b failed, e has no model, f is a comparison run
    assert list(chosen) == ["cimd_aa", "phiseg"]  # the Variant order
    assert latest_runs(pd.DataFrame({"run_id": [], "status": []}), lambda _: True) == {}


def test_spread_cases_picks_test_cases_only():
    splits = ["train", "test", "test", "val", "test", "test"]
    data = AlignedSet(np.zeros((6, 1, 4, 4), np.float32), np.zeros((6, 2, 4, 4), np.uint8), np.ones((6, 2), bool),
                      pd.DataFrame({"case_id": list("abcdef"), "split": splits}))
    assert spread_cases(data, 2).tolist() == [1, 5]
    assert spread_cases(data, 10).tolist() == [1, 2, 4, 5]
    with pytest.raises(ValueError, match="no test cases"):
        spread_cases(data.take(np.array([0, 3])), 2)


def test_figure_has_a_row_per_model_and_red_frames_on_missed_structures():
    image = np.zeros((1, 4, 4), np.float32)
    cases = [(image, masks(True, True), "case 1"), (image, masks(True, False), "case 2")]
    drawn = np.stack([masks(False, True, True), masks(False, False, False)])  # (cases, N, H, W)
    figure = comparison_figure(cases, {"cimd": drawn, "phiseg": drawn[::-1].copy()}, cols=2)
    axes = np.asarray(figure.axes).reshape(2 * (1 + 2 + 2), 3)
    red = [ax for ax in figure.axes if ax.axison and ax.spines["top"].get_edgecolor() == (1.0, 0.0, 0.0, 1.0)]
    # case 1 (both raters drew): cimd misses once, phiseg (case 2's empty samples) three times
    assert len(red) == 4
    titles = [ax.get_title(loc="left") for ax in axes[:, 0]]
    assert titles[:4] == ["case 1", "cimd", "", "phiseg"]
    assert not axes[2, 1].axison  # 3 samples over 2 rows of 2
