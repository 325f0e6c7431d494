"""Read-only Kedro dataset of samples another model drew (`cimd_pipeline.data.external_samples`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from cimd_pipeline.data.external_samples import ExternalSamples, read_samples


class ExternalSamplesDataset(AbstractDataset[ExternalSamples, ExternalSamples]):
    """Samples in any format `read_samples` knows; saving is refused (they are someone's input)."""

    def __init__(self, path: str, threshold: float | None = None, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self._threshold = threshold
        self.metadata = metadata

    def _load(self) -> ExternalSamples:
        return read_samples(self._path, threshold=self._threshold)

    def _save(self, data: ExternalSamples) -> None:
        raise DatasetError(f"{self._path}: samples drawn elsewhere are read, never written")

    def _exists(self) -> bool:
        return self._path.exists()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "threshold": self._threshold}
