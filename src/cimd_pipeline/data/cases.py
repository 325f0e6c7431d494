"""The ingested multi-rater case, before alignment.

Every reader (synthetic, LIDC pickle, rater folders, NIfTI) yields `Case` objects with masks
already on their image's voxel grid; `mask_alignment` then slices, resizes, normalises and splits
them. Keeping one small record type means readers stay independent of each other and of Kedro.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cimd_pipeline.errors import DataError

# meta key of the split a reader found in the case's path (train/val/test folders of a release);
# `mask_alignment` keeps these splits when every case has one (alignment.split: auto)
GIVEN_SPLIT = "given_split"
# meta key a reader sets when it binarised the masks itself (JPEG masks, the rater_folders layout):
# its threshold. `mask_alignment` then binarises nothing again and refuses a second threshold.
BINARISED_ON_READ = "masks_binarised_at"


@dataclass
class Case:
    """One image with all its raters' masks.

    Attributes:
        case_id: unique id across the dataset.
        group_id: patient/subject id; splits never put one group in two splits.
        image: float32 (C, *S) with S = (H, W) or (D, H, W).
        masks: (R, *S) rater masks on the image grid; binary or soft (binarised in alignment).
        rater_valid: bool (R,), False where a rater did not annotate this case.
        oracle: optional (K, *S) fresh draws from the true rater model (synthetic data only).
        meta: free per-case metadata kept in the manifest (family, source file, given split ...).
    """

    case_id: str
    group_id: str
    image: np.ndarray
    masks: np.ndarray
    rater_valid: np.ndarray
    oracle: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def validate(self, source: object | None = None) -> "Case":
        """Check shapes and values; raise `DataError` naming the source file or case."""
        where = source if source is not None else self.meta.get("source", self.case_id)
        image = np.asarray(self.image)
        masks = np.asarray(self.masks)
        valid = np.asarray(self.rater_valid, dtype=bool)
        if image.ndim not in (3, 4):
            raise DataError(where, f"image must be (C, H, W) or (C, D, H, W), got shape {image.shape}")
        if masks.ndim != image.ndim:
            raise DataError(
                where, f"rater masks have shape {masks.shape}, expected (R, *{image.shape[1:]})"
            )
        if masks.shape[1:] != image.shape[1:]:
            raise DataError(
                where,
                f"rater masks of spatial shape {masks.shape[1:]} do not match the image's "
                f"{image.shape[1:]}",
            )
        if valid.shape != (masks.shape[0],):
            raise DataError(where, f"rater_valid has shape {valid.shape}, expected ({masks.shape[0]},)")
        if masks.shape[0] == 0 or not valid.any():
            raise DataError(where, "case has zero raters")
        if not np.isfinite(image).all():
            raise DataError(where, "image contains NaN or infinite intensities")
        if self.oracle is not None and np.asarray(self.oracle).shape[1:] != image.shape[1:]:
            raise DataError(where, "oracle masks do not match the image grid")
        self.image = image.astype(np.float32, copy=False)
        self.masks = masks
        self.rater_valid = valid
        return self
