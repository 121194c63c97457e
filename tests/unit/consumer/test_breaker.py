"""The circuit breaker alone, on a FakeClock."""

from __future__ import annotations

from tokenbroker.consumer import BreakerState, CircuitBreaker
from tokenbroker.kernel.clock import FakeClock


def test_circuit_breaker_states(clock: FakeClock) -> None:
    moves: list[tuple[BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(2, 10, clock, on_change=lambda a, b, _: moves.append((a, b)))
    assert breaker.allow()
    breaker.failed()
    assert breaker.allow()
    breaker.failed()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retry_in() == 10
    clock.advance(10)
    assert breaker.allow()  # the one trial
    assert not breaker.allow()  # others wait for its outcome
    breaker.abandoned()  # cancelled: the next caller gets the trial
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.retry_in() == 0
    assert breaker.allow() and breaker.allow()
    assert moves == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]
