"""Nodes of the ``data_ingestion`` pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure

from cimd_pipeline.config import IngestionParams
from cimd_pipeline.data.cases import Case
from cimd_pipeline.data.readers import get_reader
from cimd_pipeline.plots import rater_grid

if TYPE_CHECKING:  # a Kedro dataset: the node functions themselves run without Kedro
    from cimd_pipeline.io.case_folder import CaseCollection


def ingest_cases(ingestion: dict[str, Any]) -> Iterator[Case]:
    """Stream the configured source's cases; the catalog writes them one at a time.

    Not a generator function on purpose: Kedro would save each yielded case as a separate chunk.
    """
    params = IngestionParams.model_validate(ingestion)
    options = asdict(params.synthetic) if params.source == "synthetic" else dict(params.reader)
    root = Path(params.root) if params.root else None
    return get_reader(params.source)(root, options, params.seed)


def plot_example_cases(cases: CaseCollection, per_family: int = 2) -> Figure:
    """A few cases of each family (or of the dataset) with every rater's mask."""
    manifest = cases.manifest
    column = "family" if "family" in manifest.columns else None
    groups = manifest.groupby(column).head(per_family) if column else manifest.head(4)
    chosen = [cases[i] for i in groups.index]
    middle = [c.image if c.image.ndim == 3 else c.image[:, c.image.shape[1] // 2] for c in chosen]
    masks = [c.masks if c.masks.ndim == 3 else c.masks[:, c.masks.shape[1] // 2] for c in chosen]
    labels = [f"{c.case_id} {c.meta.get('family', '')}".strip() for c in chosen]
    return rater_grid(middle, masks, [c.rater_valid for c in chosen], labels)
