"""The sliding-window log behind :meth:`StateStore.take_budget`, shared by every adapter.

Each adapter keeps, per budget key, the takes still inside the window as ``(at, cost)`` pairs
and runs :func:`take` on them inside its own atomic read-modify-write (a lock, one SQLite
transaction, one Firestore transaction); the adapters differ only in how they store the list
(the template-method shape of :mod:`.secret_store`). ``at`` is an integer count of
microseconds since the Unix epoch, so window boundaries are exact on every backend (a float
of seconds loses the last microsecond at today's dates).

Why a log of takes and not a counter or a token bucket: providers state their limits as "at
most N in any span of W" (Zoho: "up to ten access tokens in a span of ten minutes" per refresh
token, https://www.zoho.com/accounts/protocol/oauth/web-apps/access-token-expiry.html) without
saying where their windows start. A fixed-window counter lets ``2 * limit`` through across a
window boundary, and a token bucket (GCRA) with a burst of ``limit`` lets up to
``2 * limit - 1`` through in one window. Only the log bounds *every* window of length
``window`` to ``limit``, so it is at least as strict as any fixed window the provider may count
in. It costs one entry per take still in the window, which ``MAX_BUDGET_LIMIT`` bounds.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import accumulate

from tokenbroker.kernel.errors import ConfigError
from tokenbroker.ports import (
    MAX_BUDGET_KEY_LENGTH,
    MAX_BUDGET_LIMIT,
    MAX_BUDGET_WINDOW,
    BudgetDecision,
)

__all__ = [
    "GC_GRACE",
    "GC_GRACE_MICROS",
    "Take",
    "TakeResult",
    "check_arguments",
    "from_micros",
    "micros",
    "parse_takes",
    "parse_takes_json",
    "take",
]

#: One take still in its window: (microseconds since the epoch, cost).
Take = tuple[int, int]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
#: The latest ``now`` accepted: far enough from ``datetime.max`` that ``now + window`` (and the
#: expiry of a take stamped then) can still be represented.
_LATEST = datetime.max.replace(tzinfo=UTC) - 2 * MAX_BUDGET_WINDOW


def micros(value: datetime) -> int:
    """Microseconds since the epoch, exactly (no float rounding)."""
    return (value - _EPOCH) // _MICROSECOND


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


_LATEST_MICROS = micros(_LATEST)

#: A store may delete a budget whose every take aged out this long ago, by its own clock. The
#: grace is far longer than any clock difference between refreshers, so a host running behind
#: never finds a budget gone that it would still count.
GC_GRACE = timedelta(hours=1)
GC_GRACE_MICROS = GC_GRACE // _MICROSECOND


def check_arguments(key: str, *, limit: int, window: timedelta, now: datetime, cost: int) -> None:
    """Refuse what :meth:`StateStore.take_budget` documents as out of bounds, naming the
    argument: a budget that could never be granted, or one no store could keep."""

    def integer(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not isinstance(key, str) or not key or len(key) > MAX_BUDGET_KEY_LENGTH:
        raise ConfigError(f"budget key: must be 1 to {MAX_BUDGET_KEY_LENGTH} characters")
    if not integer(limit) or not 1 <= limit <= MAX_BUDGET_LIMIT:
        raise ConfigError(f"budget limit: must be an integer from 1 to {MAX_BUDGET_LIMIT}")
    if not isinstance(window, timedelta) or not timedelta(0) < window <= MAX_BUDGET_WINDOW:
        raise ConfigError(f"budget window: must be more than 0 and at most {MAX_BUDGET_WINDOW}")
    if not integer(cost) or not 1 <= cost <= limit:
        raise ConfigError(f"budget cost: must be an integer from 1 to the limit ({limit})")
    if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise ConfigError("budget now: must be a timezone-aware datetime")
    if not _EPOCH <= now <= _LATEST:
        raise ConfigError(f"budget now: {now.isoformat()} is out of range")


def parse_takes(raw: object, key: str) -> list[Take]:
    """A stored list of ``[at, cost]`` pairs, oldest first; anything else is refused rather
    than guessed at (a budget read wrongly could let a refresh token be over-spent)."""
    if not isinstance(raw, list | tuple):
        raise ConfigError(f"budget {key!r}: the stored takes are not a list")
    takes: list[Take] = []
    for item in raw:
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)
            or item[1] < 1
            or not 0 <= item[0] <= _LATEST_MICROS
        ):
            raise ConfigError(f"budget {key!r}: a stored take is malformed")
        takes.append((int(item[0]), int(item[1])))
    takes.sort()
    return takes


def parse_takes_json(text: str, key: str) -> list[Take]:
    """:func:`parse_takes` of a JSON text (how the embedded store keeps them)."""
    try:
        raw = json.loads(text)
    except ValueError:
        raise ConfigError(f"budget {key!r}: the stored takes are not JSON") from None
    return parse_takes(raw, key)


@dataclass(frozen=True)
class TakeResult:
    decision: BudgetDecision
    #: The takes to store, oldest first: those still in the window, plus this one if granted.
    takes: list[Take]
    #: When every stored take has aged out, in microseconds (the record may be deleted then).
    expires_at: int

    @property
    def must_write(self) -> bool:
        """Only a grant changes what the store must keep; a denial spends nothing, so it
        writes nothing (under contention a denial is then a read, not a write)."""
        return self.decision.granted


def take(
    stored: Sequence[Take], *, limit: int, window: timedelta, now: datetime, cost: int
) -> TakeResult:
    """The decision over the takes a store holds for one key, and what it must keep.

    Call :func:`check_arguments` first. A take stamped ``at`` occupies ``[at, at + window)``.
    """
    now_us, window_us = micros(now), window // _MICROSECOND
    live = sorted(t for t in stored if t[0] + window_us > now_us)
    used = sum(c for _, c in live)
    if used + cost <= limit:
        bisect.insort(live, (now_us, cost))
        return TakeResult(BudgetDecision(True, used + cost), live, live[-1][0] + window_us)
    # Denied: the oldest takes age out first; the slot frees once enough of them have. The
    # running total reaches the excess within the live takes, since cost <= limit.
    running = list(accumulate(c for _, c in live))
    oldest_in_the_way = live[bisect.bisect_left(running, used + cost - limit)][0]
    frees_at = from_micros(oldest_in_the_way + window_us)
    return TakeResult(BudgetDecision(False, used, frees_at), live, live[-1][0] + window_us)
