"""The circuit breaker: closed / open / half-open, shared by all keys of one client."""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import StrEnum

from tokenbroker.kernel.clock import Clock


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Stops calling a broker that keeps failing (Nygard, *Release It!*, "Circuit Breaker").

    Closed: requests flow; ``threshold`` consecutive broker faults open it. Open: no request
    is sent for ``reset_seconds``. Half-open: exactly one trial request; success closes the
    breaker, a fault opens it again. Any answer that is not a broker fault (a token, a
    refusal, a per-connection 503) counts as success: the service is up.

    Thread-safe; the critical sections never block, so asyncio code uses it directly.
    """

    def __init__(
        self,
        threshold: int,
        reset_seconds: float,
        clock: Clock,
        on_change: Callable[[BreakerState, BreakerState, int], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.reset_seconds = reset_seconds
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial = False

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """Whether a request may be sent now. A ``True`` must be followed by exactly one of
        :meth:`succeeded`, :meth:`failed` or :meth:`abandoned`."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.OPEN:
                if self._clock.monotonic() - self._opened_at < self.reset_seconds:
                    return False
                self._move(BreakerState.HALF_OPEN)
            if self._trial:
                return False
            self._trial = True
            return True

    def retry_in(self) -> float:
        """Seconds until the open breaker lets a trial through (0 when not open)."""
        with self._lock:
            if self._state is not BreakerState.OPEN:
                return 0.0
            elapsed = self._clock.monotonic() - self._opened_at
            return max(0.0, self.reset_seconds - elapsed)

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0
            self._trial = False
            if self._state is not BreakerState.CLOSED:
                self._move(BreakerState.CLOSED)

    def failed(self) -> None:
        with self._lock:
            self._failures += 1
            self._trial = False
            if self._state is BreakerState.HALF_OPEN or (
                self._state is BreakerState.CLOSED and self._failures >= self.threshold
            ):
                self._opened_at = self._clock.monotonic()
                self._move(BreakerState.OPEN)

    def abandoned(self) -> None:
        """The admitted request ended without an outcome (cancelled, or a local bug)."""
        with self._lock:
            self._trial = False

    def _move(self, state: BreakerState) -> None:
        previous, self._state = self._state, state
        if self._on_change is not None:
            self._on_change(previous, state, self._failures)
