"""The local Cloud Monitoring (tests/support/monitoring_server.py) through the official client.

Every test talks gRPC to a real server with ``google.cloud.monitoring_v3`` only (the server's
memory is read back with its ``series()`` helper); each one proves a documented rule, cited in the
server module next to the code that implements it. Points are written a minute or more in the
past, spaced by the documented sampling period, so no test sleeps.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

# googleapis-common-protos ships .pyi stubs but no py.typed marker.
from google.api import metric_pb2  # type: ignore[import-untyped]
from google.api_core import exceptions
from google.cloud import monitoring_v3
from google.cloud.monitoring_v3.types import metric_service

from tests.support.monitoring_server import (
    MAX_TIME_SERIES_PER_REQUEST,
    MonitoringTestServer,
    client_over,
    make_channel,
)
from tests.system.processes import standalone_server

pytestmark = pytest.mark.system

PROJECT = "projects/test-project"
GLOBAL: dict[str, Any] = {"type": "global", "labels": {"project_id": "test-project"}}
TASK_LABELS = {
    "project_id": "test-project",
    "location": "us-central1",
    "namespace": "tokenbroker",
    "job": "refresher",
    "task_id": "instance-1",
}
FULL = monitoring_v3.ListTimeSeriesRequest.TimeSeriesView.FULL
HEADERS = monitoring_v3.ListTimeSeriesRequest.TimeSeriesView.HEADERS
KINDS: Any = metric_pb2.MetricDescriptor
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]


@pytest.fixture(scope="module")
def server() -> Iterator[MonitoringTestServer]:
    with MonitoringTestServer() as running:
        yield running


@pytest.fixture(scope="module")
def client(server: MonitoringTestServer) -> monitoring_v3.MetricServiceClient:
    return server.client()


@pytest.fixture
def metric() -> str:
    """A metric type of its own for each test."""
    return f"custom.googleapis.com/test/{uuid.uuid4().hex[:12]}"


def ago(seconds: float) -> dict[str, int]:
    """A timestamp ``seconds`` before now (negative: after), as the client takes it."""
    at = time.time() - seconds
    return {"seconds": int(at), "nanos": int((at % 1) * 1e9)}


def series(
    metric_type: str,
    end: dict[str, int],
    value: dict[str, Any] | None = None,
    *,
    start: dict[str, int] | None = None,
    labels: dict[str, str] | None = None,
    resource: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    interval: dict[str, Any] = {"end_time": end}
    if start is not None:
        interval["start_time"] = start
    return {
        "metric": {"type": metric_type, "labels": labels or {}},
        "resource": resource or GLOBAL,
        "points": [{"interval": interval, "value": {"int64_value": 1} if value is None else value}],
        **fields,
    }


def write(client: Any, *time_series: dict[str, Any]) -> None:
    client.create_time_series(request={"name": PROJECT, "time_series": list(time_series)})


def refused(client: Any, *time_series: dict[str, Any]) -> tuple[str, Any]:
    """Write, expect the partial-failure answer; its message and CreateTimeSeriesSummary."""
    with pytest.raises(exceptions.InvalidArgument) as caught:
        write(client, *time_series)
    summaries = [detail for detail in caught.value.details if detail.Is(SUMMARY.DESCRIPTOR)]
    assert len(summaries) == 1, caught.value.details
    summary = SUMMARY()
    summaries[0].Unpack(summary)
    return caught.value.message, summary


SUMMARY: Any = metric_service.CreateTimeSeriesSummary.pb()


def stored_values(server: MonitoringTestServer, metric_type: str) -> list[Any]:
    return [point.value for s in server.series(PROJECT, metric_type) for point in s.points]


def descriptor(client: Any, metric_type: str, **fields: Any) -> Any:
    return client.create_metric_descriptor(
        request={
            "name": PROJECT,
            "metric_descriptor": {
                "type": metric_type,
                "metric_kind": "GAUGE",
                "value_type": "INT64",
                **fields,
            },
        }
    )


def listed(client: Any, metric_type: str, extra: str = "", **request: Any) -> list[Any]:
    query = f'metric.type = "{metric_type}"' + (f" AND {extra}" if extra else "")
    interval = request.pop("interval", {"start_time": ago(3 * 3600), "end_time": ago(-60)})
    pager = client.list_time_series(
        request={"name": PROJECT, "filter": query, "interval": interval, "view": FULL, **request}
    )
    return list(pager)


# -- metric descriptors ----------------------------------------------------------------------------


def test_descriptor_create_get_list_delete(client: Any, metric: str) -> None:
    created = descriptor(
        client, metric, labels=[{"key": "outcome"}, {"key": "grant"}], unit="1", description="d"
    )
    assert created.name == f"{PROJECT}/metricDescriptors/{metric}"
    assert [label.key for label in created.labels] == ["grant", "outcome"]  # sorted, as the API
    assert "global" in created.monitored_resource_types
    assert client.get_metric_descriptor(name=created.name) == created

    def types(query: str) -> list[str]:
        pager = client.list_metric_descriptors(request={"name": PROJECT, "filter": query})
        return [d.type for d in pager]

    assert metric in types('metric.type = starts_with("custom.googleapis.com/test/")')
    assert types(f'metric.type = "{metric}"') == [metric]
    assert metric not in types('metric.type = starts_with("external.googleapis.com/")')
    assert metric not in types(f'NOT metric.type = "{metric}"')
    with pytest.raises(exceptions.InvalidArgument):
        types('resource.type = "global"')  # descriptors are filtered by metric type only

    client.delete_metric_descriptor(name=created.name)
    with pytest.raises(exceptions.NotFound, match="Could not find descriptor for metric"):
        client.get_metric_descriptor(name=created.name)
    with pytest.raises(exceptions.NotFound):
        client.delete_metric_descriptor(name=created.name)


def test_descriptor_create_is_idempotent_and_never_removes_labels(client: Any, metric: str) -> None:
    first = descriptor(client, metric, labels=[{"key": "a"}, {"key": "b"}], description="one")
    assert (
        descriptor(client, metric, labels=[{"key": "a"}, {"key": "b"}], description="one") == first
    )
    updated = descriptor(client, metric, labels=[{"key": "c"}], description="two", unit="ms")
    assert [label.key for label in updated.labels] == ["a", "b", "c"]
    assert (updated.description, updated.unit) == ("two", "ms")
    assert client.get_metric_descriptor(name=first.name) == updated


@pytest.mark.parametrize(
    "change",
    [
        {"metric_kind": "CUMULATIVE"},
        {"value_type": "DOUBLE"},
        {"labels": [{"key": "a", "value_type": "INT64"}]},
    ],
)
def test_descriptor_of_another_kind_already_exists(
    client: Any, metric: str, change: dict[str, Any]
) -> None:
    original = descriptor(client, metric, labels=[{"key": "a"}])
    with pytest.raises(exceptions.AlreadyExists, match="The metric already exists"):
        descriptor(client, metric, **{"labels": [{"key": "a"}], **change})
    assert client.get_metric_descriptor(name=original.name) == original


@pytest.mark.parametrize(
    "fields",
    [
        {"metric_kind": "DELTA"},
        {"metric_kind": "METRIC_KIND_UNSPECIFIED"},
        {"value_type": "STRING"},
        {"value_type": "BOOL", "metric_kind": "CUMULATIVE"},
        {"labels": [{"key": "http.scheme"}]},
        {"labels": [{"key": "a"}, {"key": "a"}]},
        {"type": "compute.googleapis.com/instance/cpu/usage_time"},
        {"type": "custom.googleapis.com/has:colons"},
        {"type": ""},
    ],
)
def test_descriptor_validation(client: Any, metric: str, fields: dict[str, Any]) -> None:
    with pytest.raises(exceptions.InvalidArgument):
        descriptor(client, metric, **fields)


def test_descriptor_valid_combinations(client: Any, metric: str) -> None:
    for kind, value_type in [
        ("GAUGE", "BOOL"),
        ("GAUGE", "DOUBLE"),
        ("GAUGE", "DISTRIBUTION"),
        ("CUMULATIVE", "INT64"),
        ("CUMULATIVE", "DOUBLE"),
        ("CUMULATIVE", "DISTRIBUTION"),
    ]:
        metric_type = f"{metric}/{kind}/{value_type}".lower()
        created = descriptor(client, metric_type, metric_kind=kind, value_type=value_type)
        assert created.type == metric_type


def test_descriptors_are_per_project(client: Any, metric: str) -> None:
    created = descriptor(client, metric)
    other = f"projects/other-{uuid.uuid4().hex[:8]}"
    with pytest.raises(exceptions.NotFound):
        client.get_metric_descriptor(name=f"{other}/metricDescriptors/{metric}")
    assert list(client.list_metric_descriptors(request={"name": other})) == []
    assert client.get_metric_descriptor(name=created.name).type == metric


def test_list_descriptors_pages(client: Any, metric: str) -> None:
    for suffix in ("a", "b", "c"):
        descriptor(client, f"{metric}/{suffix}")
    query = f'metric.type = starts_with("{metric}/")'
    first = client.list_metric_descriptors(
        request={"name": PROJECT, "filter": query, "page_size": 2}
    )
    page = next(iter(first.pages))
    assert len(page.metric_descriptors) == 2 and page.next_page_token
    assert [d.type for d in first] == [f"{metric}/{s}" for s in "abc"]
    with pytest.raises(exceptions.InvalidArgument):
        list(
            client.list_metric_descriptors(
                request={"name": PROJECT, "filter": "", "page_token": page.next_page_token}
            )
        )


def test_list_descriptors_active_only(client: Any, metric: str) -> None:
    descriptor(client, f"{metric}/idle")
    descriptor(client, f"{metric}/busy")
    write(client, series(f"{metric}/busy", ago(60)))

    def types(**request: Any) -> list[str]:
        query = f'metric.type = starts_with("{metric}/")'
        pager = client.list_metric_descriptors(
            request={"name": PROJECT, "filter": query, **request}
        )
        return [d.type for d in pager]

    assert types() == [f"{metric}/busy", f"{metric}/idle"]
    assert types(active_only=True) == [f"{metric}/busy"]


def test_time_series_fill_an_empty_unit_only(client: Any, metric: str) -> None:
    created = descriptor(client, metric)
    assert created.unit == ""
    write(client, series(metric, ago(60), unit="By", description="written"))
    filled = client.get_metric_descriptor(name=created.name)
    assert (filled.unit, filled.description) == ("By", "written")
    write(client, series(metric, ago(30), unit="ms", description="again"))
    assert client.get_metric_descriptor(name=created.name) == filled


def test_deleting_a_descriptor_drops_its_data(
    server: MonitoringTestServer, client: Any, metric: str
) -> None:
    created = descriptor(client, metric)
    write(client, series(metric, ago(60)))
    assert len(server.series(PROJECT, metric)) == 1
    client.delete_metric_descriptor(name=created.name)
    assert server.series(PROJECT, metric) == []
    assert listed(client, metric) == []


# -- CreateTimeSeries: writing and reading back ----------------------------------------------------


def test_write_and_list_round_trip(server: MonitoringTestServer, client: Any, metric: str) -> None:
    descriptor(client, metric, labels=[{"key": "outcome"}], unit="1")
    for seconds, value in ((90, 1), (60, 2), (30, 3)):
        write(
            client, series(metric, ago(seconds), {"int64_value": value}, labels={"outcome": "ok"})
        )
    write(
        client,
        series(metric, ago(30), {"int64_value": 7}, labels={"outcome": "failed"}),
        series(
            metric,
            ago(30),
            {"int64_value": 9},
            resource={"type": "generic_task", "labels": TASK_LABELS},
        ),
    )

    found = listed(client, metric, 'metric.labels.outcome = "ok"')
    assert len(found) == 1
    (only,) = found
    assert dict(only.metric.labels) == {"outcome": "ok"}
    assert only.resource.type == "global"
    assert (only.metric_kind, only.value_type) == (KINDS.GAUGE, KINDS.INT64)
    assert only.unit == "1"
    assert [p.value.int64_value for p in only.points] == [3, 2, 1]  # newest first
    ends = [p.interval.end_time for p in only.points]
    assert ends == sorted(ends, reverse=True)

    assert len(listed(client, metric)) == 3
    assert [s.resource.type for s in listed(client, metric, 'resource.type = "generic_task"')] == [
        "generic_task"
    ]
    assert (
        listed(client, metric, 'resource.labels.job = "refresher"')[0].points[0].value.int64_value
        == 9
    )
    # Only points in (start, end] are returned; series without any are left out.
    recent = listed(
        client,
        metric,
        'metric.labels.outcome = "ok"',
        interval={"start_time": ago(75), "end_time": ago(0)},
    )
    assert [p.value.int64_value for p in recent[0].points] == [3, 2]
    assert listed(client, metric, interval={"start_time": ago(3600), "end_time": ago(1800)}) == []
    headers = listed(client, metric, view=HEADERS)
    assert len(headers) == 3 and all(not s.points for s in headers)

    # The server's memory holds exactly what was written, oldest first.
    stored, failed = server.series(PROJECT, metric, resource_type="global")
    assert (stored.metric_labels, failed.metric_labels) == (
        {"outcome": "ok"},
        {"outcome": "failed"},
    )
    assert stored.resource_labels == {"project_id": "test-project"}
    assert [p.value for p in stored.points] == [1, 2, 3]
    assert all(p.start_time == p.end_time for p in stored.points)  # a gauge's start is its end
    assert stored.points[0].end_time.tzinfo is UTC


def test_list_time_series_needs_one_metric_type_and_an_end_time(client: Any, metric: str) -> None:
    interval = {"start_time": ago(60), "end_time": ago(0)}
    for query in (
        'metric.type = starts_with("custom.googleapis.com/")',
        'resource.type = "global"',
        "",
    ):
        with pytest.raises(exceptions.InvalidArgument, match="single metric type"):
            client.list_time_series(
                request={"name": PROJECT, "filter": query, "interval": interval, "view": FULL}
            )
    with pytest.raises(exceptions.InvalidArgument, match="startTime must not be later"):
        client.list_time_series(
            request={
                "name": PROJECT,
                "filter": f'metric.type = "{metric}"',
                "interval": {"start_time": ago(0), "end_time": ago(60)},
                "view": FULL,
            }
        )
    with pytest.raises(exceptions.InvalidArgument, match="endTime"):
        client.list_time_series(
            request={"name": PROJECT, "filter": f'metric.type = "{metric}"', "view": FULL}
        )
    with pytest.raises(exceptions.InvalidArgument):
        client.list_time_series(
            request={
                "name": PROJECT,
                "filter": f'metric.type = "{metric}" OR metric.type = "x"',
                "interval": interval,
                "view": FULL,
            }
        )


def test_series_are_per_project(server: MonitoringTestServer, client: Any, metric: str) -> None:
    write(client, series(metric, ago(60)))
    other = f"projects/other-{uuid.uuid4().hex[:8]}"
    pager = client.list_time_series(
        request={
            "name": other,
            "filter": f'metric.type = "{metric}"',
            "interval": {"start_time": ago(3600), "end_time": ago(0)},
            "view": FULL,
        }
    )
    assert list(pager) == []
    assert server.series(other, metric) == []
    with pytest.raises(exceptions.NotFound):
        client.get_metric_descriptor(name=f"{other}/metricDescriptors/{metric}")
    assert len(server.series(PROJECT, metric)) == 1


# -- CreateTimeSeries: the request -----------------------------------------------------------------


def test_at_most_200_series_per_request(
    server: MonitoringTestServer, client: Any, metric: str
) -> None:
    def batch(count: int) -> list[dict[str, Any]]:
        return [series(metric, ago(60), labels={"n": str(i)}) for i in range(count)]

    with pytest.raises(exceptions.InvalidArgument, match="A maximum of 200 TimeSeries") as caught:
        write(client, *batch(MAX_TIME_SERIES_PER_REQUEST + 1))
    assert not caught.value.details  # a request-level fault: nothing written, no summary
    assert server.series(PROJECT, metric) == []
    with pytest.raises(exceptions.NotFound):
        client.get_metric_descriptor(name=f"{PROJECT}/metricDescriptors/{metric}")

    write(client, *batch(MAX_TIME_SERIES_PER_REQUEST))
    assert len(server.series(PROJECT, metric)) == 200


def test_a_request_needs_series(client: Any) -> None:
    with pytest.raises(exceptions.InvalidArgument, match="missing field timeSeries"):
        write(client)


def test_exactly_one_point_per_series(
    server: MonitoringTestServer, client: Any, metric: str
) -> None:
    two = series(metric, ago(60), {"int64_value": 2})
    two["points"] = two["points"] * 2
    none = series(metric, ago(60), resource={"type": "generic_task", "labels": TASK_LABELS})
    none["points"] = []
    message, summary = refused(client, two, none)
    assert (
        "Field timeSeries[0].points had an invalid value: Only one point can be written" in message
    )
    assert "Field timeSeries[1].points had an invalid value" in message
    assert server.series(PROJECT, metric) == []

    # The summary counts points: the refused series' two, and the one written beside them.
    _, summary = refused(client, two, series(metric, ago(60), {"int64_value": 1}))
    assert (summary.total_point_count, summary.success_point_count) == (3, 1)
    assert [(e.status.code, e.point_count) for e in summary.errors] == [(INVALID, 2)]
    assert stored_values(server, metric) == [1]


def test_a_series_only_once_per_request(
    server: MonitoringTestServer, client: Any, metric: str
) -> None:
    message, summary = refused(
        client,
        series(metric, ago(60), {"int64_value": 1}),
        series(metric, ago(30), {"int64_value": 2}),
        series(
            metric,
            ago(60),
            {"int64_value": 3},
            resource={"type": "generic_task", "labels": TASK_LABELS},
        ),
    )
    assert message == (
        "One or more TimeSeries could not be written: timeSeries[1]: Field timeSeries[1] had an "
        "invalid value: Duplicate TimeSeries encountered. Only one point can be written per "
        "TimeSeries per request."
    )
    assert (summary.total_point_count, summary.success_point_count) == (3, 2)
    assert [(e.status.code, e.point_count) for e in summary.errors] == [(INVALID, 1)]
    assert sorted(stored_values(server, metric)) == [1, 3]  # the first occurrence is written


# -- CreateTimeSeries: the order and spacing of points ---------------------------------------------


def test_points_are_written_in_order(
    server: MonitoringTestServer, client: Any, metric: str
) -> None:
    end = ago(60)
    write(client, series(metric, end, {"int64_value": 1}))
    for earlier in (end, ago(70)):
        message, _ = refused(client, series(metric, earlier, {"int64_value": 2}))
        assert message.endswith(
            "Points must be written in order. One or more of the points specified had an older "
            "end time than the most recent point."
        )
    assert stored_values(server, metric) == [1]


def test_one_point_per_sampling_period(
    server: MonitoringTestServer, client: Any, metric: str
) -> None:
    write(client, series(metric, ago(60), {"int64_value": 1}))
    message, summary = refused(client, series(metric, ago(56), {"int64_value": 2}))
    assert "written more frequently than the maximum sampling period" in message
    assert [(e.status.code, e.point_count) for e in summary.errors] == [(FAILED_PRECONDITION, 1)]
    write(client, series(metric, ago(54.9), {"int64_value": 3}))  # 5 s after the first
    assert stored_values(server, metric) == [1, 3]


def test_sampling_period_is_configurable() -> None:
    metric_type = "custom.googleapis.com/test/sampling"
    with MonitoringTestServer(min_sampling_period=timedelta(0)) as fast:
        client = fast.client()
        write(client, series(metric_type, ago(60)))
        write(client, series(metric_type, ago(59.99)))
        assert len(fast.series(PROJECT, metric_type)[0].points) == 2


# -- CreateTimeSeries: the descriptor --------------------------------------------------------------


def test_kind_and_value_type_must_match_the_descriptor(
    server: MonitoringTestServer, client: Any, metric: str
) -> None:
    descriptor(client, metric, metric_kind="CUMULATIVE")
    start = ago(3600)
    message, _ = refused(client, series(metric, ago(60), start=start, metric_kind="GAUGE"))
    assert f"Metric kind for metric {metric} must be CUMULATIVE, but is GAUGE." in message
    message, _ = refused(client, series(metric, ago(60), {"double_value": 1.5}, start=start))
    assert f"Value type for metric {metric} must be INT64, but is DOUBLE." in message
    message, _ = refused(
        client, series(metric, ago(60), start=start, value_type="DOUBLE", metric_kind="CUMULATIVE")
    )
    assert "valueType" in message
    write(
        client, series(metric, ago(60), {"int64_value": 4}, start=start, metric_kind="CUMULATIVE")
    )
    assert stored_values(server, metric) == [4]


def test_label_keys_must_be_declared(
    server: MonitoringTestServer, client: Any, metric: str
) -> None:
    descriptor(client, metric, labels=[{"key": "b"}])
    message, _ = refused(client, series(metric, ago(60), labels={"a": "x", "b": "y"}))
    expected = 'metric.labels[0] had an invalid value of "a": Unrecognized metric label.'
    assert f"Field timeSeries[0].{expected}" in message
    write(client, series(metric, ago(60), labels={"b": "y"}))
    write(client, series(metric, ago(60)))  # a declared label may be left out
    assert [s.metric_labels for s in server.series(PROJECT, metric)] == [{"b": "y"}, {}]


def test_first_write_auto_creates_the_descriptor(
    server: MonitoringTestServer, client: Any, metric: str
) -> None:
    write(
        client,
        series(metric, ago(60), {"double_value": 0.5}, labels={"status": "active"}, unit="s"),
    )
    created = client.get_metric_descriptor(name=f"{PROJECT}/metricDescriptors/{metric}")
    assert (created.metric_kind, created.value_type) == (KINDS.GAUGE, KINDS.DOUBLE)
    assert [label.key for label in created.labels] == ["status"]
    assert created.description == "Auto-created custom metric."
    assert created.unit == "s"
    # From then on the descriptor is the rule: the same labels, the same value type.
    message, _ = refused(
        client, series(metric, ago(50), {"double_value": 1.0}, labels={"new": "x"})
    )
    assert "Unrecognized metric label" in message
    message, _ = refused(
        client, series(metric, ago(50), {"int64_value": 1}, labels={"status": "x"})
    )
    assert "must be DOUBLE, but is INT64" in message

    cumulative = f"{metric}/count"
    write(client, series(cumulative, ago(60), start=ago(3600), metric_kind="CUMULATIVE"))
    created = client.get_metric_descriptor(name=f"{PROJECT}/metricDescriptors/{cumulative}")
    assert (created.metric_kind, created.value_type) == (KINDS.CUMULATIVE, KINDS.INT64)


@pytest.mark.parametrize(
    ("fields", "value"),
    [
        ({"metric_kind": "DELTA"}, {"int64_value": 1}),
        ({"metric_kind": "CUMULATIVE"}, {"bool_value": True}),
        ({"labels": {"http.scheme": "https"}}, {"int64_value": 1}),
        ({"resource": {"type": "nonsense"}}, {"int64_value": 1}),
        ({}, {"string_value": "text"}),
    ],
)
def test_a_refused_first_write_creates_no_descriptor(
    server: MonitoringTestServer,
    client: Any,
    metric: str,
    fields: dict[str, Any],
    value: dict[str, Any],
) -> None:
    start = ago(3600) if "metric_kind" in fields else None
    refused(client, series(metric, ago(60), value, start=start, **fields))
    with pytest.raises(exceptions.NotFound):
        client.get_metric_descriptor(name=f"{PROJECT}/metricDescriptors/{metric}")
    assert server.series(PROJECT, metric) == []


def test_value_types(server: MonitoringTestServer, client: Any, metric: str) -> None:
    values: dict[str, dict[str, Any]] = {
        "bool": {"bool_value": True},
        "int": {"int64_value": -3},
        "double": {"double_value": 2.25},
    }
    write(client, *(series(f"{metric}/{name}", ago(60), value) for name, value in values.items()))
    assert [stored_values(server, f"{metric}/{name}") for name in values] == [[True], [-3], [2.25]]
    unwritable: list[dict[str, Any]] = [{"string_value": "text"}, {}]
    for value in unwritable:
        message, _ = refused(client, series(f"{metric}/other", ago(60), value))
        assert "must be BOOL, INT64, DOUBLE or DISTRIBUTION" in message


# -- CreateTimeSeries: intervals -------------------------------------------------------------------


def test_gauge_points_have_one_instant(
    server: MonitoringTestServer, client: Any, metric: str
) -> None:
    end = ago(60)
    message, _ = refused(client, series(metric, end, start=ago(120)))
    assert "The start time must be equal to the end time" in message
    assert f"for the gauge metric '{metric}'" in message
    write(client, series(metric, end, start=end))
    assert len(stored_values(server, metric)) == 1


def test_cumulative_intervals_and_resets(
    server: MonitoringTestServer, client: Any, metric: str
) -> None:
    descriptor(client, metric, metric_kind="CUMULATIVE")
    base = time.time() - 3600

    def at(offset: int) -> dict[str, int]:
        return {"seconds": int(base + offset), "nanos": 0}

    message, _ = refused(client, series(metric, at(100), start=at(100)))
    assert "The start time must be before the end time" in message
    assert f"for the non-gauge metric '{metric}'" in message
    message, _ = refused(client, series(metric, at(100)))  # a cumulative point needs its start
    assert "must be before the end time" in message

    write(client, series(metric, at(100), {"int64_value": 5}, start=at(0)))
    write(client, series(metric, at(200), {"int64_value": 8}, start=at(0)))
    message, _ = refused(client, series(metric, at(300), {"int64_value": 9}, start=at(-10)))
    assert "older start time than the most recent point" in message
    message, _ = refused(client, series(metric, at(300), {"int64_value": 1}, start=at(150)))
    assert "a millisecond after the end time" in message  # a reset may not overlap the last point
    message, _ = refused(client, series(metric, at(300), {"int64_value": 1}, start=at(200)))
    assert "a millisecond after the end time" in message  # nor start where the last one ended
    reset = {"seconds": int(base + 200), "nanos": 1_000_000}
    write(client, series(metric, at(300), {"int64_value": 1}, start=reset))

    (stored,) = server.series(PROJECT, metric)
    assert [p.value for p in stored.points] == [5, 8, 1]
    starts = [p.start_time for p in stored.points]
    assert starts[0] == starts[1] < starts[2]
    assert starts[2] - stored.points[1].end_time == timedelta(milliseconds=1)


def test_points_too_old_or_too_new(server: MonitoringTestServer, client: Any, metric: str) -> None:
    message, _ = refused(client, series(metric, ago(25 * 3600 + 60), labels={"k": "old"}))
    assert "Data points cannot be written more than approximately 24 hours in the past" in message
    assert "which is too far in the past" in message
    message, _ = refused(client, series(metric, ago(-360), labels={"k": "future"}))
    assert "too far in the future" in message
    write(
        client,
        series(metric, ago(24 * 3600), labels={"k": "day"}),
        series(metric, ago(-240), labels={"k": "soon"}),
    )
    assert [s.metric_labels["k"] for s in server.series(PROJECT, metric)] == ["day", "soon"]


# -- CreateTimeSeries: distributions ---------------------------------------------------------------


def distribution(counts: list[int], count: int, **fields: Any) -> dict[str, Any]:
    value = {
        "count": count,
        "mean": 1.5 if count else 0.0,
        "bucket_options": {"explicit_buckets": {"bounds": [1.0, 2.0]}},  # 3 buckets
        "bucket_counts": counts,
        **fields,
    }
    return {"distribution_value": value}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            distribution([1, 2, 1], 3),
            "fields that sum to 4 which does not equal the |count| field value of 3",
        ),
        (
            distribution([1, 1, 1, 0], 3),
            "has 4 |bucket_counts| fields, which is more than the 3 buckets",
        ),
        (distribution([2, -1, 2], 3), r"bucket_counts\(1\) has a negative count"),
        (
            distribution([], 0, mean=2.5),
            r"with \|count\| of 0 has a non-zero \|mean\| value of 2.5",
        ),
        (
            distribution([1], 1, bucket_options={"explicit_buckets": {"bounds": []}}),
            r"\|explicit_buckets.bounds\| does not have at least one entry",
        ),
        (
            distribution([1], 1, bucket_options={"explicit_buckets": {"bounds": [2.0, 1.0]}}),
            "strictly increasing",
        ),
        (
            distribution(
                [1], 1, bucket_options={"linear_buckets": {"num_finite_buckets": 0, "width": 1}}
            ),
            "linear_buckets",
        ),
        (
            distribution(
                [],
                1,
                bucket_options={
                    "exponential_buckets": {
                        "num_finite_buckets": 300,
                        "growth_factor": 2,
                        "scale": 1,
                    }
                },
            ),
            "302 buckets, more than the 200 allowed",
        ),
    ],
)
def test_distribution_values_are_checked(
    server: MonitoringTestServer, client: Any, metric: str, value: dict[str, Any], expected: str
) -> None:
    message, _ = refused(client, series(metric, ago(60), value))
    assert "Field timeSeries[0].points[0].distributionValue had an invalid value: " in message
    assert re.search(expected, message), message
    assert server.series(PROJECT, metric) == []


def test_distribution_values_are_stored(
    server: MonitoringTestServer, client: Any, metric: str
) -> None:
    write(
        client,
        series(metric, ago(60), distribution([1, 2, 0], 3), labels={"k": "full"}),
        series(metric, ago(60), distribution([1, 2], 3), labels={"k": "short"}),  # rest are 0
        series(
            metric, ago(60), {"distribution_value": {"count": 2, "mean": 4.0}}, labels={"k": "none"}
        ),
    )
    stored = {s.metric_labels["k"]: s.points[0].value for s in server.series(PROJECT, metric)}
    assert list(stored["full"].bucket_counts) == [1, 2, 0]
    assert list(stored["full"].bucket_options.explicit_buckets.bounds) == [1.0, 2.0]
    assert stored["none"].count == 2 and not stored["none"].bucket_counts
    (read,) = listed(client, metric, 'metric.labels.k = "full"')
    assert read.points[0].value.distribution_value.count == 3


# -- CreateTimeSeries: monitored resources ---------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        (
            {
                "type": "generic_task",
                "labels": {
                    k: v for k, v in TASK_LABELS.items() if k not in {"namespace", "task_id"}
                },
            },
            "The set of resource labels is incomplete. Missing labels: (namespace task_id).",
        ),
        ({"type": "global", "labels": {}}, "Missing labels: (project_id)."),
        (
            {"type": "cloud_run_revision", "labels": {"project_id": "test-project"}},
            "Metrics cannot be written to cloud_run_revision. See https://cloud.google.com/monitoring/custom-metrics/creating-metrics#which-resource",
        ),
        ({"type": "nonsense"}, "Unrecognized resource type: nonsense."),
        (
            {"type": "global", "labels": {"project_id": "test-project", "zone": "x"}},
            'resource.labels[1] had an invalid value of "zone": Unrecognized resource label.',
        ),
    ],
)
def test_monitored_resource_must_be_writable_and_complete(
    server: MonitoringTestServer, client: Any, metric: str, resource: dict[str, Any], expected: str
) -> None:
    message, _ = refused(client, series(metric, ago(60), resource=resource))
    assert expected in message
    assert server.series(PROJECT, metric) == []


def test_generic_task_and_other_writable_resources(
    server: MonitoringTestServer, client: Any, metric: str
) -> None:
    node = {"project_id": "p", "location": "global", "namespace": "n", "node_id": "host"}
    write(
        client,
        series(metric, ago(60), resource={"type": "generic_task", "labels": TASK_LABELS}),
        series(metric, ago(60), resource={"type": "generic_node", "labels": node}),
        series(metric, ago(60)),
    )
    written = server.series(PROJECT, metric)
    assert [s.resource_labels for s in written] == [TASK_LABELS, node, GLOBAL["labels"]]
    assert [len(server.series(PROJECT, metric, kind)) for kind in ("generic_task", "global")] == [
        1,
        1,
    ]


def test_unmodelled_writable_resource_is_unimplemented(client: Any, metric: str) -> None:
    with pytest.raises(exceptions.MethodNotImplemented, match="not modelled"):
        write(client, series(metric, ago(60), resource={"type": "gae_instance"}))


# -- partial failure -------------------------------------------------------------------------------


def test_valid_series_are_written_and_failed_ones_reported(
    server: MonitoringTestServer, client: Any, metric: str
) -> None:
    write(client, series(metric, ago(60), labels={"k": "spaced"}))
    message, summary = refused(
        client,
        series(metric, ago(30), {"int64_value": 10}, labels={"k": "a"}),
        series(metric, ago(30), resource={"type": "nonsense"}, labels={"k": "b"}),
        series(metric, ago(30), resource={"type": "nonsense"}, labels={"k": "c"}),
        series(metric, ago(30), {"int64_value": 20}, labels={"k": "d"}),
        series(metric, ago(58), labels={"k": "spaced"}),
    )
    assert message == (
        "One or more TimeSeries could not be written: "
        "timeSeries[1-2]: Unrecognized resource type: nonsense.; "
        "timeSeries[4]: One or more points were written more frequently than the maximum "
        "sampling period configured for the metric."
    )
    assert summary.total_point_count == 5
    assert summary.success_point_count == 2
    assert sorted((e.status.code, e.point_count) for e in summary.errors) == [
        (INVALID, 2),
        (FAILED_PRECONDITION, 1),
    ]
    assert all(not e.status.message for e in summary.errors)  # codes only, as the real ones
    written = {
        s.metric_labels["k"]: [p.value for p in s.points] for s in server.series(PROJECT, metric)
    }
    assert written == {"spaced": [1], "a": [10], "d": [20]}


# -- test helpers: failures, calls, reset ----------------------------------------------------------


def test_fail_next_and_calls(metric: str) -> None:
    with MonitoringTestServer() as own:
        client = own.client()
        own.fail_next("CreateTimeSeries", grpc.StatusCode.UNAVAILABLE, times=2)
        for _ in range(2):
            with pytest.raises(exceptions.ServiceUnavailable, match="Injected"):
                write(client, series(metric, ago(60)))
        assert own.series(PROJECT, metric) == []
        write(client, series(metric, ago(60)))
        assert own.calls["CreateTimeSeries"] == 3
        assert len(own.series(PROJECT, metric)) == 1

        # The client retries UNAVAILABLE on reads by itself: the counter sees every attempt.
        own.fail_next("ListTimeSeries", grpc.StatusCode.UNAVAILABLE, times=2, message="blip")
        assert len(listed(client, metric)) == 1
        assert own.calls["ListTimeSeries"] == 3
        own.fail_next("GetMetricDescriptor", grpc.StatusCode.PERMISSION_DENIED)
        with pytest.raises(exceptions.PermissionDenied):
            client.get_metric_descriptor(name=f"{PROJECT}/metricDescriptors/{metric}")
        assert (
            client.get_metric_descriptor(name=f"{PROJECT}/metricDescriptors/{metric}").type
            == metric
        )

        with pytest.raises(ValueError, match="unknown method"):
            own.fail_next("QueryTimeSeries", grpc.StatusCode.INTERNAL)

        own.fail_next("CreateTimeSeries", grpc.StatusCode.INTERNAL)
        own.reset()
        assert own.calls == {} and own.series(PROJECT, metric) == []
        write(client, series(metric, ago(30)))  # the pending failure went with the reset
        assert own.calls == {"CreateTimeSeries": 1}


def test_unimplemented_methods(client: Any) -> None:
    with pytest.raises(exceptions.MethodNotImplemented):
        client.create_service_time_series(
            request={"name": PROJECT, "time_series": [series("custom.googleapis.com/x", ago(60))]}
        )
    with pytest.raises(exceptions.MethodNotImplemented):
        client.get_monitored_resource_descriptor(
            name=f"{PROJECT}/monitoredResourceDescriptors/global", retry=None
        )


def test_injected_clock_moves_time() -> None:
    now = [datetime(2030, 1, 1, tzinfo=UTC).timestamp()]
    with MonitoringTestServer(clock=lambda: now[0]) as timed:
        client = timed.client()
        at = {"seconds": int(now[0]) - 60}
        write(client, series("custom.googleapis.com/test/clock", at, labels={"a": "x"}))
        now[0] += 26 * 3600  # a day and more later the same point is too old to write again
        message, _ = refused(
            client, series("custom.googleapis.com/test/clock", at, labels={"a": "b"})
        )
        assert "too far in the past" in message


def test_concurrent_writers(server: MonitoringTestServer, client: Any, metric: str) -> None:
    errors: list[BaseException] = []

    def writer(worker: int) -> None:
        try:
            for step in range(5):
                write(client, series(metric, ago(300 - step * 10), labels={"w": str(worker)}))
        except BaseException as error:  # noqa: BLE001 -- reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(len(s.points) for s in server.series(PROJECT, metric)) == [5] * 8


def test_standalone_process(metric: str) -> None:
    with standalone_server("tests.support.monitoring_server") as address:
        channel = make_channel(address)
        try:
            client = client_over(channel)
            write(client, series(metric, ago(60), {"int64_value": 42}))
            (read,) = listed(client, metric)
            assert read.points[0].value.int64_value == 42
        finally:
            channel.close()
