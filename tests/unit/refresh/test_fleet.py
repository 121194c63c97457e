"""The fleet at a glance (refresh/fleet.py): the figures the dashboard and `tokenbroker status`
share, and what the per-connection gauges report."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from tokenbroker.kernel.metrics import CONNECTION_STATUSES, Recorder, validate
from tokenbroker.kernel.model import (
    Connection,
    ConnectionRecord,
    ConnectionStatus,
    GrantType,
    RefreshState,
)
from tokenbroker.refresh.fleet import fleet_health, record_fleet, record_tick
from tokenbroker.refresh.tick import TickSummary

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


def record(cid: str, *, left: float | None, status: ConnectionStatus = ConnectionStatus.ACTIVE,
           failures: int = 0, at_risk: bool = False) -> ConnectionRecord:  # fmt: skip
    connection = Connection(id=cid, profile="generic", grant=GrantType.REFRESH_TOKEN,
                            client_id="c", token_url="https://p.example/token")  # fmt: skip
    state = RefreshState(
        status=status,
        expires_at=None if left is None else NOW + timedelta(seconds=left),
        consecutive_failures=failures,
        at_risk=at_risk,
        last_error="invalid_grant" if failures else None,
    )
    return ConnectionRecord(connection, state)


def test_the_outage_budget_is_the_earliest_expiry_consumers_can_hold() -> None:
    fleet = fleet_health(
        [
            record("soon-disabled", left=5, status=ConnectionStatus.DISABLED),  # not served
            record("expired", left=-30),  # nothing left to hold
            record("no-expiry", left=None),  # never expires (a static grant)
            record("reauth", left=400, status=ConnectionStatus.NEEDS_REAUTH),  # still served
            record("healthy", left=900),
        ],
        NOW,
    )
    assert fleet.outage_budget_seconds == 400
    # Over active connections only, and an expired one shows as negative: it has failed.
    assert fleet.min_seconds_to_expiry == -30
    assert fleet.by_status == {"active": 3, "at_risk": 0, "needs_reauth": 1, "disabled": 1}


def test_no_budget_when_nothing_consumers_hold_expires() -> None:
    fleet = fleet_health([record("static", left=None)], NOW)
    assert fleet.outage_budget_seconds is None and fleet.min_seconds_to_expiry is None
    assert fleet_health([], NOW).outage_budget_seconds is None


def test_failing_connections_come_first_then_at_risk_then_the_nearest_expiry() -> None:
    fleet = fleet_health(
        [
            record("fine-later", left=3000),
            record("fine-soon", left=100),
            record("risky", left=2000, at_risk=True),
            record("failing-once", left=5000, failures=1),
            record("failing-often", left=5000, failures=4),
        ],
        NOW,
    )
    assert [c.connection_id for c in fleet.ranked] == [
        "failing-often", "failing-once", "risky", "fine-soon", "fine-later",
    ]  # fmt: skip
    assert fleet.by_status["at_risk"] == 1 and fleet.by_status["active"] == 4
    assert [c.connection_id for c in fleet.failing] == ["failing-often", "failing-once"]


def test_the_per_connection_gauges_report_at_most_the_limit_the_ones_worth_a_look() -> None:
    records = [record(f"c{n:03d}", left=1000 + n) for n in range(50)]
    records.append(record("broken", left=9000, failures=3))
    records.append(record("off", left=1, status=ConnectionStatus.DISABLED, failures=9))
    recorder = Recorder(NOW)
    record_fleet(recorder, fleet_health(records, NOW), limit=5)
    samples = recorder.snapshot(NOW).samples
    failures = {s.labels[0]: s.value for s in samples
                if s.metric.name == "connection/consecutive_failures"}  # fmt: skip
    expiry = {s.labels[0]: s.value for s in samples
              if s.metric.name == "connection/seconds_to_expiry"}  # fmt: skip
    assert list(failures) == ["broken", "c000", "c001", "c002", "c003"]  # no disabled one
    assert failures["broken"] == 3 and expiry["c000"] == 1000
    fleet = {s.metric.name: s.value for s in samples if not s.metric.labels}
    assert fleet == {"fleet/min_seconds_to_expiry": 1000, "fleet/outage_budget_seconds": 1000}
    statuses = {s.labels[0]: s.value for s in samples if s.metric.name == "fleet/connections"}
    assert statuses == {"active": 51, "at_risk": 0, "needs_reauth": 0, "disabled": 1}
    assert validate(samples) == []


def test_a_tick_counts_every_outcome_even_at_zero_and_a_failed_one_counts_as_failed() -> None:
    recorder = Recorder(NOW)
    summary = TickSummary(refreshed=3, skipped_leased=2, unknown_outcome=1)
    summary.failed["permanent"] += 1
    record_tick(recorder, summary, ok=False)
    record_tick(recorder, None, ok=False)  # a tick that raised before its summary
    record_tick(recorder, TickSummary(refreshed=1), ok=True)
    got = {(s.metric.name, s.labels): s.value for s in recorder.snapshot(NOW).samples}
    assert got[("refresh/ticks", ("failed",))] == 2
    assert got[("refresh/ticks", ("ok",))] == 1
    assert got[("refresh/outcomes", ("rotated",))] == 4
    assert got[("refresh/outcomes", ("permanent",))] == 1
    assert got[("refresh/outcomes", ("skipped_leased",))] == 2
    assert got[("refresh/outcomes", ("unknown_outcome",))] == 1
    assert got[("refresh/outcomes", ("internal",))] == 0  # present: alerts compare zeros
    assert validate(recorder.snapshot(NOW).samples) == []


statuses = st.sampled_from(list(ConnectionStatus))
fleets = st.lists(
    st.tuples(statuses, st.one_of(st.none(), st.floats(-1e6, 1e6)), st.integers(0, 20),
              st.booleans()),
    max_size=30,
)  # fmt: skip


@given(fleets)
def test_every_connection_is_counted_once_and_the_budget_never_exceeds_a_served_expiry(
    specs: list[tuple[ConnectionStatus, float | None, int, bool]],
) -> None:
    records = [record(f"c{n}", left=left, status=status, failures=failures, at_risk=risk)
               for n, (status, left, failures, risk) in enumerate(specs)]  # fmt: skip
    fleet = fleet_health(records, NOW)
    assert sum(fleet.by_status.values()) == len(records)
    assert set(fleet.by_status) == set(CONNECTION_STATUSES)
    assert sorted(c.connection_id for c in fleet.ranked) == sorted(r.connection.id
                                                                   for r in records)  # fmt: skip
    served = [r for r in records if r.state.status is not ConnectionStatus.DISABLED
              and r.state.expires_at is not None and r.state.expires_at > NOW]  # fmt: skip
    if fleet.outage_budget_seconds is None:
        assert not served
    else:
        assert fleet.outage_budget_seconds > 0
        for r in served:
            assert r.state.expires_at is not None
            assert fleet.outage_budget_seconds <= (r.state.expires_at - NOW).total_seconds()
    failing = [c.consecutive_failures for c in fleet.ranked]
    assert failing == sorted(failing, reverse=True)
    # Nothing counted twice when a record is updated in place (a new state, same id).
    assert fleet_health([replace(r) for r in records], NOW).by_status == fleet.by_status
