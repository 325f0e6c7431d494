"""Per-example random draws that do not depend on how a batch is split across processes.

Data-parallel training gives each process a contiguous share of the global batch. For N processes
to follow the one-process trajectory, every example must get the rater, timestep and noise it would
get in one process: inside `batch_share`, each process draws for the whole global batch from its
generator (seeded and advanced alike in every process) and keeps its own rows. Outside it (one
process, sampling, inference) the draws are the plain torch calls, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

from cimd_pipeline.diffusion import noise

_SHARE: ContextVar[tuple[int, int, int] | None] = ContextVar("batch_share", default=None)


@contextmanager
def batch_share(start: int, stop: int, total: int) -> Iterator[None]:
    """Per-example draws inside this block are rows ``start:stop`` of a ``total``-row draw."""
    if not 0 <= start < stop <= total:
        raise ValueError(f"batch share {start}:{stop} is not inside a batch of {total}")
    token = _SHARE.set((start, stop, total))
    try:
        yield
    finally:
        _SHARE.reset(token)


def _global(shape: Sequence[int]) -> tuple[tuple[int, ...], slice]:
    share = _SHARE.get()
    if share is None:
        return tuple(shape), slice(None)
    start, stop, total = share
    if shape[0] != stop - start:
        raise ValueError(f"a per-example draw of {shape[0]} rows in a batch share of {stop - start} examples")
    return (total, *shape[1:]), slice(start, stop)


def randn(shape: Sequence[int], generator: noise.Generator, device: torch.device,
          dtype: torch.dtype | None = None) -> Tensor:
    """Standard normal draws, one row per example (``shape[0]`` = examples).

    Outside a batch share ``generator`` may also be per-row generators (`noise.RowGenerators`).
    """
    if _SHARE.get() is None:
        return noise.randn(shape, generator, device, dtype)
    full, rows = _global(shape)
    return torch.randn(full, generator=generator, device=device, dtype=dtype)[rows]


def rand(shape: Sequence[int], generator: noise.Generator, device: torch.device) -> Tensor:
    """Uniform draws in [0, 1), one row per example.

    Outside a batch share ``generator`` may also be per-row generators (`noise.RowGenerators`).
    """
    if _SHARE.get() is None:
        return noise.rand(shape, generator, device)
    full, rows = _global(shape)
    return torch.rand(full, generator=generator, device=device)[rows]


def randint(high: int, shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Integers in [0, high), one row per example."""
    full, rows = _global(shape)
    return torch.randint(0, high, full, generator=generator, device=device)[rows]


def pick_uniform(valid: Tensor, generator: torch.Generator | None) -> Tensor:
    """Index (B,) of one uniformly drawn True entry per row of bool ``valid`` (B, R).

    The exponential race torch.multinomial runs for one draw (argmax of weight / Exp(1)), the same
    numbers for the same generator, written out so that it can be drawn for the global batch and
    so that no host synchronisation is needed: torch.multinomial validates its weights with
    ``.item()``. Every case has at least one valid rater (ingestion refuses others).
    """
    full, rows = _global(valid.shape)
    race = torch.empty(full, device=valid.device).exponential_(generator=generator)[rows]
    return (valid.float() / race).argmax(dim=1)
