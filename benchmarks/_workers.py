"""Worker processes of the resumable benchmarks (method_comparison, quality_sweep).

Each job runs in its own process (one model, its own torch threads) and writes its rows to disk;
the parent only schedules them, so a rerun of the same command skips what is already written and
retries what failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

logger = logging.getLogger("benchmarks")


def run_workers(jobs: Sequence[Any], launch: Callable[[Any], str], at_a_time: int) -> list[str]:
    """``launch(job)`` for every job, ``at_a_time`` at once, logging each message as it arrives.

    ``launch`` returns a message starting with ``FAILED`` for a job that failed; those messages are
    returned, so the caller can still write its report of the finished jobs before it stops.
    """
    logger.info("%d runs to do, %d at a time", len(jobs), at_a_time)
    messages: list[str] = []
    with ThreadPoolExecutor(at_a_time) as pool:
        for future in as_completed([pool.submit(launch, job) for job in jobs]):
            messages.append(future.result())
            logger.info("%s (%d of %d)", messages[-1], len(messages), len(jobs))
    return [m for m in messages if m.startswith("FAILED")]


def stop_if_failed(failed: list[str], total: int) -> None:
    if failed:
        raise SystemExit(f"{len(failed)} of {total} runs failed; rerun the same command to retry them")
