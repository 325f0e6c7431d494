"""``alignment.split``: given splits kept, seeded split by patient otherwise, empty splits refused.

The end-to-end cases read real files in the public releases' layouts with the ``folders`` reader
and align them with the ``mask_alignment`` node, as ``kedro run`` does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cimd_pipeline.data.readers import get_reader
from cimd_pipeline.data.splits import DEFAULT_FRACTIONS, assign_splits, choose_splits
from cimd_pipeline.errors import ConfigError, DataError
from cimd_pipeline.config import validate_parameters
from cimd_pipeline.pipelines.mask_alignment.nodes import align_dataset
from tests.data.readers.test_folders import ENV, cimd_authors_tree, disk, save, scan


def table(groups: list[str], given: list[str | None] | None = None) -> pd.DataFrame:
    frame = pd.DataFrame({"case_id": [f"c{i}" for i in range(len(groups))], "group_id": groups})
    if given is not None:
        frame["given_split"] = given
    return frame


def test_auto_keeps_given_splits_when_every_case_has_one():
    cases = table(["a", "a", "b", "c"], ["train", "val", "test", "train"])
    np.testing.assert_array_equal(choose_splits(cases, "auto", 0), ["train", "val", "test", "train"])


def test_auto_without_given_splits_is_the_seeded_split_by_patient():
    groups = [f"p{i // 2}" for i in range(40)]
    for frame in (table(groups), table(groups, [None] * 40)):
        splits = choose_splits(frame, "auto", 3)
        np.testing.assert_array_equal(splits, assign_splits(groups, DEFAULT_FRACTIONS, 3))
        assert pd.DataFrame({"g": groups, "s": splits}).groupby("g")["s"].nunique().max() == 1


def test_explicit_fractions_re_split_given_data():
    groups = [f"p{i}" for i in range(20)]
    frame = table(groups, ["train"] * 10 + ["test"] * 10)
    fractions = {"train": 0.5, "val": 0.25, "test": 0.25}
    np.testing.assert_array_equal(choose_splits(frame, fractions, 1), assign_splits(groups, fractions, 1))


def test_partly_given_splits_are_refused():
    frame = table(["a", "b", "c"], ["train", None, "test"])
    problem = r"mask_alignment: 2 of 3 cases lie under a train/val/test folder.*'c1'"
    with pytest.raises(DataError, match=problem):
        choose_splits(frame, "auto", 0)


def test_given_splits_without_test_cases_are_refused():
    frame = table(["a", "b"], ["train", "val"])
    problem = r"the 'test' split is empty: no case lies under a test/ or testing/ folder"
    with pytest.raises(DataError, match=problem):
        choose_splits(frame, "auto", 0)


def test_fractions_that_leave_a_split_empty_are_refused():
    frame = table(["training"] * 5 + ["testing"])  # two groups for three splits
    problem = r"the '(train|val|test)' split is empty: 6 cases in 2 patient group\(s\).*group_regex"
    with pytest.raises(DataError, match=problem):
        choose_splits(frame, "auto", 0)


def test_split_setting_is_validated():
    assert validate_parameters({"alignment": {"split": "auto"}}) is not None
    with pytest.raises(ConfigError, match="alignment.split"):
        validate_parameters({"alignment": {"split": "given"}})


def align(root, **reader) -> pd.DataFrame:
    cases = list(get_reader("folders")(root, {**ENV, **reader}, 0))
    return align_dataset(cases, {"image_size": 16}).collect().cases


def test_cimd_authors_training_testing_folders_are_kept(tmp_path):
    cimd_authors_tree(tmp_path, training=5, testing=3)
    cases = align(tmp_path, layout="per_case", case_glob="*/*")
    by_folder = cases.groupby(cases["case_id"].str.split("/").str[0])["split"].unique()
    assert {k: list(v) for k, v in by_folder.items()} == {"training": ["train"], "testing": ["test"]}


def crops(root: Path, patients: range, crops_per_patient: int = 2) -> None:
    """HPU-Net crops: ``images/<patient>/<id>.png`` + ``gt/<patient>/<id>_l<k>.png``."""
    rng = np.random.default_rng(patients.start)
    for patient in patients:
        for crop in range(crops_per_patient):
            name = f"LIDC-IDRI-{patient:04d}", f"z-{crop}.0_c0"
            save(root / "images" / name[0] / f"{name[1]}.png", scan(rng))
            for rater in range(4):
                save(root / "gt" / name[0] / f"{name[1]}_l{rater}.png", disk((32, 32), 3 + rater) * 255)


def test_hpunet_train_val_test_folders_are_kept(tmp_path):
    for split, patients in (("train", range(0, 4)), ("val", range(4, 5)), ("test", range(5, 7))):
        crops(tmp_path / split, patients)
    cases = align(tmp_path)
    assert (cases["split"] == cases["case_id"].str.split("/").str[0]).all()
    assert cases["split"].value_counts().to_dict() == {"train": 8, "test": 4, "val": 2}


def test_tree_without_split_folders_gets_the_seeded_patient_split(tmp_path):
    crops(tmp_path, range(12))
    cases = align(tmp_path)
    assert "given_split" not in cases.columns
    np.testing.assert_array_equal(cases["split"], assign_splits(cases["group_id"], DEFAULT_FRACTIONS, 0))
    assert cases["group_id"].nunique() == 12 and cases.groupby("group_id")["split"].nunique().max() == 1
    assert set(cases["split"]) == {"train", "val", "test"}
