"""Reader for LIDC-IDRI: Knegt's ``data_lidc.pickle`` (Probabilistic U-Net, PyTorch) or the
public slice tree (`lidc_slices`), whichever ``ingestion.root`` holds (``layout: auto``).

The pickle is a dict ``key -> {"image": float 128x128, "masks": [4 x uint8 128x128],
"series_uid": str, ...}`` with 15,096 lesion-centred slices (~1.3 GB). Slices of one CT series
share a patient, so ``series_uid`` is the group that splits must keep together. The pickle is
opened with the allow-list unpickler, never plain ``pickle.load``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from cimd_pipeline.data.cases import Case
from cimd_pipeline.data.readers.lidc_slices import is_slice_tree, read_slice_tree
from cimd_pipeline.data.readers.safe_pickle import load_pickle
from cimd_pipeline.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


class LidcOptions(BaseModel):
    """``ingestion.reader`` options of the ``lidc`` source; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # auto: the pickle if `file` exists, else the slice tree if root holds one
    layout: Literal["auto", "pickle", "slices"] = "auto"
    file: str = "data_lidc.pickle"  # pickle layout: relative to ingestion.root (or absolute)


def read_lidc(root: Path | None, options: dict[str, Any], seed: int) -> Iterator[Case]:
    """Yield one 2-D case per slice; ``seed`` is unused (the file or the tree fixes the order).

    Options are checked now; the pickle is read when the first case is requested, so the run
    fails on a bad option before any data is touched.
    """
    opts = LidcOptions.model_validate(options)
    path = Path(opts.file)
    if not path.is_absolute():
        if root is None:
            raise ConfigError(f"ingestion.root: the lidc source needs the folder of {opts.file} or the slice tree")
        path = root / path
    layout = opts.layout
    if layout == "auto":
        layout = _detect(root, path)
        found = f"the LIDC slice tree in {root}" if layout == "slices" else f"the pickle {path}"
        logger.info("ingestion.reader.layout auto: reading %s (set layout: pickle|slices to choose)", found)
    if layout == "slices":
        if root is None or not root.is_dir():
            raise DataError(root or "ingestion.root", "no such folder (set ingestion.root to the slice tree)")
        return read_slice_tree(root)
    return _cases(path)


def _detect(root: Path | None, pickle_path: Path) -> str:
    """``pickle`` or ``slices`` from what is there; neither is an error that says what is."""
    if pickle_path.is_file():
        return "pickle"
    if root is not None and root.is_dir() and is_slice_tree(root):
        return "slices"
    if root is None:
        raise DataError(pickle_path, "no such file (set ingestion.reader.file, or ingestion.root to the slice tree)")
    if not root.is_dir():
        raise DataError(root, "no such folder (set ingestion.root)")
    hint = ""
    if (root / "LIDC-IDRI-slices").is_dir():
        hint = f"; set ingestion.root to {root / 'LIDC-IDRI-slices'}"
    raise DataError(
        root,
        f"neither the pickle {pickle_path.name} nor an LIDC slice tree "
        f"(<patient>/<nodule>/images/slice-*.png beside mask-*/) is here{hint}",
    )


def _cases(path: Path) -> Iterator[Case]:
    """Load the pickle when the first case is asked for, then hand the entries out one by one."""
    data = load_pickle(path)
    if not isinstance(data, dict):
        raise DataError(path, f"expected a dict of cases, got {type(data).__name__}")
    if not data:
        raise DataError(path, "the pickle holds no cases")
    logger.info("%s: %d LIDC slices", path, len(data))
    for key in list(data):
        # Popping hands each entry's arrays over to its Case; the dict never holds a second copy.
        yield _case(path, str(key), data.pop(key))


def _case(path: Path, key: str, entry: Any) -> Case:
    """One pickle entry as a `Case`; errors name the file and the entry's key."""
    where = f"{path} [case {key}]"
    if not isinstance(entry, dict):
        raise DataError(where, f"entry is a {type(entry).__name__}, expected a dict")
    missing = [k for k in ("image", "masks", "series_uid") if k not in entry]
    if missing:
        raise DataError(where, f"entry lacks {', '.join(missing)}")
    image = np.asarray(entry["image"])
    if image.ndim != 2 or not np.issubdtype(image.dtype, np.number):
        got = f"{image.dtype} {image.shape}"
        raise DataError(where, f"image must be a 2-D numeric array, got {got}")
    masks = [np.asarray(m) for m in entry["masks"]]
    shapes = {m.shape for m in masks}
    if len(shapes) > 1:
        raise DataError(where, f"rater masks have different shapes {sorted(shapes)}")
    stacked = np.stack(masks) if masks else np.zeros((0, *image.shape), np.uint8)
    extra = {
        k: v for k, v in entry.items()
        if k not in ("image", "masks") and isinstance(v, (str, int, float, bool))
    }
    case = Case(
        case_id=key,
        group_id=str(entry["series_uid"]),
        image=image.astype(np.float32)[None],
        masks=stacked,
        rater_valid=np.ones(len(masks), dtype=bool),
        meta={**extra, "source": str(path)},
    )
    return case.validate(where)
