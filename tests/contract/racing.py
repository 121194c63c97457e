"""Run callables in threads released at the same instant, to provoke races."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def race(calls: Sequence[Callable[[], T]], *, timeout: float = 30) -> list[T | BaseException]:
    """Each call's result (or the exception it raised), in order.

    The threads wait at a barrier and the interpreter switches threads as often as it can
    while they run, so unsynchronised read-modify-write sequences interleave.
    """
    results: list[T | BaseException | None] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(n: int) -> None:
        barrier.wait()
        try:
            results[n] = calls[n]()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            results[n] = exc

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=run, args=(n,)) for n in range(len(calls))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout)
            assert not thread.is_alive(), "a racing call did not finish"
    finally:
        sys.setswitchinterval(previous)
    return results  # type: ignore[return-value]
