"""Masks another model drew, read from the files other code writes, and matched to our raters.

The evaluator scores any method's output, so it reads the formats public segmentation code
saves (docs/evaluation.md has the details and examples):

- ``.npz``: key ``samples`` (cases, N, H, W) and key ``case_ids`` (cases,) strings; or the file
  this project's own sampling pipeline writes (``test_samples.npz``).
- ``.npy``: (cases, N, H, W) with ``<name>.case_ids.txt`` beside it, one case id per line.
- a folder of PNG masks: every folder holding PNG files is one case, its case id the folder's
  path below the root with ``/`` (``LIDC-IDRI-0001/nodule-0/slice-3/sample-0.png``); each PNG is
  one sample, in natural order of the file names.
- NIfTI: ``<case id>.nii[.gz]`` below the root. X × Y × N is one 2-D case; X × Y × Z × N is a
  volume (reoriented to RAS+ as the NIfTI readers do), cut along Z into the cases
  ``<case id>_s000`` ... as ``mask_alignment`` names slices. Slices that alignment left out are
  skipped, not refused.

Values must be binary ({0, 1}, {0, 255} or bool) unless a threshold is given; NaN is always an
error. Every error names the file. Nothing here knows Kedro.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cimd_pipeline.data.alignment import binary_kind
from cimd_pipeline.data.readers.common import natural_key
from cimd_pipeline.errors import DataError

logger = logging.getLogger(__name__)

#: Beside ``samples.npy``: ``samples.case_ids.txt`` (one id per line, in the array's order).
CASE_IDS_SUFFIX = ".case_ids.txt"
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class ExternalSamples:
    """Samples read from disk, one row per case.

    Attributes:
        case_ids: (B,) str case ids, in the order of ``binary``.
        binary: uint8 (B, N, H, W) masks in {0, 1}.
        sources: (B,) the file (or folder) each case came from, named in errors.
        from_volume: (B,) bool, True for slices cut from a NIfTI volume (those may be absent from
            the raters: alignment keeps only some empty slices).
        info: what the evaluation summary records about where the samples came from.
    """

    case_ids: np.ndarray
    binary: np.ndarray
    sources: list[str]
    from_volume: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def _binary(values: np.ndarray, threshold: float | None, source: object) -> np.ndarray:
    """uint8 {0, 1} from bool, {0, 1}, {0, 255} or (with ``threshold``) any finite values."""
    values = np.asarray(values)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise DataError(source, "samples contain NaN or infinite values")
    if threshold is not None:
        return (values > threshold).astype(np.uint8)
    kind = binary_kind(values)
    if kind == "01":
        return values.astype(np.uint8)
    if kind == "0255":
        return (values > 127).astype(np.uint8)
    kinds = np.unique(values)
    shown = ", ".join(f"{v:g}" for v in kinds[:6])
    raise DataError(
        source,
        f"non-binary sample values ({shown}{', ...' if len(kinds) > 6 else ''}); masks must be "
        "{0,1} or {0,255}, or give a threshold (soft outputs: foreground is value > threshold)",
    )


def _array_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(case_ids, samples) of one ``.npz`` or ``.npy`` file (never unpickled)."""
    try:
        if path.suffix == ".npy":
            samples = np.load(path, mmap_mode="r", allow_pickle=False)
            ids_file = path.with_name(path.stem + CASE_IDS_SUFFIX)
            if not ids_file.is_file():
                raise DataError(path, f"no case ids: write them one per line to {ids_file.name} beside it")
            ids = np.asarray([s.strip() for s in ids_file.read_text().splitlines() if s.strip()])
            return ids, samples
        with np.load(path, allow_pickle=False) as data:
            if "binary_bits" in data and "shape" in data:  # this project's sampling output
                shape = tuple(int(s) for s in data["shape"])
                bits = np.unpackbits(data["binary_bits"], count=int(np.prod(shape)))
                return np.asarray(data["case_ids"]).astype(str), bits.reshape(shape)
            missing = [k for k in ("samples", "case_ids") if k not in data]
            if missing:
                raise DataError(path, f"npz without key(s) {missing}; keys present: {sorted(data.files)}")
            return np.asarray(data["case_ids"]).astype(str), data["samples"]
    except (OSError, ValueError, EOFError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(path, f"unreadable array file ({type(exc).__name__}: {exc})") from exc


def _read_arrays(path: Path, threshold: float | None) -> ExternalSamples:
    ids, samples = _array_file(path)
    if samples.ndim != 4:
        raise DataError(path, f"samples must be (cases, N, H, W), got shape {samples.shape}")
    if len(ids) != len(samples):
        raise DataError(path, f"{len(ids)} case ids for {len(samples)} cases of samples")
    duplicated = sorted({c for c in ids if (ids == c).sum() > 1})
    if duplicated:
        raise DataError(path, f"case id(s) given twice: {duplicated[:5]}")
    binary = np.empty(samples.shape, dtype=np.uint8)
    for i, case_id in enumerate(ids):
        binary[i] = _binary(samples[i], threshold, f"{path} (case {case_id})")
    return ExternalSamples(ids.astype(str), binary, [str(path)] * len(ids), np.zeros(len(ids), bool))


def _png(path: Path, threshold: float | None) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(path, f"unreadable image file ({exc})") from exc
    if image.mode not in ("1", "L", "I", "I;16", "F"):
        image = image.convert("L")
    return _binary(np.asarray(image), threshold, path)


def _read_pngs(root: Path, threshold: float | None) -> ExternalSamples:
    """Each folder holding PNGs is a case; all cases are written into one preallocated array
    (the public LIDC test split at 16 samples is 0.8 GB of masks: one copy only)."""
    folders = sorted({p.parent for p in root.rglob("*.png") if not p.name.startswith(".")})
    if not folders:
        raise DataError(root, "no PNG files below this folder (one folder of PNG masks per case)")
    ancestors = {parent for folder in folders for parent in folder.parents}
    binary: np.ndarray | None = None
    for i, folder in enumerate(folders):
        if folder in ancestors:
            raise DataError(folder, "holds sample PNGs and case folders below it; put each case's PNGs "
                            "in a folder of their own")
        files = sorted((p for p in folder.glob("*.png") if not p.name.startswith(".")), key=natural_key)
        masks = [_png(p, threshold) for p in files]
        shapes = {m.shape for m in masks}
        if len(shapes) > 1:
            raise DataError(folder, f"sample PNGs of different sizes {sorted(shapes)}")
        if binary is None:
            binary = np.empty((len(folders), len(masks), *masks[0].shape), dtype=np.uint8)
        if len(masks) != binary.shape[1]:
            raise DataError(folder, f"{len(masks)} samples here, the first case ({folders[0]}) has "
                            f"{binary.shape[1]}: every case needs the same number of samples")
        if masks[0].shape != binary.shape[2:]:
            raise DataError(folder, f"samples of size {masks[0].shape}, the first case's are {binary.shape[2:]}")
        binary[i] = np.stack(masks)
    ids = ["." if folder == root else folder.relative_to(root).as_posix() for folder in folders]
    return ExternalSamples(np.asarray(ids), binary, [str(f) for f in folders], np.zeros(len(ids), bool))


def _nifti_id(root: Path, path: Path) -> str:
    name = path.name
    stem = next(name[: -len(s)] for s in NIFTI_SUFFIXES if name.endswith(s))
    return "/".join((*path.relative_to(root).parts[:-1], stem))


def _read_nifti_file(path: Path, root: Path, threshold: float | None) -> tuple[list[str], list[np.ndarray], bool]:
    """(case ids, (N, H, W) samples per case, whether the file was a volume)."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except (OSError, EOFError, ValueError, ImageFileError) as exc:
        raise DataError(path, f"unreadable NIfTI file ({type(exc).__name__}: {exc})") from exc
    case_id = _nifti_id(root, path)
    if data.ndim == 3:  # X x Y x N: one 2-D case, H = X and W = Y as the NIfTI readers take them
        return [case_id], [_binary(np.moveaxis(data, -1, 0), threshold, path)], False
    if data.ndim != 4:
        raise DataError(path, f"expected X x Y x N or X x Y x Z x N samples, got shape {data.shape}")
    orientation = nib.orientations.io_orientation(image.affine)
    data = _binary(nib.orientations.apply_orientation(data, orientation), threshold, path)
    volume = np.moveaxis(data, (2, 3), (0, 1))  # (Z, N, X, Y)
    return [f"{case_id}_s{k:03d}" for k in range(len(volume))], list(volume), True


def _read_nifti(root: Path, threshold: float | None) -> ExternalSamples:
    files = [root] if root.is_file() else sorted(
        (p for p in root.rglob("*") if p.is_file() and p.name.endswith(NIFTI_SUFFIXES)), key=natural_key
    )
    base = root.parent if root.is_file() else root
    ids, stacks, sources, volume = [], [], [], []
    for path in files:
        found, masks, is_volume = _read_nifti_file(path, base, threshold)
        ids += found
        stacks += masks
        sources += [str(path)] * len(found)
        volume += [is_volume] * len(found)
    if not stacks:
        raise DataError(root, "no NIfTI files (.nii, .nii.gz) below this folder")
    shapes = {s.shape for s in stacks}
    if len(shapes) > 1:
        odd = next(i for i, s in enumerate(stacks) if s.shape != stacks[0].shape)
        raise DataError(sources[odd], f"samples of shape {stacks[odd].shape} (N, H, W), "
                        f"{sources[0]} has {stacks[0].shape}")
    return ExternalSamples(np.asarray(ids), np.stack(stacks), sources, np.asarray(volume, dtype=bool))


def read_samples(path: str | Path, threshold: float | None = None) -> ExternalSamples:
    """Read samples in any of the formats of this module's docstring, chosen by what ``path`` is.

    Args:
        path: an ``.npz``/``.npy`` file, a NIfTI file, or a folder of PNG case folders or NIfTI files.
        threshold: soft outputs are binarised at ``value > threshold``; None: values must be binary.

    Raises:
        DataError: naming the file, for an unknown format, unreadable or non-binary values, NaN,
            cases with different sample counts or sizes, or no samples at all.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file or folder")
    if path.is_file() and path.suffix in (".npz", ".npy"):
        samples = _read_arrays(path, threshold)
    elif path.name.endswith(NIFTI_SUFFIXES):
        samples = _read_nifti(path, threshold)
    elif path.is_file():
        raise DataError(path, "unknown samples format: expected .npz, .npy, .nii(.gz) or a folder")
    elif any(p.name.endswith(NIFTI_SUFFIXES) for p in path.rglob("*.nii*")):
        samples = _read_nifti(path, threshold)
    else:
        samples = _read_pngs(path, threshold)
    if samples.binary.shape[1] == 0:
        raise DataError(path, "zero samples per case")
    samples.info = {"sampling_method": "external", "samples_path": str(path)}
    logger.info("%s: %d cases x %d samples of %s", path, *samples.binary.shape[:2], samples.binary.shape[2:])
    return samples


def resize_nearest(binary: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (B, N, H, W) masks resized to ``size`` by nearest neighbour (no new values)."""
    tensor = torch.from_numpy(np.ascontiguousarray(binary)).float()
    return F.interpolate(tensor, size=tuple(size), mode="nearest-exact").to(torch.uint8).numpy()


def match_to_raters(
    samples: ExternalSamples,
    rater_ids: Sequence[str],
    rater_size: tuple[int, int],
    resize: bool = False,
    allow_missing: bool = False,
) -> ExternalSamples:
    """The samples of ``rater_ids`` (in the samples' order; scoring pairs them with raters by
    case id), at the raters' size.

    Args:
        rater_ids: the cases to score (every one needs samples unless ``allow_missing``).
        rater_size: (H, W) of the rater masks.
        resize: resize samples of another size by nearest neighbour instead of refusing them.
        allow_missing: score only the rater cases that have samples (logged with the count).

    Raises:
        DataError: samples of another size (both sizes named), a sample case id that is not a
            rater case (naming its file), rater cases without samples.
    """
    where = samples.info.get("samples_path", samples.sources[0] if samples.sources else "samples")
    size = tuple(int(s) for s in samples.binary.shape[2:])
    rater_size = tuple(int(s) for s in rater_size)
    binary = samples.binary
    if size != rater_size:
        if not resize:
            raise DataError(
                where,
                f"samples are {size[0]}x{size[1]} but the raters' masks are {rater_size[0]}x{rater_size[1]}; "
                "resize them by nearest neighbour only if that is what you mean (resize option)",
            )
        logger.warning("%s: samples resized from %s to %s (nearest neighbour)", where, size, rater_size)
        binary = resize_nearest(binary, rater_size)
    position = {case_id: i for i, case_id in enumerate(rater_ids)}
    known = np.asarray([c in position for c in samples.case_ids], dtype=bool)
    unknown = np.flatnonzero(~known & ~samples.from_volume)
    if len(unknown):
        i = unknown[0]
        example = next(iter(position), None)
        raise DataError(
            samples.sources[i],
            f"case id {str(samples.case_ids[i])!r} is not among the {len(position)} rater cases scored "
            f"(e.g. {example!r}); {len(unknown)} sample case(s) have no raters",
        )
    if (~known).any():
        logger.info("%s: %d volume slices without raters skipped", where, int((~known).sum()))
    have = set(samples.case_ids[known])
    missing = [c for c in rater_ids if c not in have]
    if missing and not allow_missing:
        raise DataError(
            where,
            f"{len(missing)} of {len(rater_ids)} rater cases have no samples, e.g. {[str(m) for m in missing[:3]]}",
        )
    if missing:
        logger.warning("%s: %d of %d rater cases have no samples and are not scored", where, len(missing), len(rater_ids))
    if known.all():  # scoring finds each case's raters by id: no reordering copy
        kept, binary_kept = np.arange(len(known)), binary
    else:
        kept = np.flatnonzero(known)
        binary_kept = binary[kept]
    return ExternalSamples(
        case_ids=samples.case_ids[kept],
        binary=binary_kept,
        sources=[samples.sources[i] for i in kept],
        from_volume=samples.from_volume[kept],
        info={**samples.info, "rater_cases_without_samples": len(missing)},
    )
