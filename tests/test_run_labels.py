"""Run names, dataset labels and the aligned dataset's MLflow description."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.run_labels import AlignedDatasetInput, dataset_label, run_name

BASE = {"model": {"variant": "cimd_aa"}, "training": {"seed": 0, "max_steps": 3000},
        "ingestion": {"source": "synthetic", "root": None}}


@pytest.mark.parametrize(
    ("params", "env", "pipelines", "name"),
    [
        (BASE, "local", ["__default__"], "cimd_aa · synthetic · seed 0 · 3000 steps"),
        (BASE, None, [], "cimd_aa · synthetic · seed 0 · 3000 steps"),
        (BASE, "test", ["__default__"], "cimd_aa · test/synthetic · seed 0 · 3000 steps"),
        ({**BASE, "model": {"variant": "phiseg"}, "training": {"seed": 2, "max_steps": 500}}, "base",
         ["training", "sampling"], "phiseg · synthetic · seed 2 · 500 steps · sampling+training"),
        ({**BASE, "ingestion": {"source": "lidc", "root": "data/01_raw/lidc"}}, "lidc", ["__default__"],
         "cimd_aa · lidc:lidc · seed 0 · 3000 steps"),
        ({**BASE, "ingestion": {"source": "folders", "root": "/data/BU-BIL/"}}, "folders", ["inference", "__default__"],
         "cimd_aa · folders:BU-BIL · seed 0 · 3000 steps · __default__+inference"),
    ],
)
def test_run_name_says_what_differs(params, env, pipelines, name):
    assert run_name(params, env, pipelines) == name


def test_dataset_label_tells_folders_of_one_reader_apart():
    one = {"ingestion": {"source": "folders", "root": "/data/a"}}
    other = {"ingestion": {"source": "folders", "root": "/data/b"}}
    assert dataset_label(one, "folders") != dataset_label(other, "folders")
    assert dataset_label(one, "test") == "test/folders:a"


def _aligned(seed: int) -> AlignedSet:
    rng = np.random.default_rng(seed)
    cases = pd.DataFrame({"case_id": [f"c{i}" for i in range(6)], "group_id": "g",
                          "split": ["train"] * 3 + ["val", "test", "test"]})
    return AlignedSet(rng.random((6, 1, 4, 5), dtype=np.float32), (rng.random((6, 2, 4, 5)) < 0.5).astype(np.uint8),
                      np.ones((6, 2), bool), cases)


def test_aligned_input_digest_follows_the_content_and_profile_counts_splits(tmp_path):
    data = _aligned(0)
    described = AlignedDatasetInput(data, tmp_path, "synthetic aligned")
    assert described.digest == AlignedDatasetInput(_aligned(0), tmp_path / "elsewhere", "other").digest
    assert described.digest != AlignedDatasetInput(_aligned(1), tmp_path, "synthetic aligned").digest
    relabelled = _aligned(0)
    relabelled.cases.loc[3, "split"] = "train"  # same arrays, another split
    assert described.digest != AlignedDatasetInput(relabelled, tmp_path, "x").digest
    entity = described._to_mlflow_entity()
    assert entity.name == "synthetic aligned" and entity.source_type == "local"
    assert json.loads(entity.source) == {"uri": str(tmp_path.resolve())}
    assert json.loads(entity.profile) == {"cases": 6, "train": 3, "val": 1, "test": 2, "raters": 2,
                                          "channels": 1, "image_size": "4x5"}
