"""Alignment: value sets and dtypes, the message of every refusal, which resampling mode a resize
uses, how volumes are sliced (oracle included), splits, and that `align_cases` hands each of its
options to the step that needs it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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
from cimd_pipeline.data.readers import get_reader
from cimd_pipeline.data.splits import assign_splits, choose_splits
from cimd_pipeline.data.synthetic import SyntheticConfig, generate
from cimd_pipeline.errors import DataError
from tests.data.readers.test_rater_folders import RADII, write_set
from tests.data.readers.test_rater_folders import disk as rater_disk


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


FRACTIONS = {"train": 0.5, "val": 0.25, "test": 0.25}


# --- binarise --------------------------------------------------------------------------------


def test_binarise_threshold_is_strict_and_output_is_uint8():
    out = binarise(np.array([[0.2, 0.5, 0.51]]), 0.5, "f")
    np.testing.assert_array_equal(out, [[0, 0, 1]])
    assert out.dtype == np.uint8


@pytest.mark.parametrize(
    ("values", "dtype"),
    [([0, 1], np.int64), ([0, 1], np.float64), ([0, 1], bool), ([0, 255], np.int64), ([0, 255], np.float64)],
)
def test_binarise_known_encodings_give_uint8(values, dtype):
    out = binarise(np.array([values, values[::-1]], dtype=dtype), None, "f")
    np.testing.assert_array_equal(out, [[0, 1], [1, 0]])
    assert out.dtype == np.uint8


@pytest.mark.parametrize(
    ("values", "shown"),
    [
        ([0, 3, 200], "0, 3, 200"),
        ([0, 0.5, 1, 2, 3, 4], "0, 0.5, 1, 2, 3, 4"),  # six values: all shown
        ([0, 1, 2, 3, 4, 5, 6], "0, 1, 2, 3, 4, 5, ..."),  # seven: six and an ellipsis
    ],
)
def test_binarise_refusal_names_file_values_and_the_parameter(values, shown):
    with pytest.raises(DataError) as caught:
        binarise(np.array([values]), None, "raters/r2/img_7.png")
    assert str(caught.value) == (
        f"raters/r2/img_7.png: non-binary rater masks (values {shown}) and no binarisation "
        "threshold configured (set alignment.binarise_threshold)"
    )


# --- slice_volume ----------------------------------------------------------------------------


def _volume(depth_axis_len=(5, 4, 3), raters=2, oracle=True, seed=0) -> Case:
    """A (1, D, H, W) case with distinct values everywhere, so any mis-slicing shows."""
    rng = np.random.default_rng(seed)
    shape = tuple(depth_axis_len)
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    masks = (rng.random((raters, *shape)) < 0.3).astype(np.uint8)
    orc = (rng.random((3, *shape)) < 0.5).astype(np.uint8) if oracle else None
    return Case("vol", "p1", image, masks, np.ones(raters, bool), orc, {"source": "vol.nii.gz"})


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_volume_cuts_image_masks_and_oracle_along_the_axis(axis):
    case = _volume()
    pieces = slice_volume(case, axis, empty_share=1.0, rng=np.random.default_rng(0))
    assert [p.meta["slice"] for p in pieces] == list(range(case.image.shape[axis + 1]))
    for k, piece in enumerate(pieces):
        take = (slice(None),) * (axis + 1) + (k,)
        np.testing.assert_array_equal(piece.image, case.image[take])
        np.testing.assert_array_equal(piece.masks, case.masks[take])
        np.testing.assert_array_equal(piece.oracle, case.oracle[take])
        assert piece.case_id == f"vol_s{k:03d}" and piece.meta["source"] == "vol.nii.gz"


def test_slice_volume_without_oracle_and_a_2d_case_passes_through():
    pieces = slice_volume(_volume(oracle=False), 0, 1.0, np.random.default_rng(0))
    assert len(pieces) == 5 and all(p.oracle is None for p in pieces)
    flat = Case("c", "g", np.zeros((1, 4, 4), np.float32), np.zeros((2, 4, 4), np.uint8), np.ones(2, bool))
    assert slice_volume(flat, 0, 0.0, np.random.default_rng(0)) == [flat]


def test_slice_volume_keeps_each_empty_slice_by_its_own_draw():
    depth = 40
    masks = np.zeros((2, depth, 4, 4), np.uint8)
    masks[0, [3, 17]] = 1  # two foreground slices
    masks[1, 30] = 1  # drawn only by an invalid rater: counts as empty
    case = Case("v", "g", np.zeros((1, depth, 4, 4), np.float32), masks, np.array([True, False]))
    pieces = slice_volume(case, 0, empty_share=0.4, rng=np.random.default_rng(7))
    draws = np.random.default_rng(7).random(depth)
    expected = sorted({3, 17} | set(np.flatnonzero(draws < 0.4).tolist()))
    assert [p.meta["slice"] for p in pieces] == expected
    assert 2 < len(expected) < depth  # some empty slices kept, some dropped


# --- fit_to_size -----------------------------------------------------------------------------


def test_fit_to_size_returns_an_array_already_at_size_untouched():
    image = np.random.default_rng(0).normal(size=(2, 6, 5))  # float64, kept as it is
    for mode in ResizeMode:
        assert fit_to_size(image, (6, 5), mode, False) is image


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int16])
def test_crop_pad_keeps_the_dtype(dtype):
    array = np.ones((1, 3, 7), dtype)
    out = fit_to_size(array, (5, 5), ResizeMode.CROP_PAD, False)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out[0], np.pad(np.ones((3, 5)), ((1, 1), (0, 0))))


@pytest.mark.parametrize(
    ("shape", "size", "mode"),
    [
        ((8, 8), (3, 3), "area"),  # both shrink
        ((8, 8), (8, 3), "area"),  # one kept, one shrinks
        ((8, 8), (3, 8), "area"),
        ((8, 8), (12, 12), "bilinear"),  # both grow
        ((8, 8), (16, 3), "bilinear"),  # rows grow: no area averaging
        ((8, 8), (3, 16), "bilinear"),
        ((6, 16), (10, 8), "bilinear"),  # rows grow though both sizes fit the wider side
        ((16, 6), (8, 10), "bilinear"),
    ],
)
def test_resize_averages_areas_only_when_both_sides_shrink(shape, size, mode):
    image = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
    out = fit_to_size(image, size, ResizeMode.RESIZE, False)
    reference = F.interpolate(torch.from_numpy(image)[None], size=size, mode=mode)[0].numpy()
    assert out.dtype == np.float32 and out.shape == (2, *size)
    np.testing.assert_allclose(out, reference, atol=1e-6)
    other = F.interpolate(torch.from_numpy(image)[None], size=size,
                          mode="bilinear" if mode == "area" else "area")[0].numpy()
    assert not np.allclose(out, other, atol=1e-3)  # the case tells the two modes apart


def test_resized_image_keeps_its_values_and_float32():
    image = np.arange(16, dtype=np.float64).reshape(1, 4, 4) * 10  # far outside {0, 1}
    out = fit_to_size(image, (2, 2), ResizeMode.RESIZE, is_mask=False)
    np.testing.assert_allclose(out[0], [[25, 45], [105, 125]])
    assert out.dtype == np.float32


def test_resized_mask_keeps_pixels_covered_at_least_half():
    mask = np.array([[[1, 0, 1, 1], [1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]]], np.uint8)
    out = fit_to_size(mask, (2, 2), ResizeMode.RESIZE, is_mask=True)
    np.testing.assert_array_equal(out[0], [[1, 1], [0, 1]])  # coverage 0.5, 0.5, 0, 0.75
    assert out.dtype == np.uint8


# --- normalise -------------------------------------------------------------------------------


def test_minmax_is_per_channel_and_resolves_a_tiny_range():
    image = np.stack([np.linspace(-3, 5, 16), np.linspace(2, 2.001, 16)]).reshape(2, 4, 4)
    out = normalise(image, Normalisation.MINMAX)
    for channel in out:
        assert channel.min() == pytest.approx(0, abs=1e-6) and channel.max() == pytest.approx(1, abs=1e-3)
    np.testing.assert_array_equal(normalise(np.full((1, 3, 3), 7.0), Normalisation.MINMAX), 0)


def test_no_normalisation_only_casts_to_float32():
    image = np.arange(12, dtype=np.int32).reshape(1, 3, 4)
    out = normalise(image, Normalisation.NONE)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, image)


# --- align_cases -----------------------------------------------------------------------------


def _align(cases, **overrides):
    options = dict(size=(4, 4), resize_mode=ResizeMode.RESIZE, normalisation=Normalisation.ZSCORE,
                   binarise_threshold=None, slice_axis=0, empty_slice_share=1.0, seed=0)
    options.update(overrides)
    return list(align_cases(cases, **options))


def test_align_applies_each_step_with_its_option():
    case = _volume(depth_axis_len=(3, 8, 6), oracle=True)
    case.masks = case.masks * 0.9  # soft masks: only a threshold makes them binary
    case.oracle = case.oracle * 0.8
    for mode in ResizeMode:
        for norm in (Normalisation.MINMAX, Normalisation.NONE):
            out = _align([case], size=(4, 4), resize_mode=mode, normalisation=norm,
                         binarise_threshold=0.5, slice_axis=1)
            assert [p.meta["slice"] for p in out] == list(range(8))
            for k, piece in enumerate(out):
                image = fit_to_size(case.image[:, :, k], (4, 4), mode, False)
                np.testing.assert_allclose(piece.image, normalise(image, norm), atol=1e-6)
                masks = fit_to_size((case.masks[:, :, k] > 0.5).astype(np.uint8), (4, 4), mode, True)
                np.testing.assert_array_equal(piece.masks, masks)
                oracle = fit_to_size((case.oracle[:, :, k] > 0.5).astype(np.uint8), (4, 4), mode, True)
                np.testing.assert_array_equal(piece.oracle, oracle)
                assert piece.masks.dtype == np.uint8 and piece.oracle.dtype == np.uint8


def test_align_draws_empty_slices_from_its_seed():
    case = _volume(depth_axis_len=(30, 4, 4), oracle=False)
    case.masks[:] = 0
    case.masks[0, 4] = 1
    kept = {seed: [p.meta["slice"] for p in _align([case], empty_slice_share=0.5, seed=seed)] for seed in (3, 4)}
    for seed, slices in kept.items():
        draws = np.random.default_rng(seed).random(30)
        assert slices == sorted({4} | set(np.flatnonzero(draws < 0.5).tolist()))
    assert kept[3] != kept[4]


def test_align_refusal_names_the_source_file_or_else_the_case():
    soft = Case("case_9", "g", np.zeros((1, 4, 4), np.float32), np.full((2, 4, 4), 0.3), np.ones(2, bool))
    with pytest.raises(DataError, match=r"^case_9: non-binary"):
        _align([soft])
    soft.meta["source"] = "rater_1/case_9.png"
    with pytest.raises(DataError, match=r"^rater_1/case_9\.png: non-binary"):
        _align([soft])
    soft.masks = np.zeros((2, 4, 4), np.uint8)
    soft.oracle = np.full((3, 4, 4), 0.3)
    with pytest.raises(DataError, match=r"^rater_1/case_9\.png: non-binary"):
        _align([soft])  # the oracle is checked like the raters' masks


# --- stack_cases -----------------------------------------------------------------------------


def _flat(case_id, channels=1, oracle=True, seed=0):
    rng = np.random.default_rng(seed)
    return Case(case_id, f"g_{case_id}", rng.normal(size=(channels, 4, 4)).astype(np.float32),
                (rng.random((2, 4, 4)) < 0.5).astype(np.uint8), np.ones(2, bool),
                (rng.random((3, 4, 4)) < 0.5).astype(np.uint8) if oracle else None)


def test_stack_refusals_name_the_stage_and_the_problem():
    with pytest.raises(DataError) as caught:
        stack_cases([], FRACTIONS, 0)
    assert str(caught.value) == "mask_alignment: empty dataset after slicing and filtering"
    with pytest.raises(DataError) as caught:
        stack_cases([_flat("a"), _flat("b", channels=2)], FRACTIONS, 0)
    assert str(caught.value) == "mask_alignment: cases have different channel counts [1, 2]"


def test_stack_of_one_case_and_of_cases_with_and_without_oracle():
    one = stack_cases([_flat("a")], {"test": 1.0}, 0)
    assert one.images.shape == (1, 1, 4, 4) and one.oracle.shape == (1, 3, 4, 4)
    mixed = stack_cases([_flat("a"), _flat("b", oracle=False)], {"train": 0.5, "test": 0.5}, 0)
    assert mixed.oracle is None and mixed.masks.shape == (2, 2, 4, 4)


def test_stack_splits_follow_the_seed():
    cases = [_flat(f"c{i}", seed=i) for i in range(24)]
    first = stack_cases(cases, FRACTIONS, 5).cases
    again = stack_cases(cases, FRACTIONS, 5).cases
    other = stack_cases(cases, FRACTIONS, 6).cases
    expected = choose_splits(first.drop(columns="split"), FRACTIONS, 5)
    np.testing.assert_array_equal(first["split"], expected)
    np.testing.assert_array_equal(first["split"], again["split"])
    assert list(first["split"]) != list(other["split"])


# --- one binarisation, one meaning of alignment.binarise_threshold ------------------------------


def align_with(cases, threshold):
    aligned = align_cases(cases, (24, 28), ResizeMode.RESIZE, Normalisation.NONE, threshold, 2, 0.1, 0)
    return [c.masks for c in aligned]


def test_a_threshold_never_cuts_masks_the_reader_binarised(tmp_path):
    """rater_folders and JPEG masks leave the reader as {0, 1}: a second cut at 127 would empty
    every one of them (and empty-vs-empty scores as a perfect match), so it is refused."""
    write_set(tmp_path)
    cases = list(get_reader("folders")(tmp_path, {"layout": "rater_folders"}, 0))
    for threshold in (127, 0.5):
        with pytest.raises(DataError, match=r"CASE03\.png: the reader already binarised these rater masks at > 127"):
            align_with(cases, threshold)
    masks = align_with(cases, None)
    np.testing.assert_array_equal(masks[0], np.stack([rater_disk(r) for r in RADII.values()]))


def test_a_threshold_of_one_or_more_on_01_masks_is_refused_and_0255_keeps_its_meaning():
    disk = np.zeros((4, 24, 28), np.uint8)
    disk[:, 8:16, 8:20] = 1
    ones = Case("a", "g", np.zeros((1, 24, 28), np.float32), disk, np.ones(4, bool), meta={"source": "a.pickle"})
    with pytest.raises(DataError, match=r"a\.pickle: rater masks are already binary .* 127 would empty every mask"):
        align_with([ones], 127)
    np.testing.assert_array_equal(align_with([ones], 0.5)[0], disk)
    empty = Case("e", "g", np.zeros((1, 24, 28), np.float32), 0 * disk, np.ones(4, bool))
    assert not align_with([empty], 127)[0].any()  # nothing to empty: nothing refused
    eight_bit = Case("b", "g", np.zeros((1, 24, 28), np.float32), disk * 255, np.ones(4, bool))
    for threshold in (None, 127, 254):  # on stored 0/255 values every path gives the same mask
        np.testing.assert_array_equal(align_with([eight_bit], threshold)[0], disk)


def test_binary_detection_is_exact_at_its_edges():
    with pytest.raises(DataError, match=r"values 0, 7, 255"):  # 255 on top is not enough
        binarise(np.array([[0, 7, 255]], np.uint8), None, "f")
    with pytest.raises(DataError, match="already binary"):  # a threshold of exactly 1 empties too
        binarise(np.array([[0, 1]], np.uint8), 1, "f")
    out = binarise(np.array([[True, False]]), None, "f", binarised_at=127)
    assert out.dtype == np.uint8 and out.tolist() == [[1, 0]]
    assert binarise(np.zeros((0, 4), np.float32), None, "f").dtype == np.uint8
