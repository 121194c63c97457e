"""The fleet at a glance: what an on-call engineer needs first, from the connection records.

Values in, values out (records and ``now``): the same figures feed the refresher's metrics
(``fleet/*`` and ``connection/*`` in :mod:`tokenbroker.kernel.metrics`) and ``tokenbroker
status``, so the terminal and the dashboard never disagree.

* **Outage budget**: how long consumers keep working if the broker stopped now -- the earliest
  expiry among the access tokens consumers can hold: connections still served (active, at
  risk, or needing re-authorisation whose last token has not expired yet; not disabled ones,
  which are refused) with an expiry in the future. ``None`` when no consumer holds anything
  that expires (no such connection). A caller whose policy caps its tokens' lifetime
  (``max_lifetime_seconds``) holds tokens that may expire sooner: its budget is at most that
  cap.
* **Least seconds to expiry** over active connections: negative when one has already expired
  (a refresher that fell behind, or one that failed for too long).
* **Connections worth a look first** (:attr:`FleetHealth.ranked`): failing ones (most
  consecutive failures first), then at risk, then the nearest expiry -- the order of the CLI's
  table and the connections the per-connection gauges report when there are more than the
  metrics' connection limit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tokenbroker.kernel.metrics import CONNECTION_STATUSES, Recorder
from tokenbroker.kernel.model import ConnectionRecord, ConnectionStatus

if TYPE_CHECKING:
    from tokenbroker.refresh.tick import TickSummary

__all__ = [
    "ConnectionHealth",
    "FleetHealth",
    "fleet_health",
    "record_fleet",
    "record_tick",
    "worth_reporting",
]


@dataclass(frozen=True)
class ConnectionHealth:
    connection_id: str
    #: ``fleet/connections``' status: the connection's, or ``at_risk`` for an active one whose
    #: last outcome is unknown.
    status: str
    seconds_to_expiry: float | None
    consecutive_failures: int
    last_error: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "connection": self.connection_id,
            "status": self.status,
            "seconds_to_expiry": _rounded(self.seconds_to_expiry),
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
        }


@dataclass(frozen=True)
class FleetHealth:
    at: datetime
    by_status: dict[str, int]
    outage_budget_seconds: float | None
    min_seconds_to_expiry: float | None
    #: Every connection, the ones worth a look first (see the module docstring).
    ranked: tuple[ConnectionHealth, ...]

    @property
    def failing(self) -> tuple[ConnectionHealth, ...]:
        return tuple(c for c in self.ranked if c.consecutive_failures > 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat().replace("+00:00", "Z"),
            "connections": dict(self.by_status),
            "outage_budget_seconds": _rounded(self.outage_budget_seconds),
            "min_seconds_to_expiry": _rounded(self.min_seconds_to_expiry),
            "failing": len(self.failing),
            "ranked": [c.to_json() for c in self.ranked],
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _status(record: ConnectionRecord) -> str:
    state = record.state
    if state.status is ConnectionStatus.ACTIVE and state.at_risk:
        return "at_risk"
    return state.status.value


def _rank(c: ConnectionHealth) -> tuple[int, int, float, str]:
    expiry = c.seconds_to_expiry if c.seconds_to_expiry is not None else float("inf")
    return (-c.consecutive_failures, 0 if c.status == "at_risk" else 1, expiry, c.connection_id)


def fleet_health(records: Iterable[ConnectionRecord], now: datetime) -> FleetHealth:
    connections: list[ConnectionHealth] = []
    for record in records:
        state = record.state
        left = None if state.expires_at is None else (state.expires_at - now).total_seconds()
        connections.append(
            ConnectionHealth(
                record.connection.id,
                _status(record),
                left,
                state.consecutive_failures,
                state.last_error,
            )
        )
    counts = Counter(c.status for c in connections)
    served = [
        c.seconds_to_expiry
        for c in connections
        if c.status != ConnectionStatus.DISABLED.value
        and c.seconds_to_expiry is not None
        and c.seconds_to_expiry > 0
    ]
    active = [
        c.seconds_to_expiry
        for c in connections
        if c.status in {"active", "at_risk"} and c.seconds_to_expiry is not None
    ]
    return FleetHealth(
        at=now,
        by_status={status: counts.get(status, 0) for status in CONNECTION_STATUSES},
        outage_budget_seconds=min(served, default=None),
        min_seconds_to_expiry=min(active, default=None),
        ranked=tuple(sorted(connections, key=_rank)),
    )


def worth_reporting(fleet: FleetHealth, limit: int) -> Sequence[ConnectionHealth]:
    """The connections the per-connection gauges report: the first ``limit`` ranked ones,
    without disabled connections (nobody is served by them)."""
    shown = [c for c in fleet.ranked if c.status != ConnectionStatus.DISABLED.value]
    return shown[:limit]


def record_tick(recorder: Recorder, summary: TickSummary | None, *, ok: bool) -> None:
    """Count one tick (``refresh/ticks``), whether the store's request quota held it back
    (``refresh/quota_limited_ticks``) and its outcomes (``refresh/outcomes``); ``summary`` is
    ``None`` for a tick that raised before it had one."""
    recorder.count("refresh/ticks", "ok" if ok else "failed")
    # The quota alert's series (terraform monitoring.tf): one per tick the store's request
    # quota held refreshes back in -- the claim capped at one window's worth, or claims given
    # back -- and a zero for every other tick, so the series exists from the first one.
    limited = summary is not None and (summary.quota_limited or summary.quota_deferred > 0)
    recorder.count("refresh/quota_limited_ticks", by=1 if limited else 0)
    if summary is None:
        return
    outcomes = {
        "rotated": summary.refreshed,
        "transient": summary.failed["transient"],
        "permanent": summary.failed["permanent"],
        "internal": summary.failed["internal"],
        "deferred": summary.deferred,
        "skipped_leased": summary.skipped_leased,
        "unknown_outcome": summary.unknown_outcome,
        "quota_deferred": summary.quota_deferred,
    }
    for outcome, count in outcomes.items():
        # Every outcome's series exists from the first tick (a zero is a value an alert can
        # compare; an absent series is not).
        recorder.count("refresh/outcomes", outcome, by=count)


def record_fleet(recorder: Recorder, fleet: FleetHealth, *, limit: int) -> None:
    """The fleet gauges, and the per-connection ones for at most ``limit`` connections (the
    ones worth a look first)."""
    recorder.gauges("fleet/connections", {(s,): n for s, n in fleet.by_status.items()})
    recorder.gauge("fleet/min_seconds_to_expiry", fleet.min_seconds_to_expiry)
    recorder.gauge("fleet/outage_budget_seconds", fleet.outage_budget_seconds)
    shown = worth_reporting(fleet, limit)
    recorder.gauges(
        "connection/consecutive_failures", {(c.connection_id,): c.consecutive_failures
                                            for c in shown}
    )  # fmt: skip
    recorder.gauges(
        "connection/seconds_to_expiry",
        {(c.connection_id,): c.seconds_to_expiry for c in shown
         if c.seconds_to_expiry is not None},
    )  # fmt: skip
