import numpy as np
import pandas as pd
import pytest

from cimd_pipeline.data import agreement
from cimd_pipeline.data.agreement import agreement_summary, agreement_table, case_agreement
from cimd_pipeline.data.aligned import AlignedSet


def _fixture() -> AlignedSet:
    """Three 2x2 cases with hand-computable agreement."""
    masks = np.zeros((3, 3, 2, 2), np.uint8)
    # case a: raters {(0,0)}, {(0,0),(0,1)}, {(0,0)} -> IoUs 1/2, 1, 1/2
    masks[0, 0, 0, 0] = 1
    masks[0, 1, 0, :] = 1
    masks[0, 2, 0, 0] = 1
    # case b: two raters, disjoint single pixels (third rater missing) -> IoU 0
    masks[1, 0, 0, 0] = 1
    masks[1, 1, 1, 1] = 1
    # case c: all raters empty
    valid = np.array([[True, True, True], [True, True, False], [True, True, True]])
    cases = pd.DataFrame({"case_id": ["a", "b", "c"], "group_id": ["a", "b", "c"], "split": ["train"] * 3})
    return AlignedSet(np.zeros((3, 1, 2, 2), np.float32), masks, valid, cases)


def test_agreement_against_hand_computed_values():
    table = agreement_table(_fixture()).set_index("case_id")
    assert table.loc["a", "mean_pairwise_iou"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    # rater GED: mean of 1 - IoU over the 3x3 ordered pairs, diagonal included: 4 * 0.5 / 9
    assert table.loc["a", "rater_ged"] == pytest.approx(2 / 9)
    assert table.loc["b", "raters"] == 2
    assert table.loc["b", "mean_pairwise_iou"] == pytest.approx(0.0)
    assert table.loc["b", "rater_ged"] == pytest.approx(2 / 4)
    assert table.loc["c", "all_empty"] and table.loc["c", "mean_pairwise_iou"] == pytest.approx(1.0)
    assert table.loc["c", "rater_ged"] == pytest.approx(0.0)
    summary = agreement_summary(table.reset_index())
    assert summary["all_empty_share"] == pytest.approx(1 / 3)
    assert summary["mean_pairwise_iou"] == pytest.approx(((2 / 3) + 0.0) / 2)
    assert summary["mean_rater_ged"] == pytest.approx((2 / 9 + 0.5 + 0) / 3)


def test_agreement_read_block_by_block_matches_case_by_case(tmp_path, monkeypatch):
    """A memory-mapped set is scanned in blocks; every case keeps its own masks and raters."""
    rng = np.random.default_rng(0)
    masks = (rng.random((11, 3, 4, 4)) < 0.4).astype(np.uint8)
    valid = rng.random((11, 3)) < 0.8
    valid[:, 0] = True
    masks[2] = 0  # nobody drew anything
    masks[3, 1] = 0  # one rater drew nothing
    valid[4] = [True, False, False]  # one rater: no pair
    np.save(tmp_path / "masks.npy", masks)
    cases = pd.DataFrame({"case_id": [f"c{i}" for i in range(11)], "group_id": "g", "split": "test"})
    data = AlignedSet(np.zeros((11, 1, 4, 4), np.float32), np.load(tmp_path / "masks.npy", mmap_mode="r"), valid, cases)
    monkeypatch.setattr(agreement, "BLOCK_ROWS", 4)
    table = agreement_table(data)
    expected = pd.DataFrame([case_agreement(masks[i], valid[i]) for i in range(11)])
    assert table["case_id"].tolist() == cases["case_id"].tolist()
    pd.testing.assert_frame_equal(table.drop(columns=["case_id", "split"]), expected, check_dtype=False)
