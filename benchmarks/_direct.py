"""The pipeline's chain in one process, without Kedro or MLflow installed.

A GPU node often has torch but not the project's Kedro/MLflow stack. The node modules
(``cimd_pipeline.pipelines.<name>.nodes``) import no Kedro, nor do their packages, so the chain
runs the very code ``kedro run`` runs: ingestion -> alignment -> training -> sampling ->
evaluation, on the project's merged parameters (``conf/base`` then ``conf/<env>``, key by key like
the project's config loader).
"""

from __future__ import annotations

import copy
import importlib
import tempfile
from types import ModuleType
from typing import Any

import yaml

from _kedro import ROOT


def _node_module(pipeline: str) -> ModuleType:
    """``cimd_pipeline.pipelines.<pipeline>.nodes``, the node functions ``kedro run`` calls."""
    return importlib.import_module(f"cimd_pipeline.pipelines.{pipeline}.nodes")


def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_parameters(env: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """conf/base parameters, then conf/<env>'s (soft merge), then dotted ``overrides``."""
    params: dict[str, Any] = {}
    for folder in ["base"] + ([env] if env else []):
        for path in sorted((ROOT / "conf" / folder).glob("parameters*.yml")):
            params = _merge(params, yaml.safe_load(path.read_text()) or {})
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        block = params
        for key in parents:
            block = block.setdefault(key, {})
        block[leaf] = yaml.safe_load(value) if isinstance(value, str) else value
    return params


def prepare_data(params: dict[str, Any]):
    """Ingest and align as the first two pipelines do; returns the `AlignedSet`, in memory.

    `align_dataset` returns a stream that the catalog writes to disk case by case; the benchmark
    data sets are small, so they are stacked here instead (same rows, same split).
    """
    cases = _node_module("data_ingestion").ingest_cases(params["ingestion"])
    return _node_module("mask_alignment").align_dataset(cases, params["alignment"]).collect()


def add_data_arguments(parser) -> None:
    """``--aligned`` and ``--env``, the arguments of `aligned_data`, for the analysis scripts."""
    parser.add_argument("--aligned", default=None,
                        help="mask_alignment's output folder (data/03_primary/aligned); default: ingest and align "
                        "as conf/base (+ --env) says, the data the benchmark sweeps train on")
    parser.add_argument("--env", default=None, help="conf/<env> over conf/base, for the data without --aligned")


def aligned_data(folder: str | None, env: str | None = None):
    """The `AlignedSet` saved by mask_alignment in ``folder``; without one, built from the config.

    The benchmark models live outside ``data/06_models`` and the pipeline may never have run on this
    machine, so the analysis scripts rebuild the data the way the sweeps trained on it.
    """
    if folder is None:
        return prepare_data(load_parameters(env))
    from cimd_pipeline.io.aligned_dataset import AlignedDataset  # a Kedro dataset: only when asked for

    return AlignedDataset(folder).load()


def run_chain(data, params: dict[str, Any], sample: bool = True) -> dict[str, Any]:
    """Train, then (``sample``) sample and score the test split; metrics.json's content.

    Checkpoints go to a throw-away folder, so runs in parallel never resume from each other.
    """
    training = _node_module("training")
    with tempfile.TemporaryDirectory(prefix="cimd-direct-") as folder:
        params = _merge(params, {"training": {"checkpoint_dir": folder, "resume": False}})
        trained, _ = training.train_model(
            data, params["model"], params["training"], params["alignment"], params["ingestion"]
        )
    if not sample:
        return {"train_steps": trained.info["steps"], "train_seconds": trained.info["train_seconds"]}
    samples, _ = _node_module("sampling").sample_test_cases(trained, data, params["sampling"], params["training"])
    summary, _, _ = _node_module("evaluation").evaluate_samples(samples, data, trained)
    return summary
