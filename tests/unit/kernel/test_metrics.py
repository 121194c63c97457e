"""The metrics catalogue and the recorder: what the exporters write is only what was counted."""

from __future__ import annotations

import math
import statistics
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenbroker.kernel.metrics import (
    CATALOGUE,
    LATENCY_BOUNDS_MS,
    PREFIX,
    Distribution,
    Kind,
    Recorder,
    ValueType,
    metric,
    validate,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_every_metric_is_under_the_prefix_with_a_kind_the_api_accepts_for_user_metrics() -> None:
    names = [m.name for m in CATALOGUE]
    assert len(names) == len(set(names))
    for m in CATALOGUE:
        assert m.type == PREFIX + m.name
        assert m.type.startswith("custom.googleapis.com/")
        # DELTA is not offered for user-defined metrics; distributions only as CUMULATIVE here.
        assert m.kind in (Kind.GAUGE, Kind.CUMULATIVE)
        if m.value_type is ValueType.DISTRIBUTION:
            assert m.kind is Kind.CUMULATIVE
        assert len(m.labels) <= 10  # the API's limit on labels per metric descriptor
        for label in m.labels:
            assert label.key.isidentifier() and label.key.islower()
            assert label.key not in {"caller", "email", "user"}  # callers are never labels


@given(st.lists(st.floats(min_value=0, max_value=100_000, allow_nan=False), min_size=1))
def test_a_distribution_carries_the_count_mean_and_squared_deviation_of_its_values(
    values: list[float],
) -> None:
    d = Distribution()
    for v in values:
        d.add(v)
    assert d.count == len(values) == sum(d.counts)
    assert math.isclose(d.mean, statistics.fmean(values), rel_tol=1e-9, abs_tol=1e-6)
    expected = sum((v - statistics.fmean(values)) ** 2 for v in values)
    assert math.isclose(d.sum_of_squared_deviation, expected, rel_tol=1e-6, abs_tol=1e-3)
    assert len(d.counts) == len(LATENCY_BOUNDS_MS) + 1


def test_a_value_on_a_bound_counts_in_the_bucket_above_it_as_the_api_defines_buckets() -> None:
    """Explicit buckets: bucket i holds [bounds[i-1], bounds[i]); 0 is the underflow."""
    d = Distribution(bounds=(1.0, 10.0))
    for v in (0.5, 1.0, 9.99, 10.0, 1e9):
        d.add(v)
    assert d.counts == [1, 2, 2]


@pytest.mark.parametrize("value", [-1.0, math.inf, math.nan])
def test_a_value_that_is_no_latency_is_left_out(value: float) -> None:
    d = Distribution()
    d.add(value)
    assert d.count == 0 and sum(d.counts) == 0


def test_the_recorder_counts_observes_and_replaces_gauges() -> None:
    r = Recorder(T0)
    r.count("issuer/decisions", "issued")
    r.count("issuer/decisions", "issued", by=2)
    r.count("issuer/decisions", "denied")
    r.observe("issuer/latency", 3.0, "issued")
    r.gauges("fleet/connections", {("active",): 4, ("needs_reauth",): 1})
    r.gauges("fleet/connections", {("active",): 5})  # the state now: needs_reauth is gone
    r.gauge("fleet/outage_budget_seconds", 120.5)
    snap = r.snapshot(T0 + timedelta(seconds=1))
    got = {(s.metric.name, s.labels): s.value for s in snap.samples}
    assert got[("issuer/decisions", ("issued",))] == 3
    assert got[("issuer/decisions", ("denied",))] == 1
    assert got[("fleet/connections", ("active",))] == 5
    assert ("fleet/connections", ("needs_reauth",)) not in got
    assert got[("fleet/outage_budget_seconds", ())] == 120.5
    latency = got[("issuer/latency", ("issued",))]
    assert isinstance(latency, Distribution) and latency.count == 1
    assert snap.start == T0 and snap.at == T0 + timedelta(seconds=1)
    assert validate(snap.samples) == []


def test_a_snapshot_is_a_copy_later_counts_do_not_change_it() -> None:
    r = Recorder(T0)
    r.observe("issuer/latency", 1.0, "issued")
    r.count("refresh/ticks", "ok")
    first = r.snapshot(T0)
    r.observe("issuer/latency", 2.0, "issued")
    r.count("refresh/ticks", "ok")
    values = {s.metric.name: s.value for s in first.samples}
    assert values["refresh/ticks"] == 1
    assert isinstance(values["issuer/latency"], Distribution)
    assert values["issuer/latency"].count == 1


def test_a_gauge_set_to_none_is_no_longer_written() -> None:
    r = Recorder(T0)
    r.gauge("fleet/min_seconds_to_expiry", 10.0)
    r.gauge("fleet/min_seconds_to_expiry", None)
    assert [s for s in r.snapshot(T0).samples if s.metric.name.startswith("fleet/")] == []


def test_names_outside_the_catalogue_and_labels_outside_their_values_are_refused() -> None:
    with pytest.raises(KeyError):
        metric("no/such")
    r = Recorder(T0)
    with pytest.raises(KeyError):
        r.gauges("no/such", {})
    r.count("issuer/decisions", "made-up")
    r.count("refresh/ticks")  # missing its label
    problems = validate(r.snapshot(T0).samples)
    assert any("made-up" in p for p in problems)
    assert any("refresh/ticks" in p for p in problems)
