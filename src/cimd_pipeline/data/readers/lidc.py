"""Reader for the LIDC-IDRI slices of Knegt's ``data_lidc.pickle`` (Probabilistic U-Net, PyTorch).

The file is a dict ``key -> {"image": float 128x128, "masks": [4 x uint8 128x128],
"series_uid": str, ...}`` with 15,096 lesion-centred slices (~1.3 GB). Slices of one CT series
share a patient, so ``series_uid`` is the group that splits must keep together. The pickle is
opened with the allow-list unpickler, never plain ``pickle.load``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from cimd_pipeline.data.cases import Case
from cimd_pipeline.data.readers.safe_pickle import load_pickle
from cimd_pipeline.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


class LidcOptions(BaseModel):
    """``ingestion.reader`` options of the ``lidc`` source; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    file: str = "data_lidc.pickle"  # relative to ingestion.root (or absolute)


def read_lidc(root: Path | None, options: dict[str, Any], seed: int) -> Iterator[Case]:
    """Yield one 2-D case per pickle entry; ``seed`` is unused (the file fixes the order).

    Options are checked now; the pickle is read when the first case is requested, so the run
    fails on a bad option before any data is touched.
    """
    opts = LidcOptions.model_validate(options)
    path = Path(opts.file)
    if not path.is_absolute():
        if root is None:
            raise ConfigError(f"ingestion.root: the lidc source needs the folder of {opts.file}")
        path = root / path
    return _cases(path)


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
