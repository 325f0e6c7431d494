"""Put a volume onto another volume's voxel grid using the two NIfTI affines.

Raters' masks are often saved on a grid that differs from the image's (cropped around the
lesion, flipped, another spacing, axes in another order). Training compares masks with images
voxel by voxel, so every mask must be resampled onto its image's grid first; a mask whose field of
view misses the image entirely is a broken pairing and is refused rather than turned into an
all-empty mask that would read as "rater saw nothing".
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.ndimage import map_coordinates

from cimd_pipeline.errors import DataError

logger = logging.getLogger(__name__)

_SAME_GRID_ATOL = 1e-4  # mm; header round-off, not a real shift
_EDGE_EPS = 1e-6  # voxel; keeps exact half-voxel edges inside despite float round-off


def same_grid(shape_a: tuple[int, ...], affine_a: np.ndarray, shape_b: tuple[int, ...],
              affine_b: np.ndarray) -> bool:
    """True when both volumes have the same shape and (up to round-off) the same affine."""
    same_shape = tuple(shape_a) == tuple(shape_b)
    return same_shape and np.allclose(affine_a, affine_b, atol=_SAME_GRID_ATOL)


def resample_to_grid(
    mask_data: np.ndarray,
    mask_affine: np.ndarray,
    image_shape: tuple[int, int, int],
    image_affine: np.ndarray,
    *,
    order: int = 0,
    source: object = "mask",
) -> np.ndarray:
    """Sample a 3-D volume at every voxel centre of the image grid.

    ``inv(mask_affine) @ image_affine`` maps an image voxel index to a (fractional) voxel index in
    the mask, so flips, axis permutations, shifts and spacing changes are all one affine map.
    Nearest-neighbour (``order=0``, the default) keeps mask labels exact; images of a second
    modality use ``order=1``. Image voxels that fall outside the mask volume get 0.

    Args:
        mask_data: (X, Y, Z) array on the grid of ``mask_affine`` (4x4, voxel -> world mm).
        mask_affine: 4x4 affine of ``mask_data``.
        image_shape: (X, Y, Z) of the target grid.
        image_affine: 4x4 affine of the target grid.
        order: spline order passed to `scipy.ndimage.map_coordinates`.
        source: named in the error and the warning (the mask's file).

    Returns:
        ``mask_data.dtype`` array of ``image_shape``.

    Raises:
        DataError: when no image voxel maps inside the mask volume (fields of view do not
            overlap). A partial overlap is logged as a warning.
    """
    data = np.asarray(mask_data)
    if data.ndim != 3 or len(image_shape) != 3:
        raise ValueError(f"expected 3-D volumes, got {data.shape} and {tuple(image_shape)}")
    if same_grid(data.shape, mask_affine, image_shape, image_affine):
        return data
    voxel_map = np.linalg.inv(np.asarray(mask_affine, float)) @ np.asarray(image_affine, float)
    out = np.zeros(image_shape, dtype=data.dtype)
    rows, cols = np.meshgrid(np.arange(image_shape[1]), np.arange(image_shape[2]), indexing="ij")
    plane = np.stack([np.zeros(rows.size), rows.ravel(), cols.ravel()]).astype(float)
    upper = np.asarray(data.shape, float)[:, None] - 0.5 + _EDGE_EPS
    inside_total = 0
    for index in range(image_shape[0]):  # one plane at a time keeps coordinates small in memory
        plane[0] = index
        coords = voxel_map[:3, :3] @ plane + voxel_map[:3, 3:]
        inside = np.all((coords >= -0.5 - _EDGE_EPS) & (coords < upper), axis=0)
        if inside.any():
            flat = out[index].reshape(-1)
            flat[inside] = map_coordinates(data, coords[:, inside], order=order, mode="nearest")
            inside_total += int(inside.sum())
    total = int(np.prod(image_shape))
    if inside_total == 0:
        raise DataError(
            source,
            "field of view does not overlap the image's: no image voxel maps inside this volume",
        )
    if inside_total < total:
        logger.warning(
            "%s: covers only %.1f%% of the image's field of view; the rest is set to 0",
            source,
            100.0 * inside_total / total,
        )
    return out
