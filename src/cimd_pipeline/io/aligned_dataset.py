"""Kedro dataset for `AlignedSet`: ``.npy`` arrays (memory-mapped on load) plus ``cases.csv``.

Saving takes the `AlignedStream` that `mask_alignment` returns (written case by case, rows
grouped by split: `data.aligned_files`) or an in-memory `AlignedSet`; the folder is swapped in
only when everything was written, so a failure keeps the previous dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.data.aligned_files import AlignedStream, read_aligned, write_set, write_stream
from cimd_pipeline.io.atomic import atomic_write_dir


class AlignedDataset(AbstractDataset[AlignedSet | AlignedStream, AlignedSet]):
    """Stores an `AlignedSet` in a folder; arrays are memory-mapped read-only on load."""

    def __init__(self, path: str, mmap: bool = True, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self._mmap = mmap
        self.metadata = metadata

    def _load(self) -> AlignedSet:
        return read_aligned(self._path, self._mmap)

    def _save(self, data: AlignedSet | AlignedStream) -> None:
        if isinstance(data, AlignedStream):
            atomic_write_dir(self._path, lambda tmp: write_stream(tmp, data))
        else:
            atomic_write_dir(self._path, lambda tmp: write_set(tmp, data))

    def _exists(self) -> bool:
        return (self._path / "cases.csv").exists()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "mmap": self._mmap}
