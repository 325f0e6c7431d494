"""Drawing ensembles of masks: every test case times N samples, in one process or several.

The reference code draws one ensemble member at a time; here cases x samples are flattened into
rows and sampled ``batch_size`` rows at a time (`cimd_pipeline.sample_rows`), which is what makes
16 samples per image affordable on a CPU. `draw_ensembles` is the one place that decides whether
this process draws every batch or worker processes share them out
(`cimd_pipeline.sharded_sampling`); either way every row draws from its own noise stream, so an
image's samples do not depend on the other images, the batch size or the number of processes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cimd_pipeline.config import SamplingParams
from cimd_pipeline.sample_rows import draw_batches, row_batches
from cimd_pipeline.processes import Workers
from cimd_pipeline.sharded_sampling import draw_ranks, draw_sharded

logger = logging.getLogger(__name__)


@dataclass
class SampleSet:
    """Samples of a set of cases.

    Attributes:
        case_ids: (B,) ids, in the order of the arrays.
        binary: uint8 (B, N, H, W) masks (soft > 0).
        soft: float16 (B, N, H, W) pre-threshold values in [-1, 1].
        info: method, steps, seconds, masks per second, seed.
    """

    case_ids: np.ndarray
    binary: np.ndarray
    soft: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def draw_ensembles(
    net: nn.Module,
    images: np.ndarray,
    case_ids: np.ndarray,
    params: SamplingParams,
    device: torch.device,
    source: str | None = None,
    workers: Workers | None = None,
) -> SampleSet | None:
    """Draw ``params.num_samples`` masks for each image (B, C, H, W) with ``net.sample``.

    ``net`` keeps `models.contract.Segmenter`. ``case_ids`` key each image's noise streams, so
    the same id, image and seed give the same samples whatever else is drawn with them. The
    batches are shared out (`cimd_pipeline.sharded_sampling`), with bit-identical results, among
    the ranks of a torchrun job when ``workers`` (`cimd_pipeline.processes.torchrun_workers`)
    has more than one, else among ``params.num_processes`` spawned workers.

    Args:
        source: names the model in errors (default: its class).
        workers: this process's torchrun rank; all ranks must call with the same arguments.

    Returns:
        The samples; None on torchrun ranks other than 0 (rank 0 holds every sample).
    """
    source = source or type(net).__name__
    n = params.num_samples
    total = len(images) * n
    height, width = images.shape[2:]
    keys = np.asarray(case_ids, dtype=str)
    batches = row_batches(total, params.batch_size)
    started = time.perf_counter()
    processes = params.num_processes
    if workers is not None and workers.size > 1:
        processes = workers.size
        soft = draw_ranks(net, images, keys, params, device, batches, source, workers)
        if soft is None:
            return None
    elif processes > 1 and len(batches) > 1:
        soft = draw_sharded(net, images, keys, params, device, batches, source)
    else:
        soft = draw_batches(net, images, keys, params, device, batches, source, progress=params.progress)
    seconds = time.perf_counter() - started
    soft = soft.reshape(len(images), n, height, width)
    return SampleSet(
        case_ids=keys,
        binary=(soft > 0).astype(np.uint8),
        soft=soft,
        info={
            "method": params.method,
            "steps": params.steps,
            "num_samples": n,
            "seconds": seconds,
            "masks_per_second": total / max(seconds, 1e-9),
            "seed": params.seed,
            "device": str(device),
            "num_processes": processes,
            "bf16": params.bf16,
        },
    )
