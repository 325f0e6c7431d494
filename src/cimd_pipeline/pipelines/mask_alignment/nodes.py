"""Nodes of the ``mask_alignment`` pipeline."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from cimd_pipeline.config import AlignmentParams
from cimd_pipeline.data.agreement import agreement_summary, agreement_table
from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.data.aligned_files import AlignedStream
from cimd_pipeline.data.alignment import align_cases
from cimd_pipeline.data.cases import Case
from cimd_pipeline.plots import agreement_histogram


def align_dataset(cases: Iterable[Case], alignment: dict[str, Any]) -> AlignedStream:
    """Slice, binarise, resize, normalise and split every ingested case.

    Returns the cases as a stream that the catalog writes one at a time (``.collect()`` stacks
    them in memory instead), so alignment needs memory for one case, not for the dataset.
    """
    p = AlignmentParams.model_validate(alignment)
    aligned = align_cases(
        cases,
        size=(p.image_size, p.image_size),
        resize_mode=p.resize_mode,
        normalisation=p.normalisation,
        binarise_threshold=p.binarise_threshold,
        slice_axis=p.slice_axis,
        empty_slice_share=p.empty_slice_share,
        seed=p.seed,
    )
    split = p.split if isinstance(p.split, str) else p.split.model_dump()
    return AlignedStream(aligned, split, p.seed)


def report_agreement(data: AlignedSet) -> tuple[pd.DataFrame, dict[str, dict[str, float]], Figure]:
    """Per-case agreement table, dataset summary (as MLflow metrics) and a histogram figure."""
    table = agreement_table(data)
    summary = agreement_summary(table)
    metrics = {k: {"value": v, "step": 0} for k, v in summary.items()}
    return table, metrics, agreement_histogram(table)
