"""The canonical aligned multi-rater dataset every model stage reads.

Arrays are stacked over cases so that training can index them directly (and memory-map them:
15,000 LIDC slices at 128x128 load without a copy per epoch). Missing raters are padded with
empty masks and flagged in ``rater_valid``; datasets with fewer raters than ``R`` stay honest.
The pipeline stores the rows of each split together (`aligned_files`), so a split of a
memory-mapped set is a view of the files, not a copy in RAM.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")
BLOCK_ROWS = 512


def row_blocks(array: np.ndarray, rows: int = BLOCK_ROWS) -> Iterator[np.ndarray]:
    """Consecutive blocks of ``rows`` rows of ``array``, each an in-memory copy.

    For a memory-mapped array the pages of each block are handed back to the kernel once the
    block is copied: a mapping keeps every page it touched resident (and counted in the process's
    RSS), so a scan over a set larger than RAM would otherwise hold all of it.
    """
    handle = getattr(array, "_mmap", None)  # numpy's mapping of the file (np.memmap)
    for start in range(0, len(array), rows):
        block = np.array(array[start : start + rows])
        if handle is not None and hasattr(handle, "madvise"):
            handle.madvise(mmap.MADV_DONTNEED)
        yield block


def _as_slice(index: np.ndarray) -> slice | None:
    """The slice equal to a sorted run of consecutive positions, else None."""
    if len(index) and index[-1] - index[0] == len(index) - 1 and (np.diff(index) == 1).all():
        return slice(int(index[0]), int(index[-1]) + 1)
    return None


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

    def subset(self, split: str) -> AlignedSet:
        """The cases of one split: views of the arrays where its rows are consecutive (as the
        pipeline stores them), else a copy of only those rows."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.take(np.flatnonzero(self.cases["split"].to_numpy() == split))

    def take(self, index: np.ndarray | int) -> AlignedSet:
        """The cases at positions ``index`` (or the first ``index`` cases): views of the arrays
        (memory-mapped ones stay on disk) for consecutive positions, else copies."""
        if isinstance(index, int):
            index = np.arange(min(index, len(self)))
        index = np.asarray(index)
        rows = _as_slice(index) if index.dtype.kind in "iu" else None
        pick = rows if rows is not None else index
        return AlignedSet(
            images=self.images[pick],
            masks=self.masks[pick],
            rater_valid=np.array(self.rater_valid[pick]),  # small; callers may edit it
            cases=self.cases.iloc[pick].reset_index(drop=True),
            oracle=None if self.oracle is None else self.oracle[pick],
        )
