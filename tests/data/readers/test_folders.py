"""The rater-folder reader: HPU-Net, CIMD and Bone-US layouts written with PIL, and bad inputs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cimd_pipeline.data.readers import get_reader
from cimd_pipeline.data.readers.common import warn_dominant_group
from cimd_pipeline.errors import ConfigError, DataError

HPUNET = {"images_folder": "images", "masks_folder": "gt", "group_regex": r"([^/]+)/[^/]+$"}
CIMD = {"layout": "per_case", "image_glob": "image_*.jpg", "mask_glob": "label*_*.jpg"}
BONE = {"layout": "per_case", "image_glob": "image.png", "mask_glob": "rater*.png"}


def names(path: Path, problem: str) -> str:
    """The regex of a `DataError` message: the file, then the problem (itself a regex)."""
    return rf"{re.escape(str(path))}: {problem}"


def disk(shape: tuple[int, int], radius: float, centre: tuple[int, int] = (16, 18)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius**2).astype(np.uint8)


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def scan(rng: np.random.Generator, shape=(32, 32)) -> np.ndarray:
    return (rng.random(shape) * 255).astype(np.uint8)


def hpunet_tree(root: Path, radii=(0, 5, 6, 7)) -> None:
    """<split>/images/<patient>/<id>.png + <split>/gt/<patient>/<id>_l<k>.png (0/255 PNGs)."""
    rng = np.random.default_rng(0)
    for split, patient, crop in [("train", 1, 0), ("train", 1, 1), ("train", 2, 0), ("val", 3, 0)]:
        name = f"LIDC-IDRI-{patient:04d}"
        save(root / split / "images" / name / f"z-10{crop}.0_c{crop}.png", scan(rng))
        for rater, radius in enumerate(radii):
            mask = disk((32, 32), radius) * 255
            save(root / split / "gt" / name / f"z-10{crop}.0_c{crop}_l{rater}.png", mask)


def read(root: Path | None, **options) -> list:
    return list(get_reader("folders")(root, options, 0))


def test_flat_hpunet_tree_pairs_parallel_folders(tmp_path: Path):
    hpunet_tree(tmp_path)
    cases = read(tmp_path, **HPUNET)
    assert [c.case_id for c in cases] == [
        "train/LIDC-IDRI-0001/z-100.0_c0",
        "train/LIDC-IDRI-0001/z-101.0_c1",
        "train/LIDC-IDRI-0002/z-100.0_c0",
        "val/LIDC-IDRI-0003/z-100.0_c0",
    ]
    groups = ["LIDC-IDRI-0001", "LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003"]
    assert [c.group_id for c in cases] == groups
    case = cases[0]
    assert case.image.shape == (1, 32, 32) and case.image.dtype == np.float32
    assert case.masks.shape == (4, 32, 32) and case.rater_valid.all()
    assert set(np.unique(case.masks)) == {0, 255}  # PNG masks pass as stored; alignment binarises
    assert not case.masks[0].any()  # an all-empty rater is valid data
    np.testing.assert_array_equal(case.masks[3] > 0, disk((32, 32), 7))
    assert case.meta["source"] == str(tmp_path / "train/images/LIDC-IDRI-0001/z-100.0_c0.png")


def test_flat_single_folder_orders_raters_naturally(tmp_path: Path):
    save(tmp_path / "a.png", scan(np.random.default_rng(1)))
    for rater in (10, 2, 0):
        save(tmp_path / f"a_seg{rater}.png", disk((32, 32), rater + 1))
    (case,) = read(tmp_path, rater_suffix=r"_seg(\d+)")
    assert case.case_id == case.group_id == "a"
    expected = [int(disk((32, 32), r + 1).sum()) for r in (0, 2, 10)]
    assert [int(m.sum()) for m in case.masks] == expected


def cimd_case(root: Path, k: int, shape=(32, 32)) -> Path:
    folder = root / f"case_{k}"
    save(folder / f"image_{k}.jpg", scan(np.random.default_rng(k), shape), quality=75)
    for rater in range(4):
        save(folder / f"label{rater}_{k}.jpg", disk(shape, 5 + rater) * 255, quality=75)
    return folder


def test_cimd_jpeg_masks_are_binarised_above_127_not_above_0(tmp_path: Path):
    folder = cimd_case(tmp_path, 3)
    cimd_case(tmp_path, 4, shape=(40, 24))  # sizes may differ between cases
    cases = read(tmp_path, **CIMD)
    shapes = [(c.case_id, c.image.shape) for c in cases]
    assert shapes == [("case_3", (1, 32, 32)), ("case_4", (1, 40, 24))]
    masks = cases[0].masks
    assert masks.dtype == np.uint8 and set(np.unique(masks)) == {0, 1}
    for rater in range(4):
        truth = disk((32, 32), 5 + rater)
        iou = (masks[rater] & truth).sum() / (masks[rater] | truth).sum()
        assert iou > 0.95
        raw = np.asarray(Image.open(folder / f"label{rater}_3.jpg"))
        assert (raw > 0).sum() > 1.3 * truth.sum()  # the halo the "> 0" rule would keep


def test_bone_us_rgb_images_and_empty_masks(tmp_path: Path):
    rng = np.random.default_rng(2)
    for k in range(2):
        folder = tmp_path / f"patient{k}_scan"
        save(folder / "image.png", (rng.random((24, 30, 3)) * 255).astype(np.uint8))
        for rater in range(1, 5):
            save(folder / f"rater{rater}.png", disk((24, 30), 6 * k, (10, 12)))
    cases = read(tmp_path, **BONE, group_regex=r"(patient\d+)")
    assert [c.group_id for c in cases] == ["patient0", "patient1"]
    assert cases[0].image.shape == (1, 24, 30)
    assert not cases[0].masks.any() and cases[0].rater_valid.all()  # nobody saw bone: still valid
    assert read(tmp_path, **BONE, color="rgb")[1].image.shape == (3, 24, 30)


def test_mask_without_image_flat(tmp_path: Path):
    hpunet_tree(tmp_path)
    orphan = save(tmp_path / "train/gt/LIDC-IDRI-0002/z-999.0_c9_l0.png", disk((32, 32), 4))
    with pytest.raises(DataError, match=names(orphan, "rater mask with no image")):
        read(tmp_path, **HPUNET)


def test_mask_without_image_per_case(tmp_path: Path):
    folder = cimd_case(tmp_path, 1)
    (folder / "image_1.jpg").unlink()
    with pytest.raises(DataError, match=names(folder / "label0_1.jpg", "rater mask with no image")):
        read(tmp_path, **CIMD)


def test_rater_masks_of_different_shapes(tmp_path: Path):
    folder = cimd_case(tmp_path, 1)
    bad = save(folder / "label2_1.jpg", disk((30, 32), 6) * 255, quality=75)
    image = re.escape(str(folder / "image_1.jpg"))
    problem = rf"rater mask shape \(30, 32\) differs from the image {image}'s \(32, 32\)"
    with pytest.raises(DataError, match=names(bad, problem)):
        read(tmp_path, **CIMD)


def test_mask_shape_differs_from_image(tmp_path: Path):
    save(tmp_path / "a.png", scan(np.random.default_rng(0)))
    bad = save(tmp_path / "a_l0.png", disk((16, 16), 4))
    problem = r"rater mask shape \(16, 16\) differs from the image"
    with pytest.raises(DataError, match=names(bad, problem)):
        read(tmp_path)


@pytest.mark.parametrize("name", ["a.png", "a_l1.png"])
def test_truncated_png(tmp_path: Path, name: str):
    save(tmp_path / "a.png", scan(np.random.default_rng(0), (64, 64)))
    save(tmp_path / "a_l0.png", disk((64, 64), 9) * 255)
    save(tmp_path / "a_l1.png", disk((64, 64), 9) * 255)
    broken = tmp_path / name
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    with pytest.raises(DataError, match=names(broken, "unreadable image file")):
        read(tmp_path)


def test_case_with_zero_raters(tmp_path: Path):
    hpunet_tree(tmp_path)
    lonely = tmp_path / "val/images/LIDC-IDRI-0003/z-200.0_c0.png"
    save(lonely, scan(np.random.default_rng(5)))
    with pytest.raises(DataError, match=names(lonely, "case has zero raters")):
        read(tmp_path, **HPUNET)


def test_empty_dataset(tmp_path: Path):
    (tmp_path / "case_1").mkdir()
    with pytest.raises(DataError, match=names(tmp_path, "no images found matching")):
        read(tmp_path, **CIMD)


def test_two_images_in_a_case_folder(tmp_path: Path):
    folder = cimd_case(tmp_path, 1)
    save(folder / "image_2.jpg", scan(np.random.default_rng(0)))
    with pytest.raises(DataError, match=names(folder, "several images match")):
        read(tmp_path, **CIMD)


def test_group_regex_must_match(tmp_path: Path):
    cimd_case(tmp_path, 1)
    with pytest.raises(DataError, match=r"case id 'case_1' does not match group_regex"):
        read(tmp_path, **CIMD, group_regex=r"patient(\d+)")


def test_root_problems(tmp_path: Path):
    with pytest.raises(ConfigError, match="ingestion.root"):
        read(None)
    with pytest.raises(DataError, match=r"missing: no such folder"):
        read(tmp_path / "missing")


def test_two_images_for_one_flat_case(tmp_path: Path):
    save(tmp_path / "a.png", scan(np.random.default_rng(0)))
    second = save(tmp_path / "a.tif", scan(np.random.default_rng(1)))
    save(tmp_path / "a_l0.png", disk((32, 32), 4))
    with pytest.raises(DataError, match=names(second, "second image for case 'a'")):
        read(tmp_path, pattern="*")


# the `folders` environment's defaults (conf/folders/parameters_data_ingestion.yml)
ENV = {**HPUNET, "group_regex": r"([^/]+)/[^/]+$|^([^/]+)$"}


def test_per_case_missing_rater_keeps_the_others_in_their_slots(tmp_path: Path):
    cimd_case(tmp_path, 1)
    folder = cimd_case(tmp_path, 2)
    (folder / "label1_2.jpg").unlink()
    first, second = read(tmp_path, **CIMD)
    assert first.rater_valid.tolist() == [True] * 4
    assert second.rater_valid.tolist() == [True, False, True, True]
    assert second.masks.shape == (4, 32, 32) and not second.masks[1].any()
    for rater in (0, 2, 3):  # rater 2's mask stays rater 2's, not moved up to slot 1
        truth = disk((32, 32), 5 + rater)
        assert ((second.masks[rater] & truth).sum() / (second.masks[rater] | truth).sum()) > 0.95


def test_flat_missing_rater_keeps_the_others_in_their_slots(tmp_path: Path):
    hpunet_tree(tmp_path)
    (tmp_path / "train/gt/LIDC-IDRI-0002/z-100.0_c0_l0.png").unlink()
    case = read(tmp_path, **HPUNET)[2]
    assert case.case_id == "train/LIDC-IDRI-0002/z-100.0_c0"
    assert case.rater_valid.tolist() == [False, True, True, True]
    np.testing.assert_array_equal(case.masks[3] > 0, disk((32, 32), 7))


def test_two_masks_of_one_rater_in_a_case(tmp_path: Path):
    folder = cimd_case(tmp_path, 1)
    second = save(folder / "label2_copy.jpg", disk((32, 32), 6) * 255, quality=75)
    with pytest.raises(DataError, match=names(second, r"second mask of rater '2' in this case \(first: label2_1\.jpg")):
        read(tmp_path, **CIMD)
    problem = re.escape("no rater name in the file name (rater_regex " + repr(r"rater_(\d+)") + ")")
    with pytest.raises(DataError, match=names(folder / "label0_1.jpg", problem)):
        read(tmp_path, **CIMD, rater_regex=r"rater_(\d+)")


def test_plain_flat_folder_reads_with_the_environment_defaults(tmp_path: Path):
    rng = np.random.default_rng(3)
    for name in ("0001", "0002"):
        save(tmp_path / f"{name}.png", scan(rng))
        for rater in range(4):
            save(tmp_path / f"{name}_l{rater}.png", disk((32, 32), 3 + rater) * 255)
    cases = read(tmp_path, **ENV)
    assert [(c.case_id, c.group_id, c.masks.shape[0]) for c in cases] == [("0001", "0001", 4), ("0002", "0002", 4)]
    assert "given_split" not in cases[0].meta


def test_no_images_error_says_what_the_folder_holds(tmp_path: Path):
    for k in range(3):
        save(tmp_path / f"{k}.jpg", scan(np.random.default_rng(k)))
    problem = r"no images found matching ingestion.reader.pattern '\*\*/\*\.png'; the folder holds 3 \.jpg files"
    with pytest.raises(DataError, match=names(tmp_path, problem)):
        read(tmp_path, **ENV)


def cimd_authors_tree(root: Path, training: int = 4, testing: int = 2) -> None:
    """``data/training/<n>/image_<n+1>.jpg`` + ``label0_.jpg`` ... ``label3_.jpg``, and testing/."""
    rng = np.random.default_rng(4)
    for split, count in (("training", training), ("testing", testing)):
        for n in range(count):
            folder = root / split / str(n)
            save(folder / f"image_{n + 1}.jpg", scan(rng), quality=90)
            for rater in range(4):
                save(folder / f"label{rater}_.jpg", disk((32, 32), 4 + rater) * 255, quality=90)


def test_split_folders_are_read_from_the_path(tmp_path: Path, caplog):
    cimd_authors_tree(tmp_path)
    with caplog.at_level("WARNING"):
        cases = read(tmp_path, **ENV, layout="per_case", case_glob="*/*")
    assert [(c.case_id, c.meta["given_split"]) for c in cases] == [
        *[(f"testing/{n}", "test") for n in range(2)],
        *[(f"training/{n}", "train") for n in range(4)],
    ]
    assert cases[0].rater_valid.all() and cases[0].masks.shape[0] == 4
    # the environment's patient regex finds "training": one group holds 4 of 6 cases
    (record,) = [r for r in caplog.records if r.levelname == "WARNING"]
    message = record.getMessage()
    assert "group_regex '([^/]+)/[^/]+$|^([^/]+)$' puts 4 of 6 cases into one group 'training'" in message
    caplog.clear()
    with caplog.at_level("WARNING"):
        read(tmp_path, **{**ENV, "group_regex": None}, layout="per_case", case_glob="*/*")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_hpunet_split_folders_any_case(tmp_path: Path):
    hpunet_tree(tmp_path)
    (tmp_path / "val").rename(tmp_path / "Validation")
    cases = read(tmp_path, **HPUNET)
    given = {c.case_id.split("/")[0]: c.meta["given_split"] for c in cases}
    assert given == {"train": "train", "Validation": "val"}


def test_a_path_naming_two_splits_is_refused(tmp_path: Path):
    folder = cimd_case(tmp_path / "train" / "test", 1)
    with pytest.raises(DataError, match=names(folder, r"path names two splits \(test, train\)")):
        read(tmp_path, **CIMD, case_glob="*/*/*")


@pytest.mark.parametrize(
    ("groups", "warned"),
    [("aabc", False), ("aaab", True), ("aab", True), ("aa", False), ("abab", False)],
)
def test_dominant_group_warning_above_half_of_three_or_more_cases(groups: str, warned: bool, caplog):
    with caplog.at_level("WARNING"):
        warn_dominant_group({f"c{i}": g for i, g in enumerate(groups)}, "rx", Path("root"))
    assert (f"group_regex 'rx' puts {groups.count('a')} of {len(groups)} cases" in caplog.text) is warned
