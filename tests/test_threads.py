"""`ordered_map`: input order, bounded work in flight, errors at their item's turn."""

from __future__ import annotations

import threading
import time

import pytest

from cimd_pipeline.threads import ordered_map


@pytest.mark.parametrize("workers", [1, 3])
def test_results_come_in_input_order(workers: int):
    def slow_first(x: int) -> int:
        time.sleep(0.02 if x % 5 == 0 else 0)
        return x * x

    assert list(ordered_map(slow_first, range(40), workers=workers, window=8)) == [x * x for x in range(40)]


def test_at_most_window_items_are_taken_ahead_of_the_consumer():
    taken = []

    def items():
        for x in range(100):
            taken.append(x)
            yield x

    stream = ordered_map(lambda x: x, items(), workers=2, window=4)
    assert next(stream) == 0
    assert len(taken) <= 4
    assert list(stream) == list(range(1, 100))


def test_an_error_is_raised_at_its_item_and_work_runs_on_several_threads():
    seen = set()

    def fn(x: int) -> int:
        seen.add(threading.get_ident())
        time.sleep(0.005)
        if x == 7:
            raise ValueError("bad item 7")
        return x

    stream = ordered_map(fn, range(50), workers=3, window=6)
    assert [next(stream) for _ in range(7)] == list(range(7))
    with pytest.raises(ValueError, match="bad item 7"):
        next(stream)
    assert len(seen) > 1
