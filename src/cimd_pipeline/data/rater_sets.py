"""The raters to score samples against, from an aligned dataset or straight from a rater tree.

Scoring needs the raters' masks as the dataset stores them: no resizing, no normalisation. Two
sources are known:

- an aligned dataset written by the ``mask_alignment`` pipeline (a folder with ``cases.csv``);
  the cases of one split are scored (``test`` by default), with the case ids it stores;
- a rater tree read by the ``folders`` reader. The LIDC slice tree
  (``<patient>/nodule-k/images/slice-i.png`` beside ``mask-0`` ... ``mask-3``, masks 0/255) is
  recognised by itself, with case ids ``LIDC-IDRI-0001/nodule-0/slice-3``; any other layout of
  that reader is read with its options (docs/datasets.md).

Every case of a tree must be 2-D and of one size, as one array of samples needs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cimd_pipeline.data.aligned import SPLITS, AlignedSet
from cimd_pipeline.data.alignment import binarise
from cimd_pipeline.data.readers.folders import read_folders
from cimd_pipeline.errors import DataError

logger = logging.getLogger(__name__)

#: ``folders`` reader options of the public LIDC slice tree (group = the patient folder).
LIDC_SLICE_TREE = {
    "layout": "rater_folders",
    "pattern": "*.png",
    "rater_glob": "mask-*",
    "mask_prefix": "",
    "group_regex": "^([^/]+)/",  # the patient folder
}
ALL = "all"


def is_aligned_dataset(path: Path) -> bool:
    return (path / "cases.csv").is_file() and (path / "masks.npy").is_file()


def is_lidc_slice_tree(path: Path) -> bool:
    """A folder ``<x>/<y>/images`` with ``mask-*`` folders beside it, at the usual depth."""
    for images in path.glob("*/*/images"):
        if images.is_dir() and any(p.is_dir() for p in images.parent.glob("mask-*")):
            return True
    return False


def load_aligned(path: Path, split: str = "test") -> AlignedSet:
    """One split (or ``all``) of an aligned dataset, memory-mapped."""
    from cimd_pipeline.io.aligned_dataset import AlignedDataset

    data = AlignedDataset(str(path)).load()
    if split == ALL:
        return data
    if split not in SPLITS:
        raise DataError(path, f"unknown split {split!r}; expected one of {(*SPLITS, ALL)}")
    chosen = data.subset(split)
    if len(chosen) == 0:
        raise DataError(path, f"the aligned dataset has no {split!r} cases")
    return chosen


def read_tree(root: Path, options: dict[str, Any] | None = None) -> AlignedSet:
    """Every case of a rater tree, masks binarised, at the size the files have."""
    options = dict(LIDC_SLICE_TREE if options is None else options)
    images, masks, valid, rows = [], [], [], []
    for case in read_folders(root, options, 0):
        source = case.meta.get("source", case.case_id)
        if images and case.image.shape != images[0].shape:
            raise DataError(source, f"image of shape {case.image.shape}, the first case's is {images[0].shape}")
        if masks and case.masks.shape[0] != masks[0].shape[0]:
            raise DataError(source, f"{case.masks.shape[0]} rater slots, the first case has {masks[0].shape[0]}")
        images.append(case.image)
        masks.append(binarise(case.masks, None, source))
        valid.append(case.rater_valid)
        rows.append({"case_id": case.case_id, "group_id": case.group_id, "split": "test", "source": source})
    logger.info("%s: %d rater cases", root, len(rows))
    return AlignedSet(np.stack(images), np.stack(masks), np.stack(valid), pd.DataFrame(rows))


def load_raters(path: str | Path, split: str = "test", reader_options: dict[str, Any] | None = None) -> AlignedSet:
    """The rater set at ``path``: an aligned dataset (its ``split``) or a rater tree (all cases).

    Args:
        reader_options: ``folders`` reader options for a tree that is not the LIDC slice tree.

    Raises:
        DataError: the folder is neither, naming what was looked for.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(path, "no such folder (raters: an aligned dataset or a rater tree)")
    if is_aligned_dataset(path):
        return load_aligned(path, split)
    if reader_options is not None or is_lidc_slice_tree(path):
        return read_tree(path, reader_options)
    raise DataError(
        path,
        "neither an aligned dataset (cases.csv + masks.npy) nor an LIDC slice tree "
        "(<patient>/<nodule>/images/*.png beside mask-0 ... folders); for another layout give "
        "the folders reader's options",
    )
