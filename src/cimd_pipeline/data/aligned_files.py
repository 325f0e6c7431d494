"""The aligned dataset on disk: ``.npy`` arrays plus ``cases.csv``, written one case at a time.

Format (docs/datasets.md): ``images.npy`` float32 (N, C, H, W), ``masks.npy`` uint8 {0,1}
(N, R, H, W), ``rater_valid.npy`` bool (N, R), optional ``oracle.npy`` uint8 (N, K, H, W), and
``cases.csv`` with one row per case (``case_id``, ``group_id``, ``split``, reader metadata). Rows
of one split are consecutive, train then val then test, so that a split of the memory-mapped
arrays is a view of the files (`AlignedSet.subset`) and training reads it without a copy.

Alignment streams: each aligned case goes to a spool file as it comes, the split (which needs
every case's group) is chosen at the end, and the spool is copied into the arrays in split order.
Memory stays at one case plus the table, whatever the number of cases; the price is writing the
arrays twice to disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd

from cimd_pipeline.data.aligned import SPLITS, AlignedSet
from cimd_pipeline.data.alignment import stack_cases
from cimd_pipeline.data.cases import Case
from cimd_pipeline.data.splits import choose_splits
from cimd_pipeline.errors import DataError

ARRAYS = ("images", "masks", "rater_valid", "oracle")
WHERE = "mask_alignment"


@dataclass
class AlignedStream:
    """Aligned 2-D cases not yet written, and how to split them once all are seen.

    ``cases`` may be a generator: it is consumed once, by `write_stream` or `collect`.
    """

    cases: Iterable[Case]
    split: str | Mapping[str, float]
    seed: int

    def collect(self) -> AlignedSet:
        """All cases stacked in memory (small sets, tests), split as `write_stream` does."""
        return stack_cases(self.cases, self.split, self.seed)


def _row(case: Case) -> dict:
    meta = {k: v for k, v in case.meta.items() if isinstance(v, (str, int, float, bool))}
    return {"case_id": case.case_id, "group_id": case.group_id, **meta}


class _Spool:
    """Per-case bytes of one array in arrival order; cases may differ in their first axis (raters)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: BinaryIO = path.open("wb")
        self.offsets: list[tuple[int, int]] = []  # (byte offset, rows) per case
        self.shape: tuple[int, ...] | None = None  # (H, W) of every row
        self.dtype: np.dtype | None = None

    def add(self, array: np.ndarray, dtype: np.dtype, source: object) -> None:
        array = np.ascontiguousarray(array, dtype=dtype)
        if self.shape is None:
            self.shape, self.dtype = array.shape[1:], np.dtype(dtype)
        elif array.shape[1:] != self.shape:
            raise DataError(source, f"aligned case of spatial shape {array.shape[1:]}, expected {self.shape}")
        self.offsets.append((self.file.tell(), array.shape[0]))
        self.file.write(array.tobytes())

    def copy_to(self, path: Path, order: np.ndarray, rows: int) -> None:
        """Write ``.npy`` of shape (len(order), rows, *shape): cases in ``order``, rows zero-padded."""
        self.file.close()
        assert self.shape is not None and self.dtype is not None
        row_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (len(order), rows, *self.shape)}
        with self.path.open("rb") as spool, path.open("wb") as out:
            np.lib.format.write_array_header_1_0(out, header)
            for case in order:
                offset, count = self.offsets[case]
                spool.seek(offset)
                out.write(spool.read(count * row_bytes))
                if count < rows:
                    out.write(bytes((rows - count) * row_bytes))
        self.path.unlink()


def write_stream(folder: Path, stream: AlignedStream) -> None:
    """Write ``stream`` into ``folder`` (which must exist and be empty) in the format above.

    Like `stack_cases`: raters are padded to the most any case has, and oracle masks are kept
    only when every case has them.
    """
    spools = {name: _Spool(folder / f".{name}.spool") for name in ("images", "masks", "oracle")}
    table, valid, channels = [], [], None
    for case in stream.cases:
        source = case.meta.get("source", case.case_id)
        if channels is None:
            channels = case.image.shape[0]
        elif case.image.shape[0] != channels:
            counts = sorted({channels, case.image.shape[0]})
            raise DataError(WHERE, f"cases have different channel counts {counts}")
        spools["images"].add(case.image, np.float32, source)
        spools["masks"].add(case.masks, np.uint8, source)
        if case.oracle is not None:
            spools["oracle"].add(case.oracle, np.uint8, source)
        valid.append(np.asarray(case.rater_valid, dtype=bool))
        table.append(_row(case))
    if not table:
        raise DataError(WHERE, "empty dataset after slicing and filtering")
    cases = pd.DataFrame(table)
    cases.insert(2, "split", choose_splits(cases, stream.split, stream.seed))
    rank = {name: k for k, name in enumerate(SPLITS)}
    order = np.argsort(cases["split"].map(rank).to_numpy(), kind="stable")
    raters = max(len(v) for v in valid)
    spools["images"].copy_to(folder / "images.npy", order, channels)
    spools["masks"].copy_to(folder / "masks.npy", order, raters)
    if len(spools["oracle"].offsets) == len(table):
        samples = max(count for _, count in spools["oracle"].offsets)
        spools["oracle"].copy_to(folder / "oracle.npy", order, samples)
    else:
        spools["oracle"].file.close()
        spools["oracle"].path.unlink()
    padded = np.zeros((len(valid), raters), dtype=bool)
    for i, flags in enumerate(valid):
        padded[i, : len(flags)] = flags
    np.save(folder / "rater_valid.npy", padded[order], allow_pickle=False)
    cases.iloc[order].to_csv(folder / "cases.csv", index=False)


def write_set(folder: Path, data: AlignedSet) -> None:
    """Write an in-memory `AlignedSet` as it is (rows in its own order)."""
    for name in ARRAYS:
        array = getattr(data, name)
        if array is not None:
            np.save(folder / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
    data.cases.to_csv(folder / "cases.csv", index=False)


def read_aligned(folder: Path, mmap: bool = True) -> AlignedSet:
    """Load the arrays (memory-mapped read-only by default) and the case table."""
    if not (folder / "cases.csv").exists():
        raise DataError(folder, "no aligned dataset here: run the mask_alignment pipeline first")
    arrays = {
        name: np.load(folder / f"{name}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
        for name in ARRAYS
        if (folder / f"{name}.npy").exists()
    }
    cases = pd.read_csv(folder / "cases.csv", dtype={"case_id": str, "group_id": str})
    return AlignedSet(cases=cases, **arrays)
