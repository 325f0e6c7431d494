"""Nodes of the ``sampling`` pipeline."""

from __future__ import annotations

import logging
from typing import Any

from cimd_pipeline.config import SamplingParams, TrainingParams
from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.ensembles import SampleSet, draw_ensembles
from cimd_pipeline.models.trained import TrainedModel
from cimd_pipeline.processes import torchrun_workers
from cimd_pipeline.training.loop import select_device

logger = logging.getLogger(__name__)


def sample_test_cases(
    trained_model: TrainedModel, data: AlignedSet, sampling: dict[str, Any], training: dict[str, Any]
) -> tuple[SampleSet, dict[str, Any]]:
    """Sample ``sampling.num_samples`` masks per case of ``sampling.split``; report the timing.

    Under torchrun (docs/scaling.md) every rank draws its share and rank 0 gathers, writes and
    logs; the other ranks leave once their share is sent.
    """
    params = SamplingParams.model_validate(sampling)
    cases = data.subset(params.split)
    if len(cases) == 0:
        raise ValueError(f"the {params.split!r} split is empty: nothing to sample")
    if cases.image_size != tuple(trained_model.image_size):
        raise ValueError(
            f"model was trained at {tuple(trained_model.image_size)} but the aligned data is "
            f"{cases.image_size}: re-run training or align to the model's size"
        )
    if params.max_cases is not None and len(cases) > params.max_cases:
        cases = cases.take(params.max_cases)
    device = select_device(TrainingParams.model_validate(training).device)
    net = trained_model.build()
    source = f"{trained_model.model.get('variant')} model {trained_model.source}"
    workers = torchrun_workers()
    samples = draw_ensembles(net, cases.images, cases.cases["case_id"].to_numpy(), params, device, source, workers)
    if samples is None:  # kedro-mlflow is off in these processes (settings.py)
        logger.info("torchrun rank %d: sampling done, leaving the samples to rank 0", workers.rank)
        raise SystemExit(0)
    logger.info(
        "sampled %d masks (%s, %d steps) in %.1f s: %.1f masks/s",
        samples.binary.shape[0] * samples.binary.shape[1],
        params.method,
        params.steps,
        samples.info["seconds"],
        samples.info["masks_per_second"],
    )
    timing = {
        "sampling_seconds": {"value": samples.info["seconds"], "step": 0},
        "masks_per_second": {"value": samples.info["masks_per_second"], "step": 0},
    }
    return samples, timing
