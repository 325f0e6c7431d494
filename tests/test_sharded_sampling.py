"""Sampling as ranks of a torchrun job (2 gloo processes): rank 0 gathers every sample, bit for bit
those of one process; the other ranks get None."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from cimd_pipeline import processes
from cimd_pipeline.ensembles import draw_ensembles
from cimd_pipeline.processes import Workers, release_torchrun, torchrun_workers
from cimd_pipeline.sharded_sampling import shard_batches
from tests.test_ensembles import params, patterns, tiny_cimd

CPU = torch.device("cpu")
IDS = np.array([f"case_{i}" for i in range(5)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, folder: Path, settings: list[dict]) -> None:
    """One torchrun-like rank: the variables torchrun sets, then the sampling call of the node."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    for i, extra in enumerate(settings):
        processes._released = False  # one torchrun job per call, as in one kedro run per job
        samples = draw_ensembles(tiny_cimd(), patterns(5), IDS, params(**extra), CPU, "m", torchrun_workers())
        if rank == 0:
            np.savez(folder / f"{i}.npz", soft=samples.soft, binary=samples.binary, ids=samples.case_ids,
                     processes=samples.info["num_processes"])
        else:
            assert samples is None
        assert not torch.distributed.is_initialized()  # every rank leaves the group afterwards


@pytest.mark.slow
def test_torchrun_ranks_gather_the_one_process_samples_on_rank_0(tmp_path):
    # 5 cases x 3 samples in batches of 4: 4 batches, 2 per rank; in batches of 64: one batch,
    # so rank 1 draws nothing and still takes part in the gather
    settings = [{"method": "ddpm", "batch_size": 4}, {"method": "ddpm", "batch_size": 64, "seed": 3}]
    mp.spawn(_rank, args=(free_port(), tmp_path, settings), nprocs=2, join=True)
    for i, extra in enumerate(settings):
        one = draw_ensembles(tiny_cimd(), patterns(5), IDS, params(**extra), CPU, "m")
        with np.load(tmp_path / f"{i}.npz") as two:
            assert np.array_equal(two["soft"], one.soft) and np.array_equal(two["binary"], one.binary)
            assert list(two["ids"]) == list(IDS) and int(two["processes"]) == 2


def test_ranks_beyond_the_batches_get_no_block():
    batches = [range(0, 4), range(4, 8), range(8, 9)]
    assert shard_batches(batches, 2) == [batches[:2], batches[2:]]
    assert shard_batches(batches[:1], 2) == [batches[:1]]


def test_a_released_process_is_no_longer_a_torchrun_rank(monkeypatch):
    monkeypatch.setattr(processes, "_released", False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert torchrun_workers() == Workers(1, 2, 0)
    release_torchrun()  # no group joined: only the mark
    assert torchrun_workers() is None
    monkeypatch.setattr(processes, "_released", False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert torchrun_workers() is None
