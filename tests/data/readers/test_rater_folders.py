"""The ``rater_folders`` layout (BU-BIL style ``images/<id>.png`` + ``<rater>/seg_<id>.png``)
on masks saved the ways real sets save them: 8-bit, RGB colour labels, palettes, 1-bit, inverted,
a capitalised prefix, and a rater who skipped an image."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cimd_pipeline.data.readers import get_reader
from cimd_pipeline.errors import DataError

SHAPE = (24, 28)
RADII = {"Expert1": 4, "Expert2": 6, "Expert3": 8, "Expert4": 10}
IMAGES = ["Case01", "case02", "CASE03"]


def disk(radius: float, shape=SHAPE) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - 12) ** 2 + (xx - 14) ** 2 < radius**2).astype(np.uint8)


def as_mode(mask: np.ndarray, rater: str, invert: bool) -> Image.Image:
    """Each rater's tool saved masks differently; ``invert`` draws the object black."""
    on, off = (0, 255) if invert else (255, 0)
    if rater == "Expert1":  # 8-bit grey, 0/255
        return Image.fromarray(np.where(mask > 0, on, off).astype(np.uint8))
    if rater == "Expert2":  # RGB, a red label (luminance 76) on black or black on white
        rgb = np.zeros((*mask.shape, 3), np.uint8)
        if invert:
            rgb[mask == 0] = 255
        else:
            rgb[mask > 0] = (255, 0, 0)
        return Image.fromarray(rgb)
    if rater == "Expert3":  # palette: the object is index 1, green (black on white when inverted)
        image = Image.fromarray(mask, mode="P")
        palette = [255, 255, 255, 0, 0, 0] if invert else [0, 0, 0, 0, 200, 0]
        image.putpalette(palette + [0] * (768 - len(palette)))
        return image
    return Image.fromarray(np.where(mask > 0, on, off).astype(np.uint8)).convert("1")  # 1-bit


def write_set(root: Path, invert: bool = False, skip: tuple[str, str] = ("Expert2", "case02")) -> None:
    """images/<id>.png + Expert<k>/seg_<id>.png; Expert3 writes ``Seg_`` and lower-case ids."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    for image_id in IMAGES:
        Image.fromarray((rng.random(SHAPE) * 255).astype(np.uint8)).save(root / "images" / f"{image_id}.png")
        for rater, radius in RADII.items():
            if (rater, image_id) == skip:
                continue
            name = f"Seg_{image_id.lower()}.png" if rater == "Expert3" else f"seg_{image_id}.png"
            (root / rater).mkdir(exist_ok=True)
            as_mode(disk(radius), rater, invert).save(root / rater / name)


def read(root: Path, **options) -> list:
    return list(get_reader("folders")(root, {"layout": "rater_folders", **options}, 0))


@pytest.mark.parametrize("invert", [False, True])
def test_any_mask_mode_binarised_and_a_missing_rater_keeps_its_slot(tmp_path: Path, invert: bool):
    write_set(tmp_path, invert=invert)
    cases = read(tmp_path, mask_invert=invert)
    assert [c.case_id for c in cases] == sorted(IMAGES)  # code-point order, as the file listing
    for case in cases:
        assert case.image.shape == (1, *SHAPE) and case.masks.shape == (4, *SHAPE)
        assert case.masks.dtype == np.uint8 and set(np.unique(case.masks)) <= {0, 1}
        for slot, (rater, radius) in enumerate(RADII.items()):
            if case.case_id == "case02" and rater == "Expert2":
                assert not case.rater_valid[slot] and not case.masks[slot].any()
            else:
                assert case.rater_valid[slot], (case.case_id, rater)
                np.testing.assert_array_equal(case.masks[slot], disk(radius), err_msg=f"{case.case_id} {rater}")
    assert cases[1].meta["source"] == str(tmp_path / "images" / "Case01.png")


def test_inverted_masks_read_without_mask_invert_are_the_background(tmp_path: Path):
    write_set(tmp_path, invert=True)
    case = read(tmp_path)[0]
    np.testing.assert_array_equal(case.masks[0], 1 - disk(RADII["Expert1"]))


def test_rater_folders_by_glob_and_prefix_option(tmp_path: Path):
    write_set(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a rater")
    cases = read(tmp_path, rater_glob="Expert[13]")
    assert cases[0].masks.shape == (2, *SHAPE)
    np.testing.assert_array_equal(cases[0].masks[1], disk(RADII["Expert3"]))
    problem = "mask name does not start with mask_prefix 'mask_'"
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'Expert1'))}/seg_\w+\.png: {problem}"):
        read(tmp_path, rater_glob="Expert*", mask_prefix="mask_")


def test_mask_of_another_size_names_both_files(tmp_path: Path):
    write_set(tmp_path)
    bad = tmp_path / "Expert4" / "seg_CASE03.png"
    Image.fromarray(disk(5, (20, 20)) * 255).save(bad)
    image = tmp_path / "images" / "CASE03.png"
    problem = rf"rater mask shape \(20, 20\) differs from the image {re.escape(str(image))}'s \(24, 28\)"
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}: {problem}"):
        read(tmp_path)


def test_mask_without_image_and_unreadable_mask_are_named(tmp_path: Path):
    write_set(tmp_path)
    orphan = tmp_path / "Expert1" / "seg_case04.png"
    Image.fromarray(disk(3) * 255).save(orphan)
    with pytest.raises(DataError, match=rf"{re.escape(str(orphan))}: rater mask with no image"):
        read(tmp_path)
    orphan.unlink()
    broken = tmp_path / "Expert2" / "seg_Case01.png"
    broken.write_bytes(broken.read_bytes()[:30])
    with pytest.raises(DataError, match=rf"{re.escape(str(broken))}: unreadable image file"):
        read(tmp_path)


def test_two_masks_for_one_id_and_no_rater_folders(tmp_path: Path):
    write_set(tmp_path)
    second = tmp_path / "Expert1" / "SEG_case01.jpg"
    Image.fromarray(disk(4) * 255).save(second)
    with pytest.raises(DataError, match=r"second mask for image id 'case01'"):
        read(tmp_path)
    with pytest.raises(DataError, match=r"no rater folders matching 'Rater\*' beside images/"):
        read(tmp_path, rater_glob="Rater*")


def test_splits_from_split_folders_above_images(tmp_path: Path):
    write_set(tmp_path / "Train")
    write_set(tmp_path / "testing")
    cases = read(tmp_path)
    given = {c.case_id: c.meta["given_split"] for c in cases}
    assert given == {**{f"Train/{i}": "train" for i in IMAGES}, **{f"testing/{i}": "test" for i in IMAGES}}


def test_mask_invert_is_refused_for_layouts_that_do_not_binarise(tmp_path: Path):
    write_set(tmp_path)
    with pytest.raises(ValueError, match="mask_invert: only the rater_folders layout"):
        list(get_reader("folders")(tmp_path, {"mask_invert": True}, 0))
