"""The canonical aligned multi-rater dataset every model stage reads.

Arrays are stacked over cases so that training can index them directly (and memory-map them:
15,000 LIDC slices at 128x128 load without a copy per epoch). Missing raters are padded with
empty masks and flagged in ``rater_valid``; datasets with fewer raters than ``R`` stay honest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


@dataclass
class AlignedSet:
    """Stacked aligned cases.

    Attributes:
        images: float32 (N, C, H, W), normalised intensities.
        masks: uint8 (N, R, H, W) in {0, 1}.
        rater_valid: bool (N, R).
        cases: manifest with one row per case: case_id, group_id, split, and metadata columns.
        oracle: optional uint8 (N, K, H, W) fresh true rater masks (synthetic data only).
    """

    images: np.ndarray
    masks: np.ndarray
    rater_valid: np.ndarray
    cases: pd.DataFrame
    oracle: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.cases)
        if self.images.ndim != 4 or self.masks.ndim != 4:
            raise ValueError(f"images and masks must be 4-D, got {self.images.shape}, {self.masks.shape}")
        if not (len(self.images) == len(self.masks) == len(self.rater_valid) == n):
            raise ValueError("images, masks, rater_valid and cases differ in length")
        if self.images.shape[2:] != self.masks.shape[2:]:
            raise ValueError(f"image grid {self.images.shape[2:]} != mask grid {self.masks.shape[2:]}")

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def image_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, split: str) -> "AlignedSet":
        """The cases of one split (a copy of only those rows)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.take(np.flatnonzero(self.cases["split"].to_numpy() == split))

    def take(self, index: np.ndarray | int) -> "AlignedSet":
        """The cases at positions ``index`` (or the first ``index`` cases), copied."""
        if isinstance(index, int):
            index = np.arange(min(index, len(self)))
        return AlignedSet(
            images=np.asarray(self.images[index]),
            masks=np.asarray(self.masks[index]),
            rater_valid=np.asarray(self.rater_valid[index]),
            cases=self.cases.iloc[index].reset_index(drop=True),
            oracle=None if self.oracle is None else np.asarray(self.oracle[index]),
        )
