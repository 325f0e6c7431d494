"""Kedro dataset for `TrainedModel` files (``torch.save`` of plain containers, safe to load)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from cimd_pipeline.models.trained import TrainedModel


class TrainedModelDataset(AbstractDataset[TrainedModel, TrainedModel]):
    """Saves atomically; loads with ``weights_only=True`` (no arbitrary code from the file)."""

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def _load(self) -> TrainedModel:
        return TrainedModel.load(self._filepath)

    def _save(self, data: TrainedModel) -> None:
        data.save(self._filepath)

    def _exists(self) -> bool:
        return self._filepath.exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
