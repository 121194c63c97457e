"""Whether the refresh loop is really refreshing: one tick observed, and the loop's health.

A process that answers HTTP is not a loop that refreshes. ``serve`` used to answer
``/healthz`` with ``ok`` while its loop lay dead after one unexpected exception, and tokens
expired behind a status that said ``active``. Liveness is therefore measured where it matters:
the age of the last *successful* tick, against a bound (three intervals by default), so a loop
that died, hangs on a store or fails every tick turns the probe red within that bound.

Every tick, whoever triggers it (the ``serve`` loop, ``POST /refresh``, Cloud Scheduler through
the refresher function), goes through :func:`observed_tick`, which

* never lets an exception escape except cancellation: a :class:`TokenBrokerError` is the
  broker's own, expected failure (one log line with its code); anything else is a bug, logged
  with its traceback and returned as :class:`TickCrashed` so that the caller keeps going;
* turns a tick that returned but could not do the broker's own work (results left uncommitted,
  events neither published nor parked) into :class:`TickIncomplete`, so the platform retries
  and alerts: per-connection refusals by a provider are not that (they are recorded, backed off
  and announced per connection);
* logs one structured summary line per tick, ``tick summary`` with ``ok``, the counts and the
  seconds, whatever happened (the line metrics are built on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokenbroker.kernel.errors import TokenBrokerError
from tokenbroker.kernel.log import get_logger

if TYPE_CHECKING:
    from tokenbroker.entrypoints.compose import Runtime
    from tokenbroker.refresh.tick import TickSummary

#: ``/healthz`` turns unhealthy when the last successful tick is older than this many intervals.
DEFAULT_STALE_INTERVALS = 3


class TickIncomplete(TokenBrokerError):
    """The tick returned, but left the broker's own work undone (HTTP 503: try again)."""

    code = "tick_incomplete"
    http_status = 503
    default_retryable = True


class TickCrashed(TokenBrokerError):
    """The tick raised something that is not a :class:`TokenBrokerError`: a bug. The message
    names only the exception's type; the traceback is in the log."""

    code = "internal_error"
    http_status = 500


def tick_problem(summary: TickSummary) -> str | None:
    """Why a tick that returned counts as failed, or ``None`` when it did its job."""
    problems = []
    if summary.uncommitted:
        problems.append(f"{summary.uncommitted} result(s) not committed")
    if summary.events_parked:
        problems.append(
            f"{summary.events_parked} event(s) not published (kept in the outbox: a later tick"
            " relays them)"
        )
    return "; ".join(problems) or None


@dataclass
class LoopHealth:
    """The refresh loop's record, on the monotonic clock (seconds). Values in, values out: the
    HTTP layer only renders :meth:`report`."""

    #: Seconds between ticks, and the age of the last success beyond which the loop is stale.
    interval: float
    max_age: float
    #: When the loop started: before its first success, the age counts from here.
    started_at: float
    ticks: int = 0
    failed_ticks: int = 0
    #: Ticks that raised something unexpected (bugs): failures too, and worth an alert.
    crashed_ticks: int = 0
    consecutive_failures: int = 0
    last_success_at: float | None = None
    last_error: str | None = None
    running_since: float | None = None

    @classmethod
    def start(cls, interval: float, now: float, max_age: float | None = None) -> LoopHealth:
        bound = max_age if max_age is not None else DEFAULT_STALE_INTERVALS * interval
        return cls(interval=interval, max_age=bound, started_at=now)

    def tick_started(self, now: float) -> None:
        self.running_since = now

    def tick_ended(self, now: float, error: TokenBrokerError | None) -> None:
        self.ticks += 1
        self.running_since = None
        if error is None:
            self.last_success_at = now
            self.consecutive_failures = 0
            return
        self.failed_ticks += 1
        self.consecutive_failures += 1
        self.crashed_ticks += isinstance(error, TickCrashed)
        self.last_error = error.code

    def report(self, now: float) -> tuple[bool, dict[str, Any]]:
        """``(healthy, body)``: healthy while the last success (or the start, before any) is at
        most ``max_age`` old."""
        since = self.last_success_at if self.last_success_at is not None else self.started_at
        age = now - since
        healthy = age <= self.max_age
        body: dict[str, Any] = {
            "status": "ok" if healthy else "stale",
            "last_success_age_seconds": (
                round(age, 3) if self.last_success_at is not None else None
            ),
            "seconds_since_start": round(now - self.started_at, 3),
            "max_age_seconds": self.max_age,
            "interval_seconds": self.interval,
            "ticks": self.ticks,
            "failed_ticks": self.failed_ticks,
            "crashed_ticks": self.crashed_ticks,
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
            "tick_running_seconds": (
                round(now - self.running_since, 3) if self.running_since is not None else None
            ),
        }
        return healthy, body


async def observed_tick(
    runtime: Runtime,
    *,
    trigger: str,
    health: LoopHealth | None = None,
    connection_ids: Sequence[str] | None = None,
    **options: Any,
) -> TickSummary | TokenBrokerError:
    """One tick, logged and recorded: its summary, or the error that failed it (never raised;
    only cancellation propagates)."""
    log = get_logger(component="tick", trigger=trigger)
    clock = runtime.clock
    started = clock.monotonic()
    if health is not None:
        health.tick_started(started)
    result: TickSummary | TokenBrokerError
    counts: dict[str, Any] = {}
    seen: TickSummary | None = None
    try:
        summary = seen = await runtime.tick(connection_ids=connection_ids, **options)
    except TokenBrokerError as error:
        result = error
    except Exception as bug:  # a bug: logged with its traceback, counted, contained
        log.exception(
            "tick crashed: an unexpected exception (a bug)", exception_type=type(bug).__name__
        )
        result = TickCrashed(f"the tick raised {type(bug).__name__} (traceback in the log)")
    else:
        counts = summary.to_json()
        problem = tick_problem(summary)
        result = TickIncomplete(f"tick incomplete: {problem}") if problem else summary
    ended = clock.monotonic()
    failure = result if isinstance(result, TokenBrokerError) else None
    await runtime.observe_tick(seen, ok=failure is None)
    if health is not None:
        health.tick_ended(ended, failure)
    counts["seconds"] = round(ended - started, 3)
    if failure is None:
        log.info("tick summary", ok=True, **counts)
    else:
        log.error(
            "tick summary", ok=False, error_code=failure.code, error=failure.message, **counts
        )
    return result
