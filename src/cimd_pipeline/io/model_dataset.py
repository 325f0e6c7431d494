"""Kedro dataset for `TrainedModel` files (``torch.save`` of plain containers, safe to load)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from kedro.io import AbstractDataset

from cimd_pipeline.models.trained import TrainedModel
from cimd_pipeline.training.checkpoint import load_checkpoint, save_checkpoint


class TrainedModelDataset(AbstractDataset[TrainedModel, TrainedModel]):
    """Saves atomically; loads with ``weights_only=True`` (no arbitrary code from the file)."""

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def _load(self) -> TrainedModel:
        data = load_checkpoint(self._filepath, map_location=torch.device("cpu"))
        return TrainedModel.from_dict(data, source=str(self._filepath))

    def _save(self, data: TrainedModel) -> None:
        save_checkpoint(data.to_dict(), self._filepath)

    def _exists(self) -> bool:
        return self._filepath.exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
