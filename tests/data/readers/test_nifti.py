"""NIfTI readers (msmri, qubiq): modalities as channels, masks on the image grid, bad files."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cimd_pipeline.data.readers import get_reader
from cimd_pipeline.errors import DataError

SHAPE = (20, 24, 8)
# 1 x 1 x 3 mm voxels with the origin where a scanner puts it, not at voxel 0
AFFINE = np.array([[1.0, 0, 0, -90], [0, 1.0, 0, -126], [0, 0, 3.0, -72], [0, 0, 0, 1]])
MODALITIES = ("FLAIR", "T1", "T2", "PD")


def names(path: Path, problem: str) -> str:
    """The regex of a `DataError` message: the file, then the problem (itself a regex)."""
    return rf"{re.escape(str(path))}: {problem}"


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def lesion(shift: int = 0) -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[5 + shift : 8 + shift, 6:10, 3:5] = 1
    return mask


def modality(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, SHAPE).astype(np.float32)


def msmri_case(root: Path, subject: int, tp: int) -> Path:
    folder = root / f"subj{subject:02d}" / f"tp{tp}"
    for number, name in enumerate(MODALITIES):
        save(folder / f"{name}.nii.gz", modality(10 * subject + tp + number))
    save(folder / "mask1.nii.gz", lesion())
    save(folder / "mask2.nii.gz", lesion(shift=tp))
    return folder


def read(source: str, root: Path | None, **options) -> list:
    return list(get_reader(source)(root, options, 0))


def test_msmri_modalities_become_channels_and_subject_is_group(tmp_path: Path):
    for subject in (1, 2):
        for tp in (1, 2):
            msmri_case(tmp_path, subject, tp)
    cases = read("msmri", tmp_path)
    assert [(c.case_id, c.group_id) for c in cases] == [
        ("subj01/tp1", "subj01"),
        ("subj01/tp2", "subj01"),
        ("subj02/tp1", "subj02"),
        ("subj02/tp2", "subj02"),
    ]
    case = cases[0]
    assert case.image.shape == (4, *SHAPE) and case.image.dtype == np.float32
    for channel, seed in enumerate((11, 12, 13, 14)):
        np.testing.assert_allclose(case.image[channel], modality(seed))
    np.testing.assert_array_equal(case.masks, np.stack([lesion(), lesion(shift=1)]))
    assert case.meta["modalities"] == "flair,t1,t2,pd"
    assert case.meta["source"] == str(tmp_path / "subj01/tp1/FLAIR.nii.gz")


def test_rater_on_another_grid_lands_on_the_image_voxels(tmp_path: Path, caplog):
    folder = msmri_case(tmp_path, 1, 1)
    # mask2 voxel (a, b, c) is image voxel (14 - a, b + 2, c): x flipped, y shifted, cropped FOV
    to_image = np.array([[-1, 0, 0, 14], [0, 1, 0, 2], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    stored = lesion()[14::-1, 2:22, :].copy()
    save(folder / "mask2.nii.gz", stored, AFFINE @ to_image)
    # T2 written with axes in (z, y, x) order: a permutation, resampled exactly
    swap = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    save(folder / "T2.nii.gz", modality(13).transpose(2, 1, 0).copy(), AFFINE @ swap)
    with caplog.at_level(logging.WARNING, logger="cimd_pipeline.data.grid"):
        (case,) = read("msmri", tmp_path)
    np.testing.assert_array_equal(case.masks[1], lesion())
    np.testing.assert_allclose(case.image[2], modality(13), atol=1e-4)
    assert f"{folder / 'mask2.nii.gz'}: covers only" in caplog.text  # cropped FOV: partial overlap


def test_volumes_are_turned_to_ras(tmp_path: Path):
    lps = AFFINE.copy()
    lps[0, 0] = lps[1, 1] = -1.0
    data = modality(1)
    save(tmp_path / "c1" / "image.nii.gz", data, lps)
    save(tmp_path / "c1" / "annotation_1.nii.gz", lesion(), lps)
    (case,) = read("qubiq", tmp_path)
    np.testing.assert_array_equal(case.image[0], data[::-1, ::-1])
    np.testing.assert_array_equal(case.masks[0], lesion()[::-1, ::-1])


def test_qubiq_2d_and_curvas_3d_cases(tmp_path: Path):
    affine_2d = np.diag([0.5, 0.5, 1.0, 1.0])
    for k in (1, 2):
        folder = tmp_path / "qubiq" / f"case{k:02d}"
        save(folder / "image.nii.gz", modality(k)[:, :, 0], affine_2d)
        for rater in (1, 2, 3):
            save(folder / f"task01_seg{rater:02d}.nii.gz", lesion(rater)[:, :, 3], affine_2d)
        save(folder / "task02_seg01.nii.gz", lesion()[:, :, 3], affine_2d)  # another structure
    cases = read("qubiq", tmp_path / "qubiq")
    assert [(c.case_id, c.group_id) for c in cases] == [("case01", "case01"), ("case02", "case02")]
    assert cases[0].image.shape == (1, 20, 24) and cases[0].masks.shape == (3, 20, 24)
    np.testing.assert_array_equal(cases[0].masks[2], lesion(3)[:, :, 3])
    for rater in (1, 2, 3):
        save(tmp_path / "curvas" / "patient7" / f"annotation_{rater}.nii.gz", lesion(rater))
    save(tmp_path / "curvas" / "patient7" / "image.nii.gz", modality(7))
    (curvas,) = read("qubiq", tmp_path / "curvas")
    assert curvas.image.shape == (1, *SHAPE) and curvas.masks.shape == (3, *SHAPE)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_intensities(tmp_path: Path, bad: float):
    folder = msmri_case(tmp_path, 1, 1)
    data = modality(0)
    data[3, 4, 5] = bad
    path = save(folder / "T1.nii.gz", data)
    with pytest.raises(DataError, match=names(path, "image contains NaN or infinite")):
        read("msmri", tmp_path)


def test_truncated_nifti(tmp_path: Path):
    folder = msmri_case(tmp_path, 1, 1)
    path = folder / "PD.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=names(path, "unreadable NIfTI file")):
        read("msmri", tmp_path)


def test_mask_outside_the_field_of_view(tmp_path: Path):
    folder = msmri_case(tmp_path, 1, 1)
    far = AFFINE.copy()
    far[2, 3] += 500.0
    path = save(folder / "mask2.nii.gz", lesion(), far)
    with pytest.raises(DataError, match=names(path, "field of view does not overlap")):
        read("msmri", tmp_path)


def test_mask_without_image(tmp_path: Path):
    msmri_case(tmp_path, 1, 1)
    orphan = save(tmp_path / "subj01" / "tp9" / "mask1.nii.gz", lesion())
    with pytest.raises(DataError, match=names(orphan, "rater mask with no image")):
        read("msmri", tmp_path)


def test_missing_modality(tmp_path: Path):
    folder = msmri_case(tmp_path, 1, 1)
    (folder / "PD.nii.gz").unlink()
    problem = "case 'subj01/tp1' has no file for modality pd"
    with pytest.raises(DataError, match=names(folder, problem)):
        read("msmri", tmp_path)


def test_hidden_copies_are_ignored(tmp_path: Path):
    folder = msmri_case(tmp_path, 1, 1)
    (folder / "._FLAIR.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (case,) = read("msmri", tmp_path)
    assert case.image.shape == (4, *SHAPE)


def test_file_matching_two_modalities(tmp_path: Path):
    folder = msmri_case(tmp_path, 1, 1)
    path = save(folder / "t1_flair.nii.gz", modality(0))
    with pytest.raises(DataError, match=names(path, "file name matches several modalities")):
        read("msmri", tmp_path)


def test_case_with_zero_raters(tmp_path: Path):
    save(tmp_path / "case01" / "image.nii.gz", modality(0))
    image = tmp_path / "case01/image.nii.gz"
    with pytest.raises(DataError, match=names(image, "case has zero raters")):
        read("qubiq", tmp_path)


def test_2d_mask_for_a_3d_image(tmp_path: Path):
    save(tmp_path / "case01" / "image.nii.gz", modality(0)[:, :, :4])  # channels as a third axis
    mask = save(tmp_path / "case01" / "task01_seg01.nii.gz", lesion()[:, :, 3])
    with pytest.raises(DataError, match=names(mask, "2-D file for the 3-D image image.nii.gz")):
        read("qubiq", tmp_path)


def test_empty_dataset(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=names(tmp_path, "no NIfTI images found")):
        read("qubiq", tmp_path)


def test_split_folders_above_subjects_are_given_splits(tmp_path: Path, caplog):
    for split, subject in (("Training", 1), ("Training", 2), ("testing", 3)):
        msmri_case(tmp_path / split, subject, 1)
    with caplog.at_level(logging.WARNING):
        cases = read("msmri", tmp_path, group_regex=r"^[^/]+/([^/]+)")
    given = [(c.case_id, c.group_id, c.meta["given_split"]) for c in cases]
    assert given == [
        ("Training/subj01/tp1", "subj01", "train"),
        ("Training/subj02/tp1", "subj02", "train"),
        ("testing/subj03/tp1", "subj03", "test"),
    ]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    with caplog.at_level(logging.WARNING):
        read("msmri", tmp_path)  # the default group (first folder) is the split folder
    assert "group_regex '^([^/]+)' puts 2 of 3 cases into one group 'Training'" in caplog.text
