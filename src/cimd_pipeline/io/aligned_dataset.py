"""Kedro dataset for `AlignedSet`: ``.npy`` arrays (memory-mapped on load) plus ``cases.csv``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from kedro.io import AbstractDataset

from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.errors import DataError
from cimd_pipeline.io.atomic import atomic_write_dir

ARRAYS = ("images", "masks", "rater_valid", "oracle")


class AlignedDataset(AbstractDataset[AlignedSet, AlignedSet]):
    """Stores an `AlignedSet` in a folder; arrays are memory-mapped read-only on load."""

    def __init__(self, path: str, mmap: bool = True, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self._mmap = mmap
        self.metadata = metadata

    def _load(self) -> AlignedSet:
        if not (self._path / "cases.csv").exists():
            raise DataError(self._path, "no aligned dataset here: run the mask_alignment pipeline first")
        mode = "r" if self._mmap else None
        arrays = {
            name: np.load(self._path / f"{name}.npy", mmap_mode=mode, allow_pickle=False)
            for name in ARRAYS
            if (self._path / f"{name}.npy").exists()
        }
        cases = pd.read_csv(self._path / "cases.csv", dtype={"case_id": str, "group_id": str})
        return AlignedSet(cases=cases, **arrays)

    def _save(self, data: AlignedSet) -> None:
        def write(tmp: Path) -> None:
            for name in ARRAYS:
                array = getattr(data, name)
                if array is not None:
                    np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
            data.cases.to_csv(tmp / "cases.csv", index=False)

        atomic_write_dir(self._path, write)

    def _exists(self) -> bool:
        return (self._path / "cases.csv").exists()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "mmap": self._mmap}
