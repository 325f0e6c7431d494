"""The public LIDC slice tree (``<patient>/nodule-<k>/images|mask-<r>/slice-<n>.png``) through the
``lidc`` source: layout detection, ids, groups, empty and missing reader masks, bad trees."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cimd_pipeline.data.alignment import Normalisation, ResizeMode, align_cases, stack_cases
from cimd_pipeline.data.readers import get_reader
from cimd_pipeline.errors import DataError

SIZE = 128


def slice_image(patient: int, nodule: int, number: int) -> np.ndarray:
    """A CT crop whose pixels encode where it comes from (so a mix-up shows)."""
    rng = np.random.default_rng(patient * 100 + nodule * 10 + number)
    return (rng.random((SIZE, SIZE)) * 200).astype(np.uint8)


def reader_mask(reader: int, number: int) -> np.ndarray:
    """0/255 disk whose radius grows with the reader; reader 0 draws nothing on slice 0."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    radius = 0 if (reader, number) == (0, 0) else 6 + 3 * reader + number
    return np.where((yy - 64) ** 2 + (xx - 60) ** 2 < radius**2, 255, 0).astype(np.uint8)


def write_slice_tree(root: Path, patients: int = 3, slices: tuple[int, ...] = (0, 1, 10)) -> list[str]:
    """The public tree: patient 1 has two nodules; returns the case ids in natural order."""
    ids = []
    for patient in range(1, patients + 1):
        for nodule in range(2 if patient == 1 else 1):
            folder = root / f"LIDC-IDRI-{patient:04d}" / f"nodule-{nodule}"
            for number in slices:
                (folder / "images").mkdir(parents=True, exist_ok=True)
                Image.fromarray(slice_image(patient, nodule, number)).save(folder / "images" / f"slice-{number}.png")
                for reader in range(4):
                    (folder / f"mask-{reader}").mkdir(exist_ok=True)
                    Image.fromarray(reader_mask(reader, number)).save(folder / f"mask-{reader}" / f"slice-{number}.png")
                ids.append(f"LIDC-IDRI-{patient:04d}/nodule-{nodule}/slice-{number}")
    return ids


def read(root: Path | None, **options) -> list:
    return list(get_reader("lidc")(root, options, 0))


def test_reads_every_slice_with_the_patient_as_group(tmp_path: Path, caplog):
    ids = write_slice_tree(tmp_path)
    with caplog.at_level("INFO"):
        cases = read(tmp_path)
    assert "layout auto: reading the LIDC slice tree" in caplog.text
    assert [c.case_id for c in cases] == ids  # slice-10 after slice-1: natural order
    assert [c.group_id for c in cases] == [i.split("/")[0] for i in ids]
    assert {c.meta["nodule"] for c in cases if c.group_id == "LIDC-IDRI-0001"} == {
        "LIDC-IDRI-0001/nodule-0",
        "LIDC-IDRI-0001/nodule-1",
    }
    for case in cases:
        patient, nodule, number = (int(x) for x in re.findall(r"\d+", case.case_id))
        assert case.image.shape == (1, SIZE, SIZE) and case.image.dtype == np.float32
        np.testing.assert_array_equal(case.image[0], slice_image(patient, nodule, number))
        expected = np.stack([reader_mask(r, number) for r in range(4)])
        np.testing.assert_array_equal(case.masks, expected)  # as stored: binarised once, in alignment
        assert case.rater_valid.all()
    first = cases[0]
    assert not first.masks[0].any() and first.rater_valid[0]  # drew nothing: valid, empty


def test_explicit_layouts_and_the_pickle_still_wins_when_present(tmp_path: Path):
    write_slice_tree(tmp_path, patients=1, slices=(0,))
    assert len(read(tmp_path, layout="slices")) == 2
    with pytest.raises(DataError, match="data_lidc.pickle"):
        read(tmp_path, layout="pickle")
    (tmp_path / "data_lidc.pickle").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"data_lidc\.pickle"):  # auto picks the pickle and reads it
        read(tmp_path)


def test_a_missing_reader_file_leaves_that_reader_invalid(tmp_path: Path):
    write_slice_tree(tmp_path, patients=1, slices=(0, 1))
    (tmp_path / "LIDC-IDRI-0001/nodule-0/mask-2/slice-1.png").unlink()
    cases = {c.case_id: c for c in read(tmp_path)}
    case = cases["LIDC-IDRI-0001/nodule-0/slice-1"]
    assert case.rater_valid.tolist() == [True, True, False, True]
    assert not case.masks[2].any()
    np.testing.assert_array_equal(case.masks[3], reader_mask(3, 1))  # later readers keep their slot


def test_bad_trees_are_refused_with_the_file_named(tmp_path: Path):
    parent = tmp_path / "Pulmoseg"
    write_slice_tree(parent / "LIDC-IDRI-slices", patients=1, slices=(0,))
    with pytest.raises(DataError, match=r"neither the pickle .* set ingestion.root to .*LIDC-IDRI-slices"):
        read(parent)
    root = parent / "LIDC-IDRI-slices"
    orphan = root / "LIDC-IDRI-0001/nodule-0/mask-1/slice-7.png"
    Image.fromarray(reader_mask(1, 0)).save(orphan)
    with pytest.raises(DataError, match=re.escape(str(orphan)) + ": reader mask with no image"):
        read(root)
    orphan.unlink()
    small = root / "LIDC-IDRI-0001/nodule-1/mask-3/slice-0.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(small)
    with pytest.raises(DataError, match=re.escape(str(small)) + r": reader mask shape \(64, 64\) differs"):
        read(root)


def test_split_never_divides_a_patient_or_a_nodule(tmp_path: Path):
    write_slice_tree(tmp_path, patients=12, slices=(0, 1))
    aligned = align_cases(read(tmp_path), (32, 32), ResizeMode.RESIZE, Normalisation.ZSCORE, None, 2, 0.1, 0)
    data = stack_cases(aligned, "auto", seed=0)
    assert set(np.unique(data.masks)) == {0, 1}
    assert data.masks[0, 0].sum() == 0 and data.masks[0, 1:].sum() > 0  # empty reader stays empty
    assert (data.cases.groupby("group_id")["split"].nunique() == 1).all()
    assert (data.cases.groupby("nodule")["split"].nunique() == 1).all()
    assert set(data.cases["split"]) == {"train", "val", "test"}
