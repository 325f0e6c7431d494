"""Reading another model's samples in the formats public code writes, and matching them to raters."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from cimd_pipeline.data.external_samples import match_to_raters, read_samples
from cimd_pipeline.ensembles import SampleSet
from cimd_pipeline.errors import DataError
from cimd_pipeline.io.sample_dataset import SampleSetDataset

IDS = ["p1/n0/slice-0", "p1/n0/slice-1", "p2/n0/slice-0"]


def masks(cases: int = 3, n: int = 4, size: int = 8, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((cases, n, size, size)) > 0.5).astype(np.uint8)


def test_npz_npy_and_the_pipelines_own_file_read_the_same(tmp_path: Path):
    drawn = masks()
    np.savez(tmp_path / "a.npz", samples=drawn * 255, case_ids=np.array(IDS))
    np.save(tmp_path / "b.npy", drawn.astype(bool))
    (tmp_path / "b.case_ids.txt").write_text("\n".join(IDS) + "\n")
    own = SampleSet(np.array(IDS), drawn, drawn.astype(np.float16), {"method": "ddim"})
    SampleSetDataset(str(tmp_path / "c.npz")).save(own)
    for name in ("a.npz", "b.npy", "c.npz"):
        read = read_samples(tmp_path / name)
        assert list(read.case_ids) == IDS, name
        np.testing.assert_array_equal(read.binary, drawn)
        assert read.binary.dtype == np.uint8 and read.info["sampling_method"] == "external"


def test_png_case_folders_give_relative_paths_as_case_ids_in_natural_order(tmp_path: Path):
    drawn = masks(n=11)
    for case, stack in zip(IDS, drawn):
        (tmp_path / case).mkdir(parents=True)
        for j, mask in enumerate(stack):
            Image.fromarray(mask * 255).save(tmp_path / case / f"sample-{j}.png")
    read = read_samples(tmp_path)
    assert sorted(read.case_ids) == sorted(IDS)
    order = [list(read.case_ids).index(c) for c in IDS]
    np.testing.assert_array_equal(read.binary[order], drawn)  # sample-10 after sample-9


def test_nifti_2d_cases_and_a_volume_cut_into_slices(tmp_path: Path):
    drawn = masks(cases=2)
    for case, stack in zip(("a", "b"), drawn):
        nib.save(nib.Nifti1Image(np.moveaxis(stack, 0, -1), np.eye(4)), tmp_path / f"{case}.nii.gz")
    read = read_samples(tmp_path)
    assert list(read.case_ids) == ["a", "b"] and not read.from_volume.any()
    np.testing.assert_array_equal(read.binary, drawn)

    volume = masks(cases=5, n=3, size=6)  # (Z, N, X, Y)
    folder = tmp_path / "vol"
    folder.mkdir()
    nib.save(nib.Nifti1Image(np.transpose(volume, (2, 3, 0, 1)), np.eye(4)), folder / "case7.nii")
    read = read_samples(folder)
    assert list(read.case_ids) == [f"case7_s{k:03d}" for k in range(5)] and read.from_volume.all()
    np.testing.assert_array_equal(read.binary, volume)
    # slices that alignment left out are skipped, not refused
    kept = match_to_raters(read, ["case7_s001", "case7_s003"], (6, 6))
    np.testing.assert_array_equal(kept.binary, volume[[1, 3]])


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        (np.full((3, 2, 4, 4), 0.5), r"non-binary sample values \(0.5\)"),
        (np.where(np.eye(4) > 0, np.nan, 0.0)[None, None].repeat(3, 0), "NaN"),
        (np.zeros((3, 2, 4)), r"\(cases, N, H, W\)"),
        (np.zeros((2, 2, 4, 4)), "3 case ids for 2 cases"),
        (np.zeros((3, 0, 4, 4)), "zero samples per case"),
    ],
)
def test_bad_arrays_are_refused_naming_the_file(tmp_path: Path, values: np.ndarray, problem: str):
    np.savez(tmp_path / "bad.npz", samples=values, case_ids=np.array(IDS))
    with pytest.raises(DataError, match=problem) as error:
        read_samples(tmp_path / "bad.npz")
    assert error.value.source.startswith(str(tmp_path / "bad.npz"))


def test_threshold_binarises_soft_samples_and_keeps_nan_an_error(tmp_path: Path):
    soft = np.random.default_rng(1).random((3, 2, 4, 4))
    np.savez(tmp_path / "soft.npz", samples=soft, case_ids=np.array(IDS))
    np.testing.assert_array_equal(read_samples(tmp_path / "soft.npz", threshold=0.3).binary, soft > 0.3)
    soft[1, 0, 0, 0] = np.nan
    np.savez(tmp_path / "soft.npz", samples=soft, case_ids=np.array(IDS))
    with pytest.raises(DataError, match=r"case p1/n0/slice-1\): samples contain NaN"):
        read_samples(tmp_path / "soft.npz", threshold=0.3)


def test_file_and_folder_problems_name_the_file(tmp_path: Path):
    np.save(tmp_path / "x.npy", masks())
    with pytest.raises(DataError, match=r"write them one per line to x.case_ids.txt"):
        read_samples(tmp_path / "x.npy")
    np.savez(tmp_path / "twice.npz", samples=masks(), case_ids=np.array([IDS[0], IDS[0], IDS[1]]))
    with pytest.raises(DataError, match="given twice"):
        read_samples(tmp_path / "twice.npz")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="unknown samples format"):
        read_samples(tmp_path / "notes.txt")
    uneven = tmp_path / "uneven"
    for case, n in (("a", 3), ("b", 2)):
        (uneven / case).mkdir(parents=True)
        for j in range(n):
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(uneven / case / f"{j}.png")
    with pytest.raises(DataError, match=r"2 samples here, the first case \(.*a\) has 3") as error:
        read_samples(uneven)
    assert error.value.source == str(uneven / "b")
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(uneven / "b" / "2.png")
    with pytest.raises(DataError, match=r"non-binary sample values \(7\)") as error:
        read_samples(uneven)
    assert error.value.source == str(uneven / "b" / "2.png")


def test_matching_orders_by_the_raters_and_checks_size_and_ids(tmp_path: Path):
    np.savez(tmp_path / "s.npz", samples=masks(), case_ids=np.array(IDS))
    read = read_samples(tmp_path / "s.npz")
    matched = match_to_raters(read, IDS[::-1], (8, 8))
    assert matched.binary is read.binary  # every case kept: no copy (scoring pairs by id)
    with pytest.raises(DataError, match="samples are 8x8 but the raters' masks are 16x16"):
        match_to_raters(read, IDS, (16, 16))
    resized = match_to_raters(read, IDS, (16, 16), resize=True)
    np.testing.assert_array_equal(resized.binary, read.binary.repeat(2, 2).repeat(2, 3))
    with pytest.raises(DataError, match=r"1 of 4 rater cases have no samples, e.g. \['p3/n0/slice-0'\]"):
        match_to_raters(read, [*IDS, "p3/n0/slice-0"], (8, 8))
    with pytest.raises(DataError, match="'p2/n0/slice-0' is not among the 2 rater cases"):
        match_to_raters(read, IDS[:2], (8, 8))
