"""The Cloud Monitoring exporter (adapters/gcp/monitoring.py) through the official client
against the Monitoring test server, which applies the API's documented rules: descriptors
once, at most 200 series and one point per series per request, 5 s between points of a series,
cumulative starts kept, refusals as clear errors that lose no count."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from tests.support.monitoring_server import MonitoringTestServer
from tokenbroker.adapters.gcp.monitoring import CloudMonitoringExporter
from tokenbroker.kernel.errors import TokenBrokerError
from tokenbroker.kernel.metrics import CATALOGUE, PREFIX, Recorder

pytestmark = pytest.mark.system

START = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
RESOURCE = {"location": "europe-west1", "namespace": "tb", "job": "issuer", "task_id": "i-1"}


@pytest.fixture(scope="module")
def server() -> Iterator[MonitoringTestServer]:
    with MonitoringTestServer() as running:
        yield running


@pytest.fixture
def exporter(server: MonitoringTestServer) -> Iterator[CloudMonitoringExporter]:
    server.reset()
    made = CloudMonitoringExporter(project="p", resource=RESOURCE, endpoint=server.address)
    yield made
    made.close()


def _points(server: MonitoringTestServer, name: str) -> dict[tuple[str, ...], list[Any]]:
    return {tuple(s.metric_labels.values()): s.points for s in server.series("p", PREFIX + name)}


def test_a_snapshot_becomes_one_point_per_series_under_its_descriptors(
    server: MonitoringTestServer, exporter: CloudMonitoringExporter
) -> None:
    recorder = Recorder(START)
    recorder.count("issuer/decisions", "issued", by=5)
    recorder.count("issuer/decisions", "denied")
    for value in (0.4, 1.0, 3.0, 70.0):
        recorder.observe("issuer/latency", value, "issued")
    recorder.gauge("fleet/outage_budget_seconds", 812.5)
    exporter.write(recorder.snapshot(START + timedelta(minutes=1)))

    decisions = _points(server, "issuer/decisions")
    values = {k: [p.value for p in v] for k, v in decisions.items()}
    assert values == {("issued",): [5], ("denied",): [1]}
    (point,) = decisions[("issued",)]
    assert point.start_time == START and point.end_time == START + timedelta(minutes=1)
    ((latency,),) = _points(server, "issuer/latency").values()
    assert latency.value.count == 4
    # Bounds 1, 2, 5, 10, 20, 50, 100 ms: <1, [1, 2), [2, 5), ..., [50, 100).
    assert list(latency.value.bucket_counts)[:7] == [1, 1, 1, 0, 0, 0, 1]
    ((budget,),) = _points(server, "fleet/outage_budget_seconds").values()
    assert budget.value == 812.5 and budget.start_time == budget.end_time  # a gauge: no start
    (series,) = server.series("p", PREFIX + "fleet/outage_budget_seconds")
    assert series.resource_labels == {"project_id": "p", **RESOURCE}
    # Descriptors for what was written, with the catalogue's kinds, labels and units.
    for name in ("issuer/decisions", "issuer/latency", "fleet/outage_budget_seconds"):
        descriptor = server.descriptor("p", PREFIX + name)
        assert descriptor is not None
        spec = next(m for m in CATALOGUE if m.name == name)
        assert [label.key for label in descriptor.labels] == sorted(spec.label_keys)
        assert descriptor.unit == spec.unit
    assert server.calls["CreateMetricDescriptor"] == 3

    # Later writes: no descriptor again; cumulative counts keep their start and grow.
    recorder.count("issuer/decisions", "issued", by=2)
    exporter.write(recorder.snapshot(START + timedelta(minutes=2)))
    issued = _points(server, "issuer/decisions")[("issued",)]
    assert [p.value for p in issued] == [5, 7] and issued[1].start_time == START
    assert server.calls["CreateMetricDescriptor"] == 3


def test_a_series_written_less_than_5_s_ago_waits_for_the_next_write(
    server: MonitoringTestServer, exporter: CloudMonitoringExporter
) -> None:
    recorder = Recorder(START)
    recorder.count("refresh/ticks", "ok")
    at = START + timedelta(minutes=1)
    exporter.write(recorder.snapshot(at))
    recorder.count("refresh/ticks", "ok")
    exporter.write(recorder.snapshot(at + timedelta(seconds=2)))  # refused by the API if sent
    assert exporter.deferred == 1
    recorder.count("refresh/ticks", "ok")
    exporter.write(recorder.snapshot(at + timedelta(seconds=6)))
    assert [p.value for p in _points(server, "refresh/ticks")[("ok",)]] == [1, 3]


def test_more_than_200_series_go_in_requests_of_200(
    server: MonitoringTestServer, exporter: CloudMonitoringExporter
) -> None:
    recorder = Recorder(START)
    recorder.gauges("connection/seconds_to_expiry", {(f"c{n:03d}",): float(n) for n in range(450)})
    server.reset_calls()
    exporter.write(recorder.snapshot(START + timedelta(minutes=1)))
    assert server.calls["CreateTimeSeries"] == 3
    assert len(_points(server, "connection/seconds_to_expiry")) == 450


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED])
def test_a_refused_write_is_a_clear_error_and_the_next_one_carries_the_counts(
    server: MonitoringTestServer, exporter: CloudMonitoringExporter, code: grpc.StatusCode
) -> None:
    recorder = Recorder(START)
    recorder.count("refresh/outcomes", "rotated", by=4)
    exporter.write(recorder.snapshot(START + timedelta(minutes=1)))
    server.fail_next("CreateTimeSeries", code)
    recorder.count("refresh/outcomes", "rotated", by=3)
    with pytest.raises(TokenBrokerError) as refused:
        exporter.write(recorder.snapshot(START + timedelta(minutes=2)))
    assert "Cloud Monitoring" in str(refused.value)
    assert exporter.failures == 1
    exporter.write(recorder.snapshot(START + timedelta(minutes=3)))
    assert [p.value for p in _points(server, "refresh/outcomes")[("rotated",)]] == [4, 7]


def test_a_descriptor_that_cannot_be_created_fails_the_write_and_is_tried_again(
    server: MonitoringTestServer, exporter: CloudMonitoringExporter
) -> None:
    recorder = Recorder(START)
    recorder.count("refresh/ticks", "failed")
    server.fail_next("CreateMetricDescriptor", grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(TokenBrokerError):
        exporter.write(recorder.snapshot(START + timedelta(minutes=1)))
    exporter.write(recorder.snapshot(START + timedelta(minutes=2)))
    assert server.descriptor("p", PREFIX + "refresh/ticks") is not None
    assert [p.value for p in _points(server, "refresh/ticks")[("failed",)]] == [1]


def test_without_credentials_the_error_is_clear_not_a_traceback() -> None:
    exporter = CloudMonitoringExporter(project="p", resource=RESOURCE)  # the real service

    class NoCredentials:
        def create_metric_descriptor(self, **_: Any) -> None:
            from google.auth.exceptions import DefaultCredentialsError

            raise DefaultCredentialsError("Your default credentials were not found.")

    exporter._client = NoCredentials()
    recorder = Recorder(START)
    recorder.count("refresh/ticks", "ok")
    with pytest.raises(TokenBrokerError, match="Cloud Monitoring"):
        exporter.write(recorder.snapshot(START + timedelta(minutes=1)))
