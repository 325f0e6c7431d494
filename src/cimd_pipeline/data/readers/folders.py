"""Reader for 2-D multi-rater sets stored as one image file plus one mask file per rater.

Two layouts cover the public releases:

- ``flat``: HPU-Net LIDC crops, ``<id>.png`` beside ``<id>_l0.png`` ... ``<id>_l3.png``; the
  rater suffix is a regex. Images and masks may sit in parallel trees (``images/`` and ``gt/``):
  the folder names are dropped from the case id so the two trees pair up.
- ``per_case``: one folder per case, CIMD style ``image_k.jpg`` + ``label0_k.jpg`` ... or Bone-US
  style ``image.png`` + ``rater*.png``; globs select the image and the raters' masks.

JPEG masks are binarised here at ``mask_threshold`` (> 127 by default): JPEG ringing puts small
non-zero values around every edge, and the ``> 0`` rule of the public CIMD code roughly doubles
the foreground. PNG masks pass unchanged; `mask_alignment` binarises them. All-empty masks are
kept: on Bone-US "no bone visible" is what raters often say.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from PIL import Image
from pydantic import AfterValidator, BaseModel, ConfigDict

from cimd_pipeline.data.cases import Case
from cimd_pipeline.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

_JPEG = (".jpg", ".jpeg")
_PLAIN_MODES = ("L", "I", "I;16", "F")


def _compiles(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return pattern


Regex = Annotated[str, AfterValidator(_compiles)]
"""A regular expression option, compiled when the parameters are checked."""


class FolderOptions(BaseModel):
    """``ingestion.reader`` options of the ``folders`` source; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    layout: Literal["flat", "per_case"] = "flat"
    # flat: files under root matching `pattern`; a stem ending in `rater_suffix` is a mask.
    pattern: str = "**/*.png"
    rater_suffix: Regex = r"_l(\d+)"
    images_folder: str | None = None  # e.g. "images": dropped from the case id of images
    masks_folder: str | None = None  # e.g. "gt": dropped from the case id of masks
    # per_case: folders matching `case_glob` under root, each with one image and rater masks.
    case_glob: str = "*"
    image_glob: str = "image*"
    mask_glob: str = "label*"
    # both layouts
    group_regex: Regex | None = None  # group 1 (or (?P<group>...)) of a search in the case id
    mask_threshold: float = 127  # JPEG masks: foreground is value > mask_threshold
    color: Literal["gray", "rgb"] = "gray"  # colour images: one luminance channel or three


def natural_key(path: Path) -> list[Any]:
    """Sort ``label2`` before ``label10`` (rater order must not depend on zero padding)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def group_of(case_id: str, regex: str | None, source: object) -> str:
    """The group (patient) of a case: the case id itself, or what ``regex`` finds in it."""
    if regex is None:
        return case_id
    found = re.search(regex, case_id)
    if found is None:
        raise DataError(source, f"case id {case_id!r} does not match group_regex {regex!r}")
    if "group" in found.groupdict():
        return found.group("group")
    return found.group(1) if found.re.groups else found.group(0)


def data_files(paths: Iterable[Path]) -> list[Path]:
    """Sorted regular files, without hidden ones (``._x.png`` copies that macOS leaves behind)."""
    return sorted(p for p in paths if p.is_file() and not p.name.startswith("."))


def require_root(root: Path | None, source: str) -> Path:
    """The dataset folder, or a clear error when it is not configured or missing."""
    if root is None:
        raise ConfigError(f"ingestion.root: the {source} source needs the dataset folder")
    if not root.is_dir():
        raise DataError(root, "no such folder (set ingestion.root)")
    return root


def read_folders(root: Path | None, options: dict[str, Any], seed: int) -> Iterator[Case]:
    """Yield one 2-D case per image; ``seed`` is unused (cases come in sorted order)."""
    opts = FolderOptions.model_validate(options)
    root = require_root(root, "folders")
    pairs = _flat_pairs(root, opts) if opts.layout == "flat" else _per_case_pairs(root, opts)
    if not pairs:
        where = opts.pattern if opts.layout == "flat" else f"{opts.case_glob}/{opts.image_glob}"
        raise DataError(root, f"no images found matching {where!r}")
    logger.info("%s: %d cases (%s layout)", root, len(pairs), opts.layout)
    return (_case(case_id, image, masks, opts) for case_id, (image, masks) in pairs.items())


def _drop_folder(parts: tuple[str, ...], folder: str | None) -> tuple[str, ...] | None:
    """Remove ``folder`` from a relative path's folders; None when the path is not under one."""
    if folder is None:
        return parts
    if folder not in parts[:-1]:
        return None
    at = parts.index(folder)
    return parts[:at] + parts[at + 1 :]


def _flat_pairs(root: Path, opts: FolderOptions) -> dict[str, tuple[Path, list[Path]]]:
    """Case id -> (image, rater masks), pairing files by name; every mask must find its image."""
    suffix = re.compile(f"(?:{opts.rater_suffix})$")
    images: dict[str, Path] = {}
    masks: dict[str, list[Path]] = {}
    for path in data_files(root.glob(opts.pattern)):
        found = suffix.search(path.stem)
        folder = opts.masks_folder if found else opts.images_folder
        parts = _drop_folder(path.relative_to(root).parts, folder)
        if parts is None:
            continue
        stem = path.stem[: found.start()] if found else path.stem
        case_id = "/".join((*parts[:-1], stem))
        if found:
            masks.setdefault(case_id, []).append(path)
        elif case_id in images:
            raise DataError(path, f"second image for case {case_id!r} ({images[case_id].name})")
        else:
            images[case_id] = path
    for case_id, files in masks.items():
        if case_id not in images:
            raise DataError(files[0], f"rater mask with no image (no image for case {case_id!r})")
    return {k: (images[k], sorted(masks.get(k, []), key=natural_key)) for k in sorted(images)}


def _per_case_pairs(root: Path, opts: FolderOptions) -> dict[str, tuple[Path, list[Path]]]:
    """Case folder -> (its one image, its rater masks); folders with neither are not cases."""
    pairs: dict[str, tuple[Path, list[Path]]] = {}
    for folder in sorted(p for p in root.glob(opts.case_glob) if p.is_dir()):
        masks = sorted(data_files(folder.glob(opts.mask_glob)), key=natural_key)
        images = [p for p in data_files(folder.glob(opts.image_glob)) if p not in masks]
        if len(images) > 1:
            names = [p.name for p in images]
            raise DataError(folder, f"several images match {opts.image_glob!r}: {names}")
        if not images and masks:
            problem = f"rater mask with no image (nothing matches {opts.image_glob!r})"
            raise DataError(masks[0], problem)
        if images:
            pairs[folder.relative_to(root).as_posix()] = (images[0], masks)
    return pairs


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


def _case(case_id: str, image_path: Path, mask_paths: list[Path], opts: FolderOptions) -> Case:
    """Read one case; mask shapes are checked here because only the files know their sizes."""
    image = read_image(image_path, opts.color)
    masks: list[np.ndarray] = []
    for path in mask_paths:
        mask = read_mask(path, opts.mask_threshold)
        if masks and mask.shape != masks[0].shape:
            first = f"{mask_paths[0].name}'s {masks[0].shape}"
            raise DataError(path, f"rater mask shape {mask.shape} differs from {first}")
        if mask.shape != image.shape[1:]:
            problem = f"rater mask shape {mask.shape} differs from the image's {image.shape[1:]}"
            raise DataError(path, problem)
        masks.append(mask)
    stacked = np.stack(masks) if masks else np.zeros((0, *image.shape[1:]), np.uint8)
    case = Case(
        case_id=case_id,
        group_id=group_of(case_id, opts.group_regex, image_path),
        image=image,
        masks=stacked,
        rater_valid=np.ones(len(masks), dtype=bool),
        meta={"source": str(image_path)},
    )
    return case.validate(image_path)
