"""The raters to score samples against, from an aligned dataset or straight from a rater tree.

Scoring needs the raters' masks as the dataset stores them: no resizing, no normalisation. Two
sources are known:

- an aligned dataset written by the ``mask_alignment`` pipeline (a folder with ``cases.csv``);
  the cases of one split are scored (``test`` by default), with the case ids it stores;
- a rater tree. The LIDC slice tree (``<patient>/nodule-k/images/slice-i.png`` beside
  ``mask-0`` ... ``mask-3``, masks 0/255) is recognised by itself and read by the ``lidc``
  source's slice reader, case ids ``LIDC-IDRI-0001/nodule-0/slice-3``; any other layout of the
  ``folders`` reader is read with its options (docs/datasets.md).

Every case of a tree must be 2-D and of one size, as one array of samples needs. Given the case
ids that have samples, the other cases are left out (a test split's samples cover a fifth of the
public tree's 15,548 slices).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cimd_pipeline.data.aligned import SPLITS, AlignedSet
from cimd_pipeline.data.aligned_files import read_aligned
from cimd_pipeline.data.alignment import binarise
from cimd_pipeline.data.cases import Case
from cimd_pipeline.data.readers.common import natural_key
from cimd_pipeline.data.readers.folders import read_folders
from cimd_pipeline.data.readers.lidc_slices import is_slice_tree, read_slice, slice_tree_files
from cimd_pipeline.errors import DataError

logger = logging.getLogger(__name__)

ALL = "all"
#: ``cases.attrs`` key of a tree read with ``case_ids``: how many of its cases were left out.
LEFT_OUT = "cases_without_samples"


def is_aligned_dataset(path: Path) -> bool:
    return (path / "cases.csv").is_file() and (path / "masks.npy").is_file()


def load_aligned(path: Path, split: str = "test") -> AlignedSet:
    """One split (or ``all``) of an aligned dataset, memory-mapped."""
    data = read_aligned(path)
    if split == ALL:
        return data
    if split not in SPLITS:
        raise DataError(path, f"unknown split {split!r}; expected one of {(*SPLITS, ALL)}")
    chosen = data.subset(split)
    if len(chosen) == 0:
        raise DataError(path, f"the aligned dataset has no {split!r} cases")
    return chosen


def lidc_cases(root: Path, case_ids: Collection[str] | None = None) -> tuple[Iterator[Case], int]:
    """The slices of an LIDC slice tree (only those in ``case_ids`` when given; the others are
    not even opened), read one at a time, and how many were left out."""
    files = slice_tree_files(root)
    if not files:
        raise DataError(root, "no slices found (expected <patient>/<nodule>/images/slice-*.png)")
    raters = sorted({r for *_, masks in files for r in masks}, key=lambda r: natural_key(Path(r)))
    wanted = None if case_ids is None else set(case_ids)
    kept = files if wanted is None else [entry for entry in files if entry[0] in wanted]
    return (read_slice(*entry, raters) for entry in kept), len(files) - len(kept)


def stack_tree(cases: Iterable[Case], root: Path, left_out: int = 0) -> AlignedSet:
    """Stack a tree's cases as they are (masks binarised, no resizing or normalisation);
    ``left_out`` (cases without samples not read) is kept in ``cases.attrs[LEFT_OUT]``."""
    images, masks, valid, rows = [], [], [], []
    for case in cases:
        source = case.meta.get("source", case.case_id)
        if images and case.image.shape != images[0].shape:
            raise DataError(source, f"image of shape {case.image.shape}, the first case's is {images[0].shape}")
        if masks and case.masks.shape[0] != masks[0].shape[0]:
            raise DataError(source, f"{case.masks.shape[0]} rater slots, the first case has {masks[0].shape[0]}")
        images.append(case.image)
        masks.append(binarise(case.masks, None, source))
        valid.append(case.rater_valid)
        rows.append({"case_id": case.case_id, "group_id": case.group_id, "split": "test", "source": source})
    if not rows:
        raise DataError(root, "none of the tree's cases has samples")
    logger.info("%s: %d rater cases read, %d without samples left out", root, len(rows), left_out)
    table = pd.DataFrame(rows)
    table.attrs[LEFT_OUT] = left_out
    return AlignedSet(np.stack(images), np.stack(masks), np.stack(valid), table)


def load_raters(
    path: str | Path,
    split: str = "test",
    reader_options: dict[str, Any] | None = None,
    case_ids: Collection[str] | None = None,
) -> AlignedSet:
    """The rater set at ``path``: an aligned dataset (its ``split``) or a rater tree (all cases).

    Args:
        reader_options: ``folders`` reader options for a tree that is not the LIDC slice tree.
        case_ids: read only these cases of a rater tree (the others are not scored).

    Raises:
        DataError: the folder is neither, naming what was looked for.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(path, "no such folder (raters: an aligned dataset or a rater tree)")
    if is_aligned_dataset(path):
        return load_aligned(path, split)
    wanted = None if case_ids is None else set(case_ids)
    if reader_options is not None:
        cases = list(read_folders(path, reader_options, 0))
        kept = [c for c in cases if wanted is None or c.case_id in wanted]
        return stack_tree(kept, path, len(cases) - len(kept))
    if is_slice_tree(path):
        slices, left_out = lidc_cases(path, wanted)
        return stack_tree(slices, path, left_out)
    raise DataError(
        path,
        "neither an aligned dataset (cases.csv + masks.npy) nor an LIDC slice tree "
        "(<patient>/<nodule>/images/*.png beside mask-0 ... folders); for another layout give "
        "the folders reader's options",
    )
