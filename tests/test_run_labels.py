"""Run names, dataset labels and the aligned dataset's MLflow description."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.hooks import MlflowRunLabelHook
from cimd_pipeline.run_labels import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    AlignedDatasetInput,
    dataset_label,
    mark_model_training,
    run_name,
)

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


def test_experiment_kind_is_set_once_and_a_concurrent_tagger_is_fine(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    tagged = client.create_experiment("tagged", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    mark_model_training(client, tagged)  # a kind chosen by a person stays
    assert client.get_experiment(tagged).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    plain = client.create_experiment("plain")
    mark_model_training(client, plain)
    assert client.get_experiment(plain).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND

    class Racing:
        """Another process inserts the tag between our read and our write (PostgreSQL refuses the
        second insert with a unique-key violation)."""

        def __init__(self, set_by_other: bool):
            self.reads, self.set_by_other = 0, set_by_other

        def get_experiment(self, experiment_id):
            self.reads += 1
            return client.get_experiment(plain if self.reads > 1 and self.set_by_other else tagged_none)

        def set_experiment_tag(self, *args):
            raise MlflowException("duplicate key value violates unique constraint")

    tagged_none = client.create_experiment("none")
    mark_model_training(Racing(set_by_other=True), "x")  # the other process's tag is there: fine
    with pytest.raises(MlflowException, match="duplicate key"):
        mark_model_training(Racing(set_by_other=False), "x")  # still untagged: a real error


def test_aligned_dataset_is_logged_once_per_run_even_after_a_concurrent_insert(tmp_path, monkeypatch):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("labels", artifact_location=str(tmp_path / "artefacts"))
    hook = MlflowRunLabelHook()
    hook._params, hook._env, hook._aligned_path = BASE, "test", str(tmp_path)
    real, calls = mlflow.log_input, []

    def first_refused(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException("duplicate key value violates unique constraint")
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", first_refused)
    try:
        with mlflow.start_run(experiment_id=experiment) as run:
            hook.after_dataset_loaded("aligned_dataset", _aligned(0), node=None)
            hook.after_dataset_loaded("aligned_dataset", _aligned(0), node=None)  # once per run
            hook.after_dataset_loaded("ingested_cases", object(), node=None)  # other datasets: ignored
    finally:
        mlflow.set_tracking_uri(previous)
    inputs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run.info.run_id).inputs.dataset_inputs
    assert len(calls) == 2 and [i.dataset.name for i in inputs] == ["test/synthetic aligned"]
