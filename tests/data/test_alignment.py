import numpy as np
import pytest

from cimd_pipeline.data.splits import assign_splits
from cimd_pipeline.data.alignment import (
    Normalisation,
    ResizeMode,
    align_cases,
    binarise,
    fit_to_size,
    normalise,
    slice_volume,
    stack_cases,
)
from cimd_pipeline.data.cases import Case
from cimd_pipeline.data.synthetic import SyntheticConfig, generate
from cimd_pipeline.errors import DataError


def test_binarise_accepts_01_and_0255_and_refuses_soft_masks_without_threshold():
    np.testing.assert_array_equal(binarise(np.array([[0, 1]]), None, "f"), [[0, 1]])
    np.testing.assert_array_equal(binarise(np.array([[0, 255]]), None, "f"), [[0, 1]])
    np.testing.assert_array_equal(binarise(np.array([[0.2, 0.7]]), 0.5, "f"), [[0, 1]])
    with pytest.raises(DataError, match=r"mask\.png: non-binary rater masks .*binarise_threshold"):
        binarise(np.array([[0, 3, 200]]), None, "mask.png")


def test_fit_to_size_resize_keeps_mask_binary_and_crop_pad_centres():
    mask = np.zeros((1, 8, 8), np.uint8)
    mask[0, 2:6, 2:6] = 1
    small = fit_to_size(mask, (4, 4), ResizeMode.RESIZE, is_mask=True)
    assert small.dtype == np.uint8 and set(np.unique(small)) <= {0, 1}
    np.testing.assert_array_equal(small[0], np.pad(np.ones((2, 2)), 1))
    padded = fit_to_size(mask, (10, 10), ResizeMode.CROP_PAD, is_mask=True)
    assert padded.shape == (1, 10, 10) and padded.sum() == 16 and padded[0, 3:7, 3:7].all()
    cropped = fit_to_size(mask, (4, 4), ResizeMode.CROP_PAD, is_mask=True)
    assert cropped[0].all()


def test_normalise_zscore_and_minmax():
    image = np.random.default_rng(0).normal(5, 3, (2, 8, 8)).astype(np.float32)
    z = normalise(image, Normalisation.ZSCORE)
    np.testing.assert_allclose(z.reshape(2, -1).mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(z.reshape(2, -1).std(1), 1, atol=1e-4)
    m = normalise(image, Normalisation.MINMAX)
    assert m.min() == pytest.approx(0) and m.max() == pytest.approx(1)


def test_split_puts_no_group_in_two_splits_and_follows_fractions():
    groups = [f"g{i // 3}" for i in range(300)]
    splits = assign_splits(groups, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=1)
    by_group = {}
    for g, s in zip(groups, splits):
        by_group.setdefault(g, set()).add(s)
    assert all(len(s) == 1 for s in by_group.values())
    shares = {s: np.mean(splits == s) for s in ("train", "val", "test")}
    assert shares["train"] == pytest.approx(0.7, abs=0.03)
    assert shares["test"] == pytest.approx(0.2, abs=0.03)
    np.testing.assert_array_equal(splits, assign_splits(groups, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=1))


def test_split_gives_every_split_a_group_on_tiny_data():
    splits = assign_splits(["a", "b", "c"], {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    assert sorted(splits) == ["test", "train", "val"]


def test_slice_volume_keeps_foreground_slices():
    image = np.zeros((2, 5, 4, 4), np.float32)
    masks = np.zeros((2, 5, 4, 4), np.uint8)
    masks[1, 1] = 1
    masks[0, 3, 0, 0] = 1
    case = Case("v", "g", image, masks, np.array([True, True]))
    pieces = slice_volume(case, axis=0, empty_share=0.0, rng=np.random.default_rng(0))
    assert [p.meta["slice"] for p in pieces] == [1, 3]
    assert pieces[0].image.shape == (2, 4, 4) and pieces[0].case_id == "v_s001"


def test_aligned_output_shapes_dtypes_value_sets():
    cases = generate(SyntheticConfig(num_cases=20))
    aligned = align_cases(cases, (32, 32), ResizeMode.RESIZE, Normalisation.ZSCORE, None, 2, 0.1, 0)
    data = stack_cases(aligned, {"train": 0.6, "val": 0.2, "test": 0.2}, 0)
    assert data.images.shape == (20, 1, 32, 32) and data.images.dtype == np.float32
    assert data.masks.shape == (20, 4, 32, 32) and data.masks.dtype == np.uint8
    assert set(np.unique(data.masks)) <= {0, 1}
    assert data.rater_valid.dtype == bool and data.rater_valid.sum(1).min() >= 2
    assert data.oracle.shape == (20, 16, 32, 32)
    assert set(data.cases["split"]) == {"train", "val", "test"}
    assert list(data.cases.columns[:3]) == ["case_id", "group_id", "split"]


def test_stack_refuses_empty_dataset():
    with pytest.raises(DataError, match="empty dataset"):
        stack_cases([], {"train": 1.0, "test": 0.1}, 0)
