"""Readers that turn a data source into a stream of `Case` objects.

Each reader is ``read(root, options, seed) -> Iterator[Case]`` and knows nothing of Kedro; the
``ingestion.source`` parameter picks one by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cimd_pipeline.data.cases import Case
from cimd_pipeline.data.readers.folders import FolderOptions, read_folders
from cimd_pipeline.data.readers.lidc import LidcOptions, read_lidc
from cimd_pipeline.data.readers.nifti import MSMRI_DEFAULTS, QUBIQ_DEFAULTS, NiftiOptions, read_msmri, read_qubiq
from cimd_pipeline.data.synthetic import SyntheticConfig, generate

Reader = Callable[[Path | None, dict[str, Any], int], Iterator[Case]]


def read_synthetic(root: Path | None, options: dict[str, Any], seed: int) -> Iterator[Case]:
    """The embedded benchmark: ``root`` is unused, ``options`` are `SyntheticConfig` fields."""
    return generate(SyntheticConfig(**options), seed)


READERS: dict[str, Reader] = {
    "synthetic": read_synthetic,
    "lidc": read_lidc,
    "folders": read_folders,
    "msmri": read_msmri,
    "qubiq": read_qubiq,
}


def reader_options(source: str, options: dict[str, Any]) -> BaseModel:
    """The ``ingestion.reader`` options of a real-data ``source`` as its reader will parse them.

    Raises pydantic's ValidationError for an unknown key or bad value (a regex that does not
    compile included), so the parameter check refuses them before any file is read.
    """
    if source == "folders":
        return FolderOptions.model_validate(options)
    if source == "lidc":
        return LidcOptions.model_validate(options)
    defaults = {"msmri": MSMRI_DEFAULTS, "qubiq": QUBIQ_DEFAULTS}[source]
    return NiftiOptions.model_validate({**defaults, **options})


def reader_preprocessing(source: str, options: dict[str, Any]) -> dict[str, Any]:
    """What the reader did to the raw files, to be stored with a model and redone by inference.

    The source and its parsed options (defaults filled in), e.g. ``reorient`` of the NIfTI readers.
    """
    if source == "synthetic":
        return {"source": source}
    return {"source": source, **reader_options(source, options).model_dump(mode="json")}


def get_reader(source: str) -> Reader:
    """Look a reader up by name, with the known names in the error."""
    try:
        return READERS[source]
    except KeyError:
        raise ValueError(f"unknown ingestion.source {source!r}; known: {sorted(READERS)}") from None
