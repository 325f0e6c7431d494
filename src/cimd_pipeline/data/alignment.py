"""Alignment maths: from ingested cases to fixed-size, normalised, binary, split 2-D cases.

Pure numpy/torch functions with no Kedro in them, so each step is testable on its own and the
inference path can apply exactly the same image transform as training did.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from enum import Enum

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.data.cases import BINARISED_ON_READ, Case
from cimd_pipeline.data.splits import choose_splits
from cimd_pipeline.errors import DataError


class ResizeMode(str, Enum):
    RESIZE = "resize"
    CROP_PAD = "crop_pad"


class Normalisation(str, Enum):
    ZSCORE = "zscore"
    MINMAX = "minmax"
    NONE = "none"


def binarise(
    masks: np.ndarray, threshold: float | None, source: object, binarised_at: float | None = None
) -> np.ndarray:
    """Return uint8 {0,1} masks; binarisation happens once, on the values the files store.

    Masks already in {0,1} or {0,255} need no threshold (8-bit PNG masks store 255). Anything else
    (soft masks, JPEG halos) needs an explicit ``threshold`` in the mask's own value range; without
    one we refuse rather than guess, because ``> 0`` on JPEG masks doubles the foreground.
    A threshold that cannot mean that is refused: on masks a reader already binarised at
    ``binarised_at`` (JPEG masks, the rater_folders layout), and at 1 or more on {0,1} masks,
    where it would empty every mask and make empty-vs-empty score as a perfect match.
    """
    masks = np.asarray(masks)
    if binarised_at is not None:
        if threshold is not None:
            raise DataError(
                source,
                f"the reader already binarised these rater masks at > {binarised_at:g} "
                f"(ingestion.reader.mask_threshold); alignment.binarise_threshold {threshold:g} would "
                "cut its {0, 1} output a second time: set alignment.binarise_threshold to null and "
                "change ingestion.reader.mask_threshold instead",
            )
        return masks.astype(np.uint8)
    kind = binary_kind(masks)
    if threshold is not None:
        if kind == "01" and threshold >= 1 and masks.any():
            raise DataError(
                source,
                f"rater masks are already binary (values 0, 1); alignment.binarise_threshold "
                f"{threshold:g} would empty every mask: set it to null (a threshold is for soft or "
                "8-bit masks, in their own value range)",
            )
        return (masks > threshold).astype(np.uint8)
    if kind == "01":
        return masks.astype(np.uint8)
    if kind == "0255":
        return (masks > 127).astype(np.uint8)
    values = np.unique(masks)
    shown = ", ".join(f"{v:g}" for v in values[:6])
    raise DataError(
        source,
        f"non-binary rater masks (values {shown}{', ...' if len(values) > 6 else ''}) and no "
        "binarisation threshold configured (set alignment.binarise_threshold)",
    )


def binary_kind(masks: np.ndarray) -> str | None:
    """``"01"``, ``"0255"`` or None, without sorting the values (``np.unique`` costs ~1 ms per
    128x128x4 case, a quarter of a minute on LIDC)."""
    if masks.dtype == bool or masks.size == 0:
        return "01"
    top = masks.max()
    if masks.min() < 0:
        return None
    if top <= 1:
        return "01" if ((masks == 0) | (masks == 1)).all() else None
    if top == 255 and ((masks == 0) | (masks == 255)).all():
        return "0255"
    return None


def slice_volume(case: Case, axis: int, empty_share: float, rng: np.random.Generator) -> list[Case]:
    """Cut a 3-D case (C, D, H, W) into 2-D cases along spatial ``axis`` (0, 1 or 2).

    Keeps every slice where any valid rater drew foreground plus a random ``empty_share`` of the
    remaining slices (empty slices are real data, but too many of them drown the lesions).
    """
    if case.image.ndim == 3:
        return [case]
    image = np.moveaxis(case.image, axis + 1, 1)
    masks = np.moveaxis(case.masks, axis + 1, 1)
    oracle = None if case.oracle is None else np.moveaxis(case.oracle, axis + 1, 1)
    foreground = masks[case.rater_valid].reshape(int(case.rater_valid.sum()), masks.shape[1], -1)
    has_fg = (foreground > 0).any(axis=(0, 2))
    keep = has_fg | (rng.random(len(has_fg)) < empty_share)
    return [
        replace(
            case,
            case_id=f"{case.case_id}_s{k:03d}",
            image=image[:, k],
            masks=masks[:, k],
            oracle=None if oracle is None else oracle[:, k],
            meta={**case.meta, "slice": int(k)},
        )
        for k in np.flatnonzero(keep)
    ]


def fit_to_size(array: np.ndarray, size: tuple[int, int], mode: ResizeMode, is_mask: bool) -> np.ndarray:
    """Resize or centre-crop/zero-pad (K, H, W) to (K, *size).

    Masks are resized by area averaging then thresholded at 0.5 so thin structures shrink
    gracefully instead of vanishing as they do with nearest-neighbour down-sampling.
    """
    if array.shape[1:] == tuple(size):
        return array
    if mode is ResizeMode.CROP_PAD:
        out = np.zeros((array.shape[0], *size), dtype=array.dtype)
        (h, w), (th, tw) = array.shape[1:], size
        sy, sx = max(0, (h - th) // 2), max(0, (w - tw) // 2)
        dy, dx = max(0, (th - h) // 2), max(0, (tw - w) // 2)
        ch, cw = min(h, th), min(w, tw)
        out[:, dy : dy + ch, dx : dx + cw] = array[:, sy : sy + ch, sx : sx + cw]
        return out
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    shrinking = size[0] <= array.shape[1] and size[1] <= array.shape[2]
    resized = F.interpolate(tensor, size=size, mode="area" if shrinking else "bilinear")[0].numpy()
    return (resized >= 0.5).astype(np.uint8) if is_mask else resized.astype(np.float32)


def normalise(image: np.ndarray, mode: Normalisation) -> np.ndarray:
    """Per-case, per-channel intensity normalisation of (C, H, W)."""
    image = image.astype(np.float32)
    if mode is Normalisation.NONE:
        return image
    flat = image.reshape(image.shape[0], -1)
    if mode is Normalisation.ZSCORE:
        centre, scale = flat.mean(1), flat.std(1)
    else:
        centre, scale = flat.min(1), flat.max(1) - flat.min(1)
    return (image - centre[:, None, None]) / np.maximum(scale, 1e-6)[:, None, None]


def align_cases(
    cases: Iterable[Case],
    size: tuple[int, int],
    resize_mode: ResizeMode,
    normalisation: Normalisation,
    binarise_threshold: float | None,
    slice_axis: int,
    empty_slice_share: float,
    seed: int,
) -> Iterator[Case]:
    """Yield aligned 2-D cases (image normalised, masks binary, all at ``size``)."""
    rng = np.random.default_rng(seed)
    for case in cases:
        source = case.meta.get("source", case.case_id)
        binarised_at = case.meta.get(BINARISED_ON_READ)
        for piece in slice_volume(case, slice_axis, empty_slice_share, rng):
            masks = binarise(piece.masks, binarise_threshold, source, binarised_at)
            oracle = None if piece.oracle is None else binarise(piece.oracle, binarise_threshold, source)
            yield replace(
                piece,
                image=normalise(fit_to_size(piece.image, size, resize_mode, False), normalisation),
                masks=fit_to_size(masks, size, resize_mode, True),
                oracle=None if oracle is None else fit_to_size(oracle, size, resize_mode, True),
            )


def stack_cases(aligned: Iterable[Case], split: str | Mapping[str, float], seed: int) -> AlignedSet:
    """Stack aligned 2-D cases into an `AlignedSet` and assign splits (``"auto"``: the ones the
    data came with where every case has one, else by group; fractions: by group)."""
    cases = list(aligned)
    if not cases:
        raise DataError("mask_alignment", "empty dataset after slicing and filtering")
    channels = {c.image.shape[0] for c in cases}
    if len(channels) != 1:
        raise DataError("mask_alignment", f"cases have different channel counts {sorted(channels)}")
    raters = max(len(c.rater_valid) for c in cases)
    size = cases[0].image.shape[1:]
    masks = np.zeros((len(cases), raters, *size), dtype=np.uint8)
    valid = np.zeros((len(cases), raters), dtype=bool)
    for i, case in enumerate(cases):
        masks[i, : len(case.rater_valid)] = case.masks
        valid[i, : len(case.rater_valid)] = case.rater_valid
    oracles = [c.oracle for c in cases]
    oracle = np.stack(oracles) if all(o is not None for o in oracles) else None
    table = pd.DataFrame(
        [
            {
                "case_id": c.case_id,
                "group_id": c.group_id,
                **{k: v for k, v in c.meta.items() if isinstance(v, (str, int, float, bool))},
            }
            for c in cases
        ]
    )
    table.insert(2, "split", choose_splits(table, split, seed))
    return AlignedSet(np.stack([c.image for c in cases]), masks, valid, table, oracle)
