"""Kedro dataset for `SampleSet`: one compressed ``.npz`` (no pickles) with ids and settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from kedro.io import AbstractDataset

from cimd_pipeline.ensembles import SampleSet
from cimd_pipeline.errors import DataError
from cimd_pipeline.io.atomic import atomic_write


class SampleSetDataset(AbstractDataset[SampleSet, SampleSet]):
    """Binary masks and float16 soft values of every sample, keyed by case id."""

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def _load(self) -> SampleSet:
        if not self._filepath.exists():
            raise DataError(self._filepath, "no samples: run the sampling pipeline first")
        with np.load(self._filepath, allow_pickle=False) as data:
            return SampleSet(
                case_ids=data["case_ids"],
                binary=np.unpackbits(data["binary_bits"], count=int(np.prod(data["shape"])))
                .reshape(tuple(data["shape"]))
                .astype(np.uint8),
                soft=data["soft"],
                info=json.loads(str(data["info"])),
            )

    def _save(self, data: SampleSet) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez_compressed(
                    handle,
                    case_ids=np.asarray(data.case_ids, dtype=str),
                    binary_bits=np.packbits(data.binary.astype(bool).ravel()),
                    shape=np.asarray(data.binary.shape, dtype=np.int64),
                    soft=data.soft.astype(np.float16),
                    info=np.array(json.dumps(data.info)),
                )

        atomic_write(self._filepath, write)

    def _exists(self) -> bool:
        return self._filepath.exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
