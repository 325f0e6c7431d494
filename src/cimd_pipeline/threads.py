"""An ordered, bounded map over a small thread pool, for file decoding and compression.

PNG decoding (Pillow) and zlib (de)compression release the GIL, so two to four threads read or
write the per-case files of ingestion and alignment up to twice as fast on 2 cores (measured on
the LIDC slice tree: 470 slices decoded in 2.8 s on one thread, 1.6 s on two), with no process
start-up and no pickling. Results come back in input order, and at most ``window`` items are in
flight, so memory stays bounded however long the input.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def io_workers() -> int:
    """Threads for file work: the usable cores, at least 1 and at most 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None, window: int = 32) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads (default `io_workers`), results in input order.

    An exception of ``fn`` is raised when its item's turn comes; items after it are not used.
    """
    workers = io_workers() if workers is None else workers
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
