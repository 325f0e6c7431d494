"""Reader for the LIDC-IDRI slice tree that most public LIDC copies ship (docs/datasets.md).

```
LIDC-IDRI-slices/LIDC-IDRI-0001/nodule-0/images/slice-0.png ...   # 128x128 uint8 CT crops
LIDC-IDRI-slices/LIDC-IDRI-0001/nodule-0/mask-0/slice-0.png ...   # one folder per reader, 0/255
                                         mask-1/ mask-2/ mask-3/
```

One case per slice, id ``<patient>/<nodule>/<slice>``, group = the patient folder, so no patient
(and therefore no nodule) lands in two splits. Masks pass through as stored (0/255) and are
binarised once, by `mask_alignment`. An all-zero mask is a reader who drew nothing on that slice:
valid data. A reader folder without the slice's file leaves that reader invalid for the slice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from cimd_pipeline.data.cases import Case
from cimd_pipeline.data.readers.common import natural_key
from cimd_pipeline.errors import DataError
from cimd_pipeline.threads import ordered_map

logger = logging.getLogger(__name__)

IMAGES = "images"
RATER_GLOB = "mask-*"
SUFFIXES = (".png",)


def is_slice_tree(root: Path) -> bool:
    """Whether ``root`` holds ``<patient>/<nodule>/images/`` beside ``mask-*`` folders."""
    images = next((p for p in root.glob(f"*/*/{IMAGES}") if p.is_dir()), None)
    return images is not None and any(p.is_dir() for p in images.parent.glob(RATER_GLOB))


def _files(folder: Path) -> dict[str, Path]:
    """Slice name (file stem) -> file, for the PNGs of one folder (hidden files skipped)."""
    return {
        p.stem: p
        for p in folder.iterdir()
        if p.suffix.lower() in SUFFIXES and not p.name.startswith(".") and p.is_file()
    }


def slice_tree_files(root: Path) -> list[tuple[str, str, Path, dict[str, Path]]]:
    """``(case_id, patient, image, {rater: mask file})`` for every slice, in natural order.

    Raters are the ``mask-*`` folder names of the whole tree, so a nodule missing one folder keeps
    the others in their slots. A mask without an image is refused.
    """
    found = []
    tree = sorted(root.glob(f"*/*/{IMAGES}"), key=lambda p: (natural_key(p.parent.parent), natural_key(p.parent)))
    for images in tree:
        nodule = images.parent
        patient = nodule.parent.name
        slices = _files(images)
        raters = {p.name: _files(p) for p in sorted(nodule.glob(RATER_GLOB), key=natural_key) if p.is_dir()}
        for masks in raters.values():
            orphan = sorted(set(masks) - set(slices))
            if orphan:
                raise DataError(masks[orphan[0]], f"reader mask with no image (no {IMAGES}/{orphan[0]}.png)")
        for name in sorted(slices, key=lambda s: natural_key(Path(s))):
            masks = {rater: files[name] for rater, files in raters.items() if name in files}
            found.append((f"{patient}/{nodule.name}/{name}", patient, slices[name], masks))
    return found


def _gray(path: Path) -> np.ndarray:
    """(H, W) values of a single-channel PNG as stored (colour files as luminance)."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "I", "I;16", "F", "1"):
                image = image.convert("L")
            return np.asarray(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(path, f"unreadable image file ({exc})") from exc


def read_slice(case_id: str, patient: str, image: Path, masks: dict[str, Path], raters: list[str]) -> Case:
    """One slice as a `Case`: image float32 (1, H, W), masks uint8 (R, H, W) as stored."""
    pixels = _gray(image).astype(np.float32)[None]
    stack = np.zeros((len(raters), *pixels.shape[1:]), dtype=np.uint8)
    for slot, rater in enumerate(raters):
        if rater not in masks:
            continue
        mask = _gray(masks[rater])
        if mask.shape != pixels.shape[1:]:
            problem = f"reader mask shape {mask.shape} differs from the image {image}'s {pixels.shape[1:]}"
            raise DataError(masks[rater], problem)
        stack[slot] = mask
    nodule = case_id.rsplit("/", 1)[0]
    return Case(
        case_id=case_id,
        group_id=patient,
        image=pixels,
        masks=stack,
        rater_valid=np.array([r in masks for r in raters], dtype=bool),
        meta={"nodule": nodule, "source": str(image)},
    ).validate(image)


def read_slice_tree(root: Path) -> Iterator[Case]:
    """Yield every slice of the tree under ``root`` (one case at a time)."""
    files = slice_tree_files(root)
    if not files:
        raise DataError(root, f"no slices found (expected <patient>/<nodule>/{IMAGES}/slice-*.png)")
    raters = sorted({r for *_, masks in files for r in masks}, key=lambda r: natural_key(Path(r)))
    patients = len({patient for _, patient, *_ in files})
    logger.info("%s: LIDC slice tree, %d slices of %d patients, readers %s", root, len(files), patients, raters)
    return ordered_map(lambda entry: read_slice(*entry, raters), files)  # decoded on a few threads
