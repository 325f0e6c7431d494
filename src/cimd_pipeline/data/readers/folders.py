"""Reader for 2-D multi-rater sets stored as one image file plus one mask file per rater.

Three layouts (`folder_layouts`) cover the public releases:

- ``flat``: HPU-Net LIDC crops, ``<id>.png`` beside ``<id>_l0.png`` ... ``<id>_l3.png``; the
  rater suffix is a regex. Images and masks may sit in parallel trees (``images/`` and ``gt/``,
  dropped from the case id so the two trees pair up) or side by side in one folder.
- ``per_case``: one folder per case, CIMD style ``image_k.jpg`` + ``label0_.jpg`` ... or Bone-US
  style ``image.png`` + ``rater*.png``; globs select the image and the raters' masks.
- ``rater_folders``: ``images/<id>.png`` beside one folder per rater with ``seg_<id>.png``
  (BU-BIL style, rater-major).

JPEG masks are binarised here at ``mask_threshold`` (> 127 by default): JPEG ringing puts small
non-zero values around every edge, and the ``> 0`` rule of the public CIMD code roughly doubles
the foreground. In ``flat``/``per_case`` PNG masks pass unchanged and `mask_alignment` binarises
them (refusing soft masks without a threshold). ``rater_folders`` masks come from many tools in
any PIL mode, so they are binarised here from their luminance (`binary_mask`). A case binarised
here (every mask of it, once) carries ``BINARISED_ON_READ`` so that alignment does not cut the
{0, 1} result again with ``alignment.binarise_threshold``. All-empty masks
are kept: on Bone-US "no bone visible" is what raters often say.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cimd_pipeline.data.cases import BINARISED_ON_READ, GIVEN_SPLIT, Case
from cimd_pipeline.data.readers.common import (
    data_files,
    group_of,
    natural_text_key,
    require_root,
    warn_dominant_group,
)
from cimd_pipeline.data.readers.folder_layouts import LAYOUTS, CaseFiles, FolderOptions
from cimd_pipeline.errors import DataError

logger = logging.getLogger(__name__)

_JPEG = (".jpg", ".jpeg")
_PLAIN_MODES = ("L", "I", "I;16", "F")


def read_folders(root: Path | None, options: dict[str, Any], seed: int) -> Iterator[Case]:
    """Yield one 2-D case per image; ``seed`` is unused (cases come in sorted order)."""
    opts = FolderOptions.model_validate(options)
    root = require_root(root, "folders")
    cases = LAYOUTS[opts.layout](root, opts)
    if not cases:
        raise DataError(root, _nothing_found(root, opts))
    raters = sorted({r for files in cases.values() for r in files.masks}, key=natural_text_key)
    groups = {case_id: group_of(case_id, opts.group_regex, f.image) for case_id, f in cases.items()}
    warn_dominant_group(groups, opts.group_regex, root)
    logger.info("%s: %d cases, raters %s (%s layout)", root, len(cases), raters, opts.layout)
    return (_case(case_id, files, raters, groups[case_id], opts) for case_id, files in cases.items())


def _nothing_found(root: Path, opts: FolderOptions) -> str:
    """Say what is there and which option excludes it, so the fix is one ``--params`` away."""
    where = {
        "flat": f"ingestion.reader.pattern {opts.pattern!r}",
        "per_case": f"ingestion.reader.case_glob/image_glob {opts.case_glob + '/' + opts.image_glob!r}",
        "rater_folders": "ingestion.reader.images_folder/pattern "
        + repr(f"{opts.images_folder or 'images'}/{opts.pattern}"),
    }[opts.layout]
    present = data_files(root.rglob("*"))
    if not present:
        return f"no images found matching {where}: the folder holds no files"
    kinds = Counter(p.suffix.lower() or "(no extension)" for p in present)
    shown = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common(5))
    example = present[0].relative_to(root)
    return f"no images found matching {where}; the folder holds {shown} files, e.g. {example}"


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(path, f"unreadable image file ({exc})") from exc
    return image


def read_image(path: Path, color: str) -> np.ndarray:
    """float32 (C, H, W): one channel, or three for ``color="rgb"``."""
    image = _open(path)
    if color == "rgb":
        return np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
    if image.mode not in _PLAIN_MODES:
        image = image.convert("L")
    return np.asarray(image, dtype=np.float32)[None]


def read_mask(path: Path, threshold: float) -> np.ndarray:
    """(H, W) mask: JPEGs binarised at ``> threshold``, other formats as stored."""
    image = _open(path)
    if image.mode not in _PLAIN_MODES:
        image = image.convert("L")
    mask = np.asarray(image)
    if path.suffix.lower() in _JPEG:
        return (mask > threshold).astype(np.uint8)
    return mask


def binary_mask(path: Path, threshold: float, invert: bool) -> np.ndarray:
    """uint8 {0,1} (H, W) from a mask in any PIL mode (L, RGB, P palette, 1-bit, 16-bit).

    The luminance decides: a lossless mask holding zero and one other value (L {0,1} or {0,255},
    1-bit, a palette or colour label on black) has its non-zero pixels as foreground, whatever
    the label colour's luminance (a red label is 76 in luminance); JPEGs and masks with more
    values are cut at ``> threshold``.
    ``invert`` swaps foreground and background for sets that draw the object black.
    """
    values = read_mask(path, threshold)  # luminance; JPEGs come back cut at > threshold
    if path.suffix.lower() not in _JPEG:
        kinds = np.unique(values)
        two_level = len(kinds) <= 2 and (kinds[0] == 0 or kinds[-1] <= 1)
        values = values > (0 if two_level else threshold)
    mask = values.astype(bool)
    return (~mask if invert else mask).astype(np.uint8)


def _case(case_id: str, files: CaseFiles, raters: list[str], group: str, opts: FolderOptions) -> Case:
    """Read one case into the dataset's rater slots; a rater without a file here is invalid."""
    image = read_image(files.image, opts.color)
    # binarised once: here for the whole case if any mask needs it (JPEG) or the layout does
    on_read = opts.layout == "rater_folders" or any(p.suffix.lower() in _JPEG for p in files.masks.values())
    read: dict[str, np.ndarray] = {}
    for rater, path in files.masks.items():
        if on_read:
            mask = binary_mask(path, opts.mask_threshold, opts.mask_invert)
        else:
            mask = read_mask(path, opts.mask_threshold)
        if mask.shape != image.shape[1:]:
            image_shape = image.shape[1:]
            problem = f"rater mask shape {mask.shape} differs from the image {files.image}'s {image_shape}"
            raise DataError(path, problem)
        read[rater] = mask
    dtype = np.result_type(*read.values()) if read else np.uint8
    masks = np.zeros((len(raters), *image.shape[1:]), dtype=dtype)
    for slot, rater in enumerate(raters):
        if rater in read:
            masks[slot] = read[rater]
    meta: dict[str, Any] = {"source": str(files.image)}
    if on_read:
        meta[BINARISED_ON_READ] = opts.mask_threshold
    if files.split is not None:
        meta[GIVEN_SPLIT] = files.split
    case = Case(
        case_id=case_id,
        group_id=group,
        image=image,
        masks=masks,
        rater_valid=np.array([r in read for r in raters], dtype=bool),
        meta=meta,
    )
    return case.validate(files.image)
