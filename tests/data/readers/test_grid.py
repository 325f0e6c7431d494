"""`resample_to_grid`: flips, permutations, shifts and spacing changes land on known voxels."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cimd_pipeline.data.grid import resample_to_grid, same_grid
from cimd_pipeline.errors import DataError

SHAPE = (10, 12, 6)
# 1 x 1 x 3 mm voxels, origin away from zero as scanners write it
IMAGE_AFFINE = np.array(
    [[1.0, 0, 0, -40.0], [0, 1.0, 0, 25.0], [0, 0, 3.0, -60.0], [0, 0, 0, 1]]
)


def blob() -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:5, 3:7, 1:3] = 1
    mask[7, 9, 4] = 2  # a second label shows values are copied, not thresholded
    return mask


def test_same_grid_is_returned_unchanged():
    mask = blob()
    assert resample_to_grid(mask, IMAGE_AFFINE, SHAPE, IMAGE_AFFINE) is mask
    assert same_grid(SHAPE, IMAGE_AFFINE, SHAPE, IMAGE_AFFINE + 1e-6)


def test_shifted_origin_moves_voxels_by_the_shift():
    # the mask volume starts 2 voxels further along x: its voxel i is the image's voxel i + 2
    affine = IMAGE_AFFINE.copy()
    affine[0, 3] += 2.0
    stored = blob()[2:]  # what a rater tool saves for a cropped field of view
    out = resample_to_grid(stored, affine, SHAPE, IMAGE_AFFINE)
    expected = blob()
    expected[:2] = 0
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint8


def test_flipped_axis_is_undone():
    flipped = IMAGE_AFFINE.copy()
    flipped[0, 0] = -1.0
    flipped[0, 3] = IMAGE_AFFINE[0, 3] + SHAPE[0] - 1  # same world box, x stored right-to-left
    stored = blob()[::-1].copy()
    np.testing.assert_array_equal(resample_to_grid(stored, flipped, SHAPE, IMAGE_AFFINE), blob())


def test_permuted_axes_are_undone():
    # stored as (z, y, x): voxel (k, j, i) of the file is voxel (i, j, k) of the image
    swap = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    affine = IMAGE_AFFINE @ swap
    stored = blob().transpose(2, 1, 0).copy()
    np.testing.assert_array_equal(resample_to_grid(stored, affine, SHAPE, IMAGE_AFFINE), blob())


def test_coarser_spacing_is_sampled_nearest_neighbour():
    # 2 x 2 x 3 mm mask voxels; voxel m covers image voxels 2m and 2m + 1
    affine = IMAGE_AFFINE.copy()
    affine[0, 0] = affine[1, 1] = 2.0
    affine[0, 3] += 0.5
    affine[1, 3] += 0.5
    coarse = np.zeros((5, 6, 6), np.uint8)
    coarse[1, 2, 3] = 1
    out = resample_to_grid(coarse, affine, SHAPE, IMAGE_AFFINE)
    assert set(map(tuple, np.argwhere(out))) == {(x, y, 3) for x in (2, 3) for y in (4, 5)}


def test_linear_order_interpolates_images():
    affine = IMAGE_AFFINE.copy()
    affine[0, 3] += 0.5  # half a voxel: image voxel i sits between file voxels i - 1 and i
    ramp = np.broadcast_to(np.arange(SHAPE[0], dtype=np.float32)[:, None, None], SHAPE).copy()
    out = resample_to_grid(ramp, affine, SHAPE, IMAGE_AFFINE, order=1)
    np.testing.assert_allclose(out[1:, 0, 0], np.arange(1, SHAPE[0]) - 0.5, atol=1e-5)


def test_disjoint_fields_of_view_are_refused():
    affine = IMAGE_AFFINE.copy()
    affine[2, 3] += 100.0  # 100 mm above the image
    with pytest.raises(DataError, match=r"rater2\.nii\.gz: field of view does not overlap"):
        resample_to_grid(blob(), affine, SHAPE, IMAGE_AFFINE, source="rater2.nii.gz")


def test_partial_overlap_warns_and_zero_fills(caplog):
    affine = IMAGE_AFFINE.copy()
    affine[2, 3] += 9.0  # three slices up: image slices 0-2 are outside the mask volume
    with caplog.at_level(logging.WARNING, logger="cimd_pipeline.data.grid"):
        ones = np.ones(SHAPE, np.uint8)
        out = resample_to_grid(ones, affine, SHAPE, IMAGE_AFFINE, source="m.nii")
    assert out[:, :, :3].sum() == 0 and out[:, :, 3:].all()
    assert "m.nii: covers only 50.0%" in caplog.text
