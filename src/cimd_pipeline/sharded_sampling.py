"""Sampling shared out among processes: spawned workers (``sampling.num_processes``), one per
GPU if any, or the ranks of a ``torchrun`` job across machines.

Sampling 16-100 masks for every image of a large test set is embarrassingly parallel, but a
single process leaves GPUs idle, and on one GPU a single process is launch-bound. The flat rows
(image x ensemble member) are cut into the same batches as in one process and the batches are
dealt out in contiguous blocks, so every batch is computed exactly as it would be in one process
and, because every row draws from its own (seed, image key, member) noise stream, the merged
samples are bit-identical whatever the process count. Workers are started with
``torch.multiprocessing``'s spawn method (safe with CUDA and with threads); on a machine with
GPUs worker p uses GPU p modulo their number, otherwise the CPU. Under torchrun every rank draws
its block on GPU ``LOCAL_RANK`` (or the CPU) and rank 0 gathers the blocks over a gloo group (the
samples travel as host arrays, whatever the devices).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cimd_pipeline.config import SamplingParams
from cimd_pipeline.processes import Workers, join_torchrun, release_torchrun
from cimd_pipeline.sample_rows import draw_batches

logger = logging.getLogger(__name__)


def shard_batches(batches: Sequence[range], shards: int) -> list[list[range]]:
    """Deal ``batches`` out in at most ``shards`` contiguous, non-empty blocks of near-equal size."""
    bounds = np.linspace(0, len(batches), min(shards, len(batches)) + 1).round().astype(int)
    return [list(batches[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def worker_device(device: torch.device, rank: int) -> torch.device:
    """The device of worker ``rank``: GPU ``rank`` modulo the GPU count, else ``device`` itself."""
    if device.type == "cuda":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return device


def _draw_shard(
    net: nn.Module,
    images: np.ndarray,
    keys: list[str],
    params: SamplingParams,
    device: torch.device,
    batches: list[range],
    first_image: int,
    source: str,
    threads: int,
) -> np.ndarray:
    """Worker: soft masks of ``batches`` (rows of the whole set), in order."""
    torch.set_num_threads(threads)
    return draw_batches(net, images, keys, params, device, batches, source, first_image)


def draw_sharded(
    net: nn.Module,
    images: np.ndarray,
    keys: np.ndarray,
    params: SamplingParams,
    device: torch.device,
    batches: Sequence[range],
    source: str,
) -> np.ndarray:
    """Soft masks float16 (rows, H, W) of all ``batches``, drawn by ``params.num_processes`` workers.

    Each worker receives a CPU copy of ``net`` and only the images its rows need.
    """
    n = params.num_samples
    shards = shard_batches(batches, params.num_processes)
    threads = max(1, torch.get_num_threads() // len(shards))
    cpu_net = net.to("cpu").eval()
    jobs = []
    for rank, shard in enumerate(shards):
        first, last = shard[0].start // n, (shard[-1].stop - 1) // n
        jobs.append((
            cpu_net,
            np.asarray(images[first : last + 1]),
            [str(k) for k in keys[first : last + 1]],
            params,
            worker_device(device, rank),
            shard,
            first,
            source,
            threads,
        ))
    logger.info(
        "sampling %d batches in %d processes (%s, %d thread(s) each)",
        len(batches), len(shards), device.type, threads,
    )
    pool = mp.get_context("spawn").Pool(len(shards))
    try:
        parts = pool.starmap(_draw_shard, jobs)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    return np.concatenate(parts)


def draw_ranks(
    net: nn.Module,
    images: np.ndarray,
    keys: np.ndarray,
    params: SamplingParams,
    device: torch.device,
    batches: Sequence[range],
    source: str,
    workers: Workers,
) -> np.ndarray | None:
    """Soft masks float16 (rows, H, W) of all ``batches`` on rank 0, None on the other ranks.

    This process is rank ``workers.rank`` of a torchrun job: it joins the job's process group,
    draws its contiguous block of batches on its own device, and sends the block to rank 0, which
    concatenates the blocks in rank order; then every rank leaves the group.
    """
    join_torchrun("gloo")
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    blocks = shard_batches(batches, workers.size)
    mine = blocks[workers.rank] if workers.rank < len(blocks) else []
    logger.info(
        "torchrun rank %d of %d: sampling %d of %d batches", workers.rank, workers.size, len(mine), len(batches)
    )
    part = draw_batches(
        net, images, keys, params, worker_device(device, workers.local_rank), mine, source,
        progress=params.progress and workers.rank == 0,
    )
    parts: list[np.ndarray] | None = [None] * workers.size if workers.rank == 0 else None
    dist.gather_object(part, parts, dst=0, group=group)
    release_torchrun()
    return np.concatenate(parts) if parts is not None else None
