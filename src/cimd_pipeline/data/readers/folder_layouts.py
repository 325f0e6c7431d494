"""Where the files of the ``folders`` source are: one function per layout, pairing each image
with its raters' mask files by rater *name*.

Raters are keyed by name (``_l2`` -> ``2``, ``label2_.jpg`` -> ``2``, folder ``Expert2`` ->
``Expert2``), never by position: a case whose rater 1 file is missing keeps rater 2 in slot 2 and
gets rater 1 flagged invalid, instead of every later rater moving up a slot.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from cimd_pipeline.data.readers.common import Regex, data_files, given_split
from cimd_pipeline.errors import DataError


class FolderOptions(BaseModel):
    """``ingestion.reader`` options of the ``folders`` source; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    layout: Literal["flat", "per_case", "rater_folders"] = "flat"
    # flat: files under root matching `pattern`; a stem ending in `rater_suffix` is a mask.
    # rater_folders: the images under each images folder.
    pattern: str = "**/*.png"
    rater_suffix: Regex = r"_l(\d+)"  # group 1 (if any) names the rater
    images_folder: str | None = None  # flat: dropped from image ids where present ("images")
    masks_folder: str | None = None  # flat: dropped from mask ids where present ("gt")
    # per_case: folders matching `case_glob` under root, each with one image and rater masks.
    case_glob: str = "*"
    image_glob: str = "image*"
    mask_glob: str = "label*"
    rater_regex: Regex = r"(\d+)"  # group 1 of a search in a mask's file name names the rater
    # rater_folders: <images_folder>/<id>.png beside one folder per rater, <prefix><id>.*
    rater_glob: str = "*"
    mask_prefix: str = "seg_"  # compared case-insensitively, as the id after it
    mask_invert: bool = False  # the object is black on white
    # all layouts
    group_regex: Regex | None = None  # group 1 (or (?P<group>...)) of a search in the case id
    mask_threshold: float = 127  # JPEG masks (all masks in rater_folders): foreground > it
    color: Literal["gray", "rgb"] = "gray"  # colour images: one luminance channel or three

    @model_validator(mode="after")
    def _invert_needs_rater_folders(self) -> "FolderOptions":
        if self.mask_invert and self.layout != "rater_folders":
            raise ValueError("mask_invert: only the rater_folders layout binarises masks on read")
        return self


@dataclass
class CaseFiles:
    """The image of one case, its rater masks by rater name, and the split its path names."""

    image: Path
    masks: dict[str, Path] = field(default_factory=dict)
    split: str | None = None


def _rater_name(found: re.Match[str]) -> str:
    taken = [g for g in found.groups() if g is not None]
    return taken[0] if taken else found.group(0)


def _add_mask(files: CaseFiles, rater: str, path: Path, option: str) -> None:
    if rater in files.masks:
        first = files.masks[rater].name
        raise DataError(path, f"second mask of rater {rater!r} in this case (first: {first}; check {option})")
    files.masks[rater] = path


def _drop_folder(parts: tuple[str, ...], folder: str | None) -> tuple[str, ...]:
    """Remove ``folder`` from a relative path's folders where present (trees with parallel
    ``images/`` and ``gt/`` folders pair up; a plain folder of files is read as it is)."""
    if folder is None or folder not in parts[:-1]:
        return parts
    at = parts.index(folder)
    return parts[:at] + parts[at + 1 :]


def flat_files(root: Path, opts: FolderOptions) -> dict[str, CaseFiles]:
    """HPU-Net style ``<id>.png`` + ``<id>_l0.png`` ..., in one folder or parallel trees."""
    suffix = re.compile(f"(?:{opts.rater_suffix})$")
    images: dict[str, CaseFiles] = {}
    masks: dict[str, list[tuple[str, Path]]] = {}
    for path in data_files(root.glob(opts.pattern)):
        relative = path.relative_to(root).parts
        found = suffix.search(path.stem)
        parts = _drop_folder(relative, opts.masks_folder if found else opts.images_folder)
        stem = path.stem[: found.start()] if found else path.stem
        case_id = "/".join((*parts[:-1], stem))
        if found:
            masks.setdefault(case_id, []).append((_rater_name(found), path))
        elif case_id in images:
            raise DataError(path, f"second image for case {case_id!r} ({images[case_id].image.name})")
        else:
            images[case_id] = CaseFiles(path, split=given_split(relative[:-1], path))
    for case_id, found_masks in masks.items():
        if case_id not in images:
            raise DataError(found_masks[0][1], f"rater mask with no image (no image for case {case_id!r})")
        for rater, path in found_masks:
            _add_mask(images[case_id], rater, path, "ingestion.reader.rater_suffix")
    return dict(sorted(images.items()))


def per_case_files(root: Path, opts: FolderOptions) -> dict[str, CaseFiles]:
    """One folder per case (CIMD ``image_k.jpg`` + ``label0_.jpg`` ..., Bone-US ``rater*.png``)."""
    rater_regex = re.compile(opts.rater_regex)
    cases: dict[str, CaseFiles] = {}
    for folder in sorted(p for p in root.glob(opts.case_glob) if p.is_dir()):
        masks = data_files(folder.glob(opts.mask_glob))
        images = [p for p in data_files(folder.glob(opts.image_glob)) if p not in masks]
        if len(images) > 1:
            names = [p.name for p in images]
            raise DataError(folder, f"several images match {opts.image_glob!r}: {names}")
        if not images and masks:
            problem = f"rater mask with no image (nothing matches {opts.image_glob!r})"
            raise DataError(masks[0], problem)
        if not images:
            continue
        relative = folder.relative_to(root)
        files = CaseFiles(images[0], split=given_split(relative.parts, folder))
        for path in masks:
            found = rater_regex.search(path.stem)
            if found is None:
                raise DataError(path, f"no rater name in the file name (rater_regex {opts.rater_regex!r})")
            _add_mask(files, _rater_name(found), path, "ingestion.reader.rater_regex")
        cases[relative.as_posix()] = files
    return cases


def _rater_index(folder: Path, prefix: str) -> dict[str, Path]:
    """Lower-cased image id -> mask file, for the files ``<prefix><id>.*`` of one rater folder."""
    index: dict[str, Path] = {}
    for path in data_files(folder.rglob("*")):
        relative = path.relative_to(folder).with_suffix("")
        if not relative.name.lower().startswith(prefix.lower()):
            raise DataError(path, f"mask name does not start with mask_prefix {prefix!r}")
        key = "/".join((*relative.parts[:-1], relative.name[len(prefix) :])).lower()
        if key in index:
            raise DataError(path, f"second mask for image id {key!r} (first: {index[key].name})")
        index[key] = path
    return index


def rater_folder_files(root: Path, opts: FolderOptions) -> dict[str, CaseFiles]:
    """``images/<id>.png`` beside one folder per rater holding ``<prefix><id>.*`` (BU-BIL style).

    Every ``images`` folder under root is read with the rater folders beside it (so
    ``train/images`` + ``train/Expert1`` work too). A rater folder without a file for an id leaves
    that rater invalid for the case; a mask whose id has no image is refused.
    """
    images_name = opts.images_folder or "images"
    cases: dict[str, CaseFiles] = {}
    for images_dir in sorted(p for p in root.glob(f"**/{images_name}") if p.is_dir()):
        parent = images_dir.parent
        raters = {
            p.name: _rater_index(p, opts.mask_prefix)
            for p in sorted(parent.glob(opts.rater_glob))
            if p.is_dir() and p != images_dir and not p.name.startswith(".")
        }
        if not raters:
            raise DataError(parent, f"no rater folders matching {opts.rater_glob!r} beside {images_name}/")
        seen: dict[str, Path] = {}
        for image in data_files(images_dir.glob(opts.pattern)):
            image_id = image.relative_to(images_dir).with_suffix("").as_posix()
            if image_id.lower() in seen:
                raise DataError(image, f"image id differs only in case from {seen[image_id.lower()].name}")
            seen[image_id.lower()] = image
            case_id = "/".join((*parent.relative_to(root).parts, image_id))
            files = CaseFiles(image, split=given_split(image.relative_to(root).parts[:-1], image))
            for rater, index in raters.items():
                if image_id.lower() in index:
                    files.masks[rater] = index.pop(image_id.lower())
            cases[case_id] = files
        orphans = [(key, path) for index in raters.values() for key, path in index.items()]
        if orphans:
            key, path = orphans[0]
            raise DataError(path, f"rater mask with no image ({images_dir} has no image {key!r})")
    return dict(sorted(cases.items()))


LAYOUTS: dict[str, Callable[[Path, FolderOptions], dict[str, CaseFiles]]] = {
    "flat": flat_files,
    "per_case": per_case_files,
    "rater_folders": rater_folder_files,
}
