"""What makes one MLflow run recognisable among many: its name, its experiment's kind, its data.

kedro-mlflow names every run after its pipeline (``__default__``), so ten ablation runs look
alike in the MLflow UI. `run_name` spells out what usually differs between runs (variant, data,
seed, training steps); `AlignedDatasetInput` describes the aligned dataset as an MLflow dataset
input (name, source, content digest, split sizes), which fills the UI's Dataset column and lets
runs be filtered by the data they used. Nothing here knows Kedro; `hooks.py` applies it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.data.dataset import Dataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cimd_pipeline.data.aligned import SPLITS, AlignedSet, row_blocks

#: Experiment tag read by MLflow's UI to choose between its GenAI and model-training views; the
#: value is the one the UI itself writes when "Model training" is picked for an experiment.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
#: Query string that opens an experiment on its runs list in MLflow 3.17's UI, whose view
#: follows a per-browser "GenAI / Model training" switch (GenAI unless chosen) over the tag.
RUNS_VIEW_QUERY = "workflowType=machine_learning"
#: Kedro environments that name no dataset: the default run environment and the base.
_PLAIN_ENVS = {None, "", "base", "local"}


def mark_model_training(client: MlflowClient, experiment_id: str) -> None:
    """Tag the experiment as model training unless it already has a kind; another process
    tagging it at the same moment (two runs starting at once on a team server) is fine."""
    if EXPERIMENT_KIND_TAG in client.get_experiment(experiment_id).tags:
        return
    try:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    except MlflowException:
        if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
            raise


def dataset_label(params: Mapping[str, Any], env: str | None = None) -> str:
    """``source`` or ``source:<root folder>``, prefixed by a Kedro environment that differs.

    ``synthetic``, ``test/synthetic``, ``lidc``, ``folders:bubil``: two runs on different raw
    folders of the same reader get different labels.
    """
    ingestion = params.get("ingestion") or {}
    label = str(ingestion.get("source") or "synthetic")
    root = ingestion.get("root")
    if root:
        label += f":{Path(str(root)).name}"
    if env not in _PLAIN_ENVS and env != ingestion.get("source"):
        label = f"{env}/{label}"
    return label


def run_name(params: Mapping[str, Any], env: str | None = None, pipelines: Sequence[str] = ()) -> str:
    """E.g. ``cimd_aa · synthetic · seed 0 · 3000 steps`` (`` · training+sampling`` when the run
    is not the whole default chain)."""
    model = params.get("model") or {}
    training = params.get("training") or {}
    parts = [
        str(model.get("variant", "cimd_aa")),
        dataset_label(params, env),
        f"seed {training.get('seed', 0)}",
        f"{training.get('max_steps', '?')} steps",
    ]
    if list(pipelines) not in ([], ["__default__"]):
        parts.append("+".join(sorted(pipelines)))  # Kedro passes them in no fixed order
    return " · ".join(parts)


def _digest(data: AlignedSet) -> str:
    """SHA-256 (first 10 hex digits) of every array and of the case table: equal data, equal digest."""
    sha = hashlib.sha256()
    for name in ("images", "masks", "rater_valid", "oracle"):
        array = getattr(data, name)
        if array is None:
            continue
        sha.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        for block in row_blocks(array):  # a memory-mapped set is read, never resident, as a whole
            sha.update(memoryview(np.ascontiguousarray(block)).cast("B"))
    sha.update(data.cases.to_csv(index=False).encode())
    return sha.hexdigest()[:10]


class AlignedDatasetInput(Dataset):
    """The aligned multi-rater dataset as an MLflow dataset input.

    The profile holds the split sizes and the array geometry; the digest is computed from the
    content, so re-aligning the same raw data gives the same digest and other data another one.
    """

    def __init__(self, data: AlignedSet, path: str | Path, name: str) -> None:
        self._data = data
        super().__init__(source=LocalArtifactDatasetSource(str(Path(path).resolve())), name=name)

    def _compute_digest(self) -> str:
        return _digest(self._data)

    @property
    def profile(self) -> dict[str, Any]:
        splits = self._data.cases["split"].value_counts() if "split" in self._data.cases else {}
        height, width = self._data.image_size
        return {
            "cases": len(self._data),
            **{split: int(splits.get(split, 0)) for split in SPLITS},
            "raters": int(self._data.masks.shape[1]),
            "channels": self._data.image_channels,
            "image_size": f"{height}x{width}",
        }

    @property
    def schema(self) -> None:
        return None

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self.profile)}
