"""Nodes of the ``training`` pipeline."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from cimd_pipeline.config import IngestionParams, ModelParams, TrainingParams
from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.data.readers import reader_preprocessing
from cimd_pipeline.models.trained import TrainedModel, build_model
from cimd_pipeline.training.fingerprint import data_digest, run_fingerprint
from cimd_pipeline.training.distributed import train_data_parallel

logger = logging.getLogger(__name__)


def train_model(
    data: AlignedSet,
    model: dict[str, Any],
    training: dict[str, Any],
    alignment: dict[str, Any],
    ingestion: dict[str, Any] | None = None,
) -> tuple[TrainedModel, dict[str, Any]]:
    """Train on the train split; return the EMA model and its loss curves as MLflow metrics.

    The model file keeps the ``alignment`` block and the reader's pre-processing (from
    ``ingestion``), so inference prepares new images exactly as the training data was.

    Checkpoints live in ``training.checkpoint_dir/<variant>-<fingerprint>/last.pt`` so a changed
    configuration starts afresh while the same one resumes.
    """
    model_params = ModelParams.model_validate(model)
    train_params = TrainingParams.model_validate(training)
    ingestion_params = IngestionParams.model_validate(ingestion or {})
    train_set = data.subset("train")
    plain = model_params.model_dump(mode="json")
    digest = data_digest(train_set)
    fingerprint = run_fingerprint(model_params, train_params, digest)
    checkpoint = Path(train_params.checkpoint_dir) / f"{model_params.variant.value}-{fingerprint}" / "last.pt"
    torch.manual_seed(train_params.seed)
    net = build_model(model_params, train_set.image_channels)
    parameters = sum(p.numel() for p in net.parameters())
    logger.info("training %s (%d parameters) on %d cases", model_params.variant.value, parameters, len(train_set))
    result, workers = train_data_parallel(net, train_set, train_params, checkpoint, fingerprint)
    if workers.rank > 0:
        # A torchrun rank other than 0 has done its share; rank 0 writes the model and logs the
        # run (kedro-mlflow is off in these processes, see settings.py).
        logger.info("torchrun rank %d: training done, leaving the model to rank 0", workers.rank)
        raise SystemExit(0)
    trained = TrainedModel(
        model=plain,
        image_channels=train_set.image_channels,
        image_size=train_set.image_size,
        alignment=alignment,
        reader=reader_preprocessing(ingestion_params.source, ingestion_params.reader),
        state_dict=result.ema_state,
        info={
            "steps": result.steps,
            "train_seconds": result.seconds,
            "device": result.device,
            "fingerprint": fingerprint,
            "data_digest": digest,
            "parameters": parameters,
            "resumed_from": result.resumed_from,
        },
    )
    # every loss term the model returns (CIMD: loss/mse/vlb/kl; the baselines: loss/bce/kl/...)
    terms = [name for name in result.history[0] if name != "step"] if result.history else []
    curves: dict[str, Any] = {
        name: [{"value": row[name], "step": row["step"]} for row in result.history] for name in terms
    }
    curves["seconds"] = {"value": result.seconds, "step": result.steps}
    curves["parameters"] = {"value": float(parameters), "step": 0}
    return trained, curves
