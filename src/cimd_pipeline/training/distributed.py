"""Data-parallel training with torch.distributed: spawned workers on one machine, or torchrun.

`train_data_parallel` is what the training node calls:

- under ``torchrun`` (the ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` variables are set, one
  process per GPU on each machine) this process joins the job as its rank;
- otherwise, with ``training.num_processes`` > 1, it spawns that many workers on this machine
  (NCCL on CUDA, one GPU each; gloo on the CPU) and waits for them;
- otherwise it trains in this process.

Every rank draws the same global batch and trains on its share (`processes.Workers`); rank 0 alone
writes checkpoints. Since the checkpoint does not depend on the process count, a run continues
with another one.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cimd_pipeline.config import TrainingParams
from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.processes import Workers, join_torchrun, release_torchrun, torchrun_workers
from cimd_pipeline.training.loop import TrainResult, select_device, train

logger = logging.getLogger(__name__)

ARRAYS = ("images", "masks", "rater_valid")


def backend_for(params: TrainingParams) -> str:
    return "nccl" if select_device(params.device).type == "cuda" else "gloo"


def train_data_parallel(
    model: nn.Module, data: AlignedSet, params: TrainingParams, checkpoint_path: Path, fingerprint: str
) -> tuple[TrainResult, Workers]:
    """Train as one rank of torchrun, in ``params.num_processes`` workers, or in this process.

    Returns the result and this process's `Workers` (rank 0 of 1 unless under torchrun): only rank
    0 should write the model and log to MLflow.
    """
    workers = torchrun_workers()
    if workers is not None:
        join_torchrun(backend_for(params))
        logger.info("torchrun rank %d of %d (local rank %d)", workers.rank, workers.size, workers.local_rank)
        result = train(model, data, params, checkpoint_path, fingerprint, workers)
        release_torchrun()  # the other ranks leave now: what follows in this run is rank 0's alone
        return result, workers
    if params.num_processes == 1:
        return train(model, data, params, checkpoint_path, fingerprint), Workers()
    return spawn_training(model, data, params, checkpoint_path, fingerprint), Workers()


def spawn_training(
    model: nn.Module, data: AlignedSet, params: TrainingParams, checkpoint_path: Path, fingerprint: str
) -> TrainResult:
    """Train in ``params.num_processes`` spawned workers on this machine and return rank 0's result.

    The train arrays go to a scratch folder as ``.npy`` files that every worker memory-maps (one
    copy in the page cache instead of one pickled copy per worker); the workers meet through a
    file in that folder, so no port has to be free.
    """
    size = params.num_processes
    device = select_device(params.device)
    workers_per_gpu = torch.cuda.device_count() if device.type == "cuda" else size
    if size > workers_per_gpu:
        raise ValueError(f"training.num_processes={size} but this machine has {workers_per_gpu} GPUs")
    Workers(0, size).share(params.batch_size)  # fail here, not in every worker
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".spawn-", dir=checkpoint_path.parent) as scratch:
        folder = Path(scratch).resolve()  # file:// needs an absolute path (checkpoint_dir may be relative)
        for name in ARRAYS:
            np.save(folder / f"{name}.npy", np.ascontiguousarray(getattr(data, name)))
        logger.info("training in %d processes (%s)", size, backend_for(params))
        mp.spawn(
            _worker,
            args=(size, folder, data.cases, model, params, checkpoint_path, fingerprint),
            nprocs=size,
            join=True,
        )
        result = torch.load(folder / "result.pt", weights_only=True)
    return TrainResult(**result)


def _worker(
    rank: int,
    size: int,
    folder: Path,
    cases: pd.DataFrame,
    model: nn.Module,
    params: TrainingParams,
    checkpoint_path: Path,
    fingerprint: str,
) -> None:
    """One spawned rank: join the group, train, and (rank 0) leave the result for the parent."""
    # torch.multiprocessing hands every worker the same shared-memory parameters: a private copy
    # keeps each rank's optimiser from stepping the others' weights.
    model = copy.deepcopy(model)
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
    data = AlignedSet(cases=cases, **arrays)
    dist.init_process_group(
        backend_for(params), init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=size
    )
    try:
        result = train(model, data, params, checkpoint_path, fingerprint, Workers(rank, size, rank))
        if rank == 0:
            torch.save(asdict(result), folder / "result.pt")
    finally:
        dist.destroy_process_group()
