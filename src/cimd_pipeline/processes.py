"""This process's place among data-parallel processes, for training and sampling alike.

A command runs in one process, in worker processes it spawns on this machine (``num_processes``
of training or sampling), or as one rank of a ``torchrun`` job that may span machines. Training
(`cimd_pipeline.training.distributed`) and sampling (`cimd_pipeline.ensembles`) ask here whether
torchrun started them and join or leave its process group here, so both read the launcher alike.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch.distributed as dist

logger = logging.getLogger(__name__)

# Set once this process has left its torchrun group (the other ranks have gone): what follows in
# the same run (sampling after training) runs in this process alone.
_released = False


@dataclass(frozen=True)
class Workers:
    """This process's place among data-parallel processes; rank 0 of 1 without torch.distributed.

    In training every rank draws the same global batch of ``batch_size`` indices and trains on its
    contiguous share of ``batch_size / size`` examples; gradients are averaged over the ranks, so
    the run follows the one-process trajectory. Rank 0 alone writes files.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    def share(self, batch_size: int) -> tuple[int, int]:
        if batch_size % self.size:
            raise ValueError(
                f"training.batch_size={batch_size} is not divisible by the {self.size} training processes"
            )
        per_rank = batch_size // self.size
        return self.rank * per_rank, (self.rank + 1) * per_rank


def torchrun_workers() -> Workers | None:
    """This process's rank when ``torchrun`` started it with more than one process, else None.

    Read from the ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` variables torchrun sets; None also
    once this process has left the job (`release_torchrun`).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if _released or size <= 1 or "RANK" not in os.environ:
        return None
    return Workers(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def join_torchrun(backend: str) -> None:
    """Join torchrun's process group (``env://`` rendezvous) unless this process already has."""
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://")


def release_torchrun() -> None:
    """Leave torchrun's process group: the ranks other than 0 exit after their share of a node,
    so the nodes after it run in rank 0 alone."""
    global _released
    if dist.is_initialized():
        dist.destroy_process_group()
    _released = True
