"""Readers for multi-rater NIfTI sets: MS-MRI (ISBI 2015) and QUBIQ / CURVAS style folders.

A case is a set of files sharing a case key (by default their folder): one file per image
modality, which become the image channels, and one file per rater mask. 3-D volumes are turned
to the closest RAS+ orientation (a lossless flip/permutation) so ``alignment.slice_axis: 2`` means
axial for every scanner; any file still on another grid than the first modality is resampled
onto it with `resample_to_grid` (nearest-neighbour for masks, linear for images), because raters'
masks are not always saved on the image's grid. 2-D NIfTI files (most QUBIQ tasks) give 2-D cases.

Filename patterns are case-insensitive globs on the file name; defaults per source are in
`MSMRI_DEFAULTS` and `QUBIQ_DEFAULTS` and a key given in ``ingestion.reader`` replaces its default.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from pydantic import BaseModel, ConfigDict

from cimd_pipeline.data.cases import GIVEN_SPLIT, Case
from cimd_pipeline.data.grid import resample_to_grid, same_grid
from cimd_pipeline.data.readers.common import (
    Regex,
    data_files,
    given_split,
    group_of,
    natural_key,
    require_root,
    warn_dominant_group,
)
from cimd_pipeline.errors import DataError

logger = logging.getLogger(__name__)

MSMRI_DEFAULTS: dict[str, Any] = {
    "modalities": {
        "flair": ["*flair*"],
        "t1": ["t1*", "*_t1*", "*mprage*"],
        "t2": ["t2*", "*_t2*"],
        "pd": ["pd*", "*_pd*"],
    },
    "masks": ["mask*", "*_mask*"],
    "group_regex": r"^([^/]+)",  # <subject>/<time point>/...: the subject
}
QUBIQ_DEFAULTS: dict[str, Any] = {
    "modalities": {"image": ["image*"]},
    "masks": ["task01_seg*", "annotation*"],
}


class NiftiOptions(BaseModel):
    """``ingestion.reader`` options of the ``msmri`` and ``qubiq`` sources."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    modalities: dict[str, str | list[str]]  # channel name -> filename glob(s), in channel order
    masks: str | list[str]  # filename glob(s) of rater masks; raters in natural name order
    case_regex: Regex | None = None  # search in the relative path; group 1 is the case key
    group_regex: Regex | None = None  # search in the case key; group 1 is the patient/subject
    reorient: bool = True  # turn 3-D volumes to the closest RAS+ orientation


def read_msmri(root: Path | None, options: dict[str, Any], seed: int) -> Iterator[Case]:
    """ISBI 2015 style: ``<subject>/<time point>/{flair,t1,t2,pd,mask1,mask2}.nii[.gz]``."""
    return _read(root, {**MSMRI_DEFAULTS, **options}, "msmri")


def read_qubiq(root: Path | None, options: dict[str, Any], seed: int) -> Iterator[Case]:
    """QUBIQ / CURVAS style: ``<case>/image.nii.gz`` + ``task01_seg01...`` or ``annotation_k``."""
    return _read(root, {**QUBIQ_DEFAULTS, **options}, "qubiq")


def _patterns(value: str | list[str]) -> list[str]:
    return [value.lower()] if isinstance(value, str) else [v.lower() for v in value]


def _matches(path: Path, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(path.name.lower(), p) for p in patterns)


def _read(root: Path | None, options: dict[str, Any], source: str) -> Iterator[Case]:
    opts = NiftiOptions.model_validate(options)
    root = require_root(root, source)
    cases = _collect(root, opts)
    if not cases:
        raise DataError(root, "no NIfTI images found (no file matches the modality patterns)")
    groups = {key: group_of(key, opts.group_regex, next(iter(f.values()))) for key, (f, _) in cases.items()}
    warn_dominant_group(groups, opts.group_regex, root)
    logger.info("%s: %d %s cases", root, len(cases), source)
    return (_case(root, key, files, masks, groups[key], opts) for key, (files, masks) in cases.items())


def _case_key(root: Path, path: Path, regex: str | None) -> str | None:
    """The case of a file: its folder, or what ``case_regex`` finds (None: not a case file)."""
    relative = path.relative_to(root)
    if regex is None:
        parent = relative.parent.as_posix()
        return root.name if parent == "." else parent
    found = re.search(regex, relative.as_posix())
    if found is None:
        return None
    if "case" in found.groupdict():
        return found.group("case")
    return found.group(1) if found.re.groups else found.group(0)


def _collect(root: Path, opts: NiftiOptions) -> dict[str, tuple[dict[str, Path], list[Path]]]:
    """Case key -> ({modality: file}, [mask files]); refuses ambiguous or incomplete cases."""
    mask_patterns = _patterns(opts.masks)
    modality_patterns = {name: _patterns(p) for name, p in opts.modalities.items()}
    files: dict[str, dict[str, Path]] = {}
    masks: dict[str, list[Path]] = {}
    for path in data_files(root.rglob("*")):
        if not path.name.lower().endswith((".nii", ".nii.gz")):
            continue
        key = _case_key(root, path, opts.case_regex)
        if key is None:
            continue
        if _matches(path, mask_patterns):
            masks.setdefault(key, []).append(path)
            continue
        names = [n for n, p in modality_patterns.items() if _matches(path, p)]
        if len(names) > 1:
            raise DataError(path, f"file name matches several modalities {names}")
        if names:
            found = files.setdefault(key, {})
            if names[0] in found:
                first = found[names[0]].name
                raise DataError(path, f"second {names[0]} file in case {key!r} (first: {first})")
            found[names[0]] = path
    for key, paths in masks.items():
        if key not in files:
            raise DataError(paths[0], f"rater mask with no image in case {key!r}")
    for key, found in files.items():
        missing = [n for n in modality_patterns if n not in found]
        if missing:
            where = next(iter(found.values())).parent
            raise DataError(where, f"case {key!r} has no file for modality {', '.join(missing)}")
    return {
        key: (
            {name: files[key][name] for name in modality_patterns},
            sorted(masks.get(key, []), key=natural_key),
        )
        for key in sorted(files)
    }


def load_volume(path: Path, reorient: bool, is_mask: bool) -> tuple[np.ndarray, np.ndarray, bool]:
    """Read one NIfTI file as a 3-D array, its affine and whether it was a 2-D image.

    Images come back float32 and are refused when they hold NaN or inf; masks keep their dtype.
    2-D files get a trailing axis of one voxel so they share the 3-D grid maths.
    """
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj) if is_mask else image.get_fdata(dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error, ImageFileError, HeaderDataError) as exc:
        raise DataError(path, f"unreadable NIfTI file ({type(exc).__name__}: {exc})") from exc
    affine = np.asarray(image.affine, dtype=float)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise DataError(path, f"expected a 2-D or 3-D volume, got shape {data.shape}")
    if not is_mask and not np.isfinite(data).all():
        raise DataError(path, "image contains NaN or infinite intensities")
    flat = data.ndim == 2
    if flat:
        data = data[..., None]
    elif reorient:
        orientation = nib.orientations.io_orientation(affine)
        affine = affine @ nib.orientations.inv_ornt_aff(orientation, data.shape)
        data = nib.orientations.apply_orientation(data, orientation)
    return data, affine, flat


def _on_grid(
    path: Path,
    opts: NiftiOptions,
    is_mask: bool,
    grid: tuple[tuple[int, ...], np.ndarray, bool],
    reference: Path,
) -> np.ndarray:
    """Load ``path`` and resample it onto ``grid`` (shape, affine, 2-D) unless it is already there.

    A 2-D file beside a 3-D image (or the reverse) is refused: QUBIQ's brain-tumour images store
    four channels as a third axis, and slicing those as a volume would pair masks with channels.
    """
    data, affine, flat = load_volume(path, opts.reorient, is_mask)
    shape, grid_affine, grid_flat = grid
    if flat != grid_flat:
        dims = ("2-D", "3-D") if flat else ("3-D", "2-D")
        raise DataError(path, f"{dims[0]} file for the {dims[1]} image {reference.name}")
    if same_grid(data.shape, affine, shape, grid_affine):
        return data
    logger.info("%s: resampling onto the grid of %s", path, reference.name)
    order = 0 if is_mask else 1
    return resample_to_grid(data, affine, shape, grid_affine, order=order, source=path)


def _case(
    root: Path, key: str, files: dict[str, Path], mask_paths: list[Path], group: str, opts: NiftiOptions
) -> Case:
    """Stack modalities and masks on the first modality's grid; 2-D files give a 2-D case."""
    paths = list(files.values())
    reference, affine, flat = load_volume(paths[0], opts.reorient, is_mask=False)
    grid = (reference.shape, affine, flat)
    channels = [reference, *(_on_grid(p, opts, False, grid, paths[0]) for p in paths[1:])]
    masks = [_on_grid(p, opts, True, grid, paths[0]) for p in mask_paths]
    image = np.stack(channels).astype(np.float32, copy=False)
    stacked = np.stack(masks) if masks else np.zeros((0, *reference.shape), np.uint8)
    if flat:
        image, stacked = image[..., 0], stacked[..., 0]
    meta = {"source": str(paths[0]), "modalities": ",".join(files)}
    split = given_split(paths[0].relative_to(root).parts[:-1], paths[0])
    if split is not None:
        meta[GIVEN_SPLIT] = split
    case = Case(
        case_id=key,
        group_id=group,
        image=image,
        masks=stacked,
        rater_valid=np.ones(len(masks), dtype=bool),
        meta=meta,
    )
    return case.validate(paths[0])
