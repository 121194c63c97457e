"""Metrics in the runtime: each tick is counted and written once, the fleet is read at most
once per fleet interval, and a metrics failure never fails the tick it reports on."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from tokenbroker.adapters.memory import MemoryMetricsExporter, MemoryStateStore
from tokenbroker.entrypoints.compose import Runtime, build_runtime, metrics_exporter
from tokenbroker.entrypoints.health import observed_tick
from tokenbroker.entrypoints.settings import Settings
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import StoreUnavailable
from tokenbroker.kernel.log import capture_logs
from tokenbroker.kernel.model import ConnectionRecord
from tokenbroker.refresh.tick import TickSummary


class CountedState(MemoryStateStore):
    def __init__(self) -> None:
        super().__init__()
        self.listed = 0

    def list(self) -> list[ConnectionRecord]:
        self.listed += 1
        return super().list()


def _runtime(**settings: object) -> tuple[Runtime, MemoryMetricsExporter, CountedState]:
    base = build_runtime(Settings(backend="memory", **settings))  # type: ignore[arg-type]
    state = CountedState()
    exporter = MemoryMetricsExporter()
    runtime = replace(base, state=state, clock=FakeClock(datetime(2026, 1, 1, tzinfo=UTC)))
    runtime.exporter = exporter
    return runtime, exporter, state


Series = dict[tuple[str, tuple[str, ...]], object]


def _values(exporter: MemoryMetricsExporter, index: int = -1) -> Series:
    return {(s.metric.name, s.labels): s.value for s in exporter.snapshots[index].samples}


def test_a_tick_is_counted_and_written_with_the_fleet() -> None:
    runtime, exporter, state = _runtime()
    result = asyncio.run(observed_tick(runtime, trigger="test"))
    assert isinstance(result, TickSummary)
    assert len(exporter.snapshots) == 1
    got = _values(exporter)
    assert got[("refresh/ticks", ("ok",))] == 1
    assert got[("refresh/outcomes", ("rotated",))] == 0
    assert got[("fleet/connections", ("active",))] == 0
    assert state.listed == 1


def test_the_fleet_is_read_at_most_once_per_fleet_interval() -> None:
    runtime, exporter, state = _runtime(metrics_fleet_interval_seconds=300)
    clock = runtime.clock
    assert isinstance(clock, FakeClock)
    for _ in range(3):
        asyncio.run(runtime.observe_tick(TickSummary(refreshed=1), ok=True))
        clock.advance(60)
    assert state.listed == 1  # 0, 60 and 120 s: one read
    clock.advance(200)
    asyncio.run(runtime.observe_tick(TickSummary(), ok=True))
    assert state.listed == 2
    assert _values(exporter)[("refresh/outcomes", ("rotated",))] == 3
    every, _, listed = _runtime(metrics_fleet_interval_seconds=0)
    for _ in range(2):
        asyncio.run(every.observe_tick(None, ok=False))
    assert listed.listed == 2


def test_a_refused_write_never_fails_the_tick_and_the_next_write_carries_the_counts() -> None:
    runtime, exporter, _ = _runtime()
    exporter.fail_with = StoreUnavailable("Cloud Monitoring write: UNAVAILABLE")
    with capture_logs("warning") as log:
        result = asyncio.run(observed_tick(runtime, trigger="test"))
    assert isinstance(result, TickSummary)
    assert "metrics not written" in log.getvalue()
    assert exporter.snapshots == []
    exporter.fail_with = None
    asyncio.run(observed_tick(runtime, trigger="test"))
    assert _values(exporter)[("refresh/ticks", ("ok",))] == 2  # cumulative: nothing lost


def test_an_exporter_bug_is_logged_and_contained() -> None:
    runtime, _, _ = _runtime()

    class Broken(MemoryMetricsExporter):
        def write(self, _snapshot: object) -> None:  # type: ignore[override]
            raise ZeroDivisionError

    runtime.exporter = Broken()
    with capture_logs("error") as log:
        result = asyncio.run(observed_tick(runtime, trigger="test"))
    assert isinstance(result, TickSummary)
    assert "ZeroDivisionError" in log.getvalue()


def test_a_fleet_read_that_fails_is_logged_and_the_rest_is_still_written() -> None:
    runtime, exporter, state = _runtime()

    def down() -> list[ConnectionRecord]:
        raise StoreUnavailable("state store unavailable")

    state.list = down  # type: ignore[method-assign]
    with capture_logs("warning") as log:
        asyncio.run(runtime.observe_tick(TickSummary(refreshed=2), ok=True))
    assert "fleet not read for metrics" in log.getvalue()
    got = _values(exporter)
    assert got[("refresh/outcomes", ("rotated",))] == 2
    assert not any(name.startswith("fleet/") for name, _ in got)


def test_metrics_are_off_on_the_embedded_preset_and_on_for_gcp() -> None:
    assert metrics_exporter(Settings(backend="embedded"), "refresher") is None
    assert metrics_exporter(Settings(backend="gcp", gcp_project="p", metrics="off"), "x") is None
    exporter = metrics_exporter(
        Settings(backend="gcp", gcp_project="p", k_revision="issuer-00002-abc",
                 region="europe-west1", metrics_namespace="tb-prod"),
        "issuer",
    )  # fmt: skip
    assert exporter is not None
    resource = exporter.resource  # type: ignore[attr-defined]
    assert resource["project_id"] == "p" and resource["job"] == "issuer"
    assert resource["location"] == "europe-west1" and resource["namespace"] == "tb-prod"
    assert resource["task_id"].startswith("issuer-00002-abc-")
    other = metrics_exporter(Settings(backend="gcp", gcp_project="p"), "issuer")
    assert other.resource["task_id"] != exporter.resource["task_id"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TOKENBROKER_METRICS", "prometheus"),
        ("TOKENBROKER_METRICS_NAMESPACE", "has space"),
        ("TOKENBROKER_REGION", "x" * 101),
        ("TOKENBROKER_METRICS_INTERVAL_SECONDS", "1"),
        ("TOKENBROKER_METRICS_CONNECTION_LIMIT", "100000"),
    ],
)
def test_a_bad_metrics_setting_names_its_variable(variable: str, value: str) -> None:
    from tokenbroker.kernel.errors import ConfigError

    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: value})
