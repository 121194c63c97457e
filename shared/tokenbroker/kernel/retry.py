"""Bounded, jittered retries of transient failures within one tick.

Only errors with ``retryable=True`` are retried. Delays use "full jitter" (AWS Architecture
Blog, "Exponential Backoff And Jitter"); a ``Retry-After`` from the server is honoured as a
minimum, and one longer than ``max_retry_after`` ends the attempts for this tick (the next tick
picks the connection up again at the time the server asked for).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tokenbroker.kernel.clock import Clock
from tokenbroker.kernel.errors import TokenBrokerError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    base_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 30.0

    def delay(self, attempt: int, error: TokenBrokerError, rng: random.Random) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or ``None`` to stop now."""
        if not error.retryable or attempt >= self.attempts:
            return None
        jittered = rng.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
        if error.retry_after is not None:
            if error.retry_after > self.max_retry_after:
                return None
            return max(error.retry_after, jittered)
        return jittered


async def call_with_retries(
    operation: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    clock: Clock,
    rng: random.Random,
    on_retry: Callable[[int, TokenBrokerError, float], None] | None = None,
) -> tuple[T, int]:
    """Run ``operation`` until it succeeds or a stop condition; returns (result, attempts)."""
    attempt = 1
    while True:
        try:
            return await operation(), attempt
        except TokenBrokerError as error:
            wait = policy.delay(attempt, error, rng)
            if wait is None:
                error.attempts = attempt
                raise
            if on_retry is not None:
                on_retry(attempt, error, wait)
            await clock.sleep(wait)
            attempt += 1
