"""A local Google Cloud Monitoring for tests: the v3 MetricService over gRPC, in memory.

Google ships no Cloud Monitoring emulator, so this server speaks the real wire protocol
(``google.monitoring.v3.MetricService`` over gRPC) with the message types of the official
``google-cloud-monitoring`` package, and the official ``MetricServiceClient`` talks to it
unchanged over an insecure channel to 127.0.0.1 (:func:`make_client`). Everything is kept in
memory, under one lock; state is isolated per project by resource name (``projects/P``).

Each rule below cites where it comes from. The references:

* [RPC] API reference, https://cloud.google.com/monitoring/api/ref_v3/rpc/google.monitoring.v3
  (the same text ships as docstrings in ``google.cloud.monitoring_v3.types``); the
  ``google.api`` messages it uses (``MetricDescriptor``, ``Distribution``) are documented in
  ``google/api/metric.proto`` and ``google/api/distribution.proto`` of googleapis-common-protos;
* [CREATING] https://cloud.google.com/monitoring/custom-metrics/creating-metrics
  (user-defined metrics: auto-creation, writable monitored resources, writing points);
* [QUOTAS] https://cloud.google.com/monitoring/quotas ("User-defined metrics": 200 time series per
  request; "Rate at which data can be written to a single time series: one point each 5
  seconds", the footnote: "the end times of points written to a time series be at least 5
  seconds apart"; 200 histogram buckets per distribution). The page said 10 seconds until about
  2021 (quoted in GoogleCloudPlatform/opentelemetry-operations-java#55, 2020); "maximum 1 point
  every 5 seconds" is quoted from it in GoogleCloudPlatform/docker-clamav-malware-scanner#202
  (2024);
* [KINDS] https://cloud.google.com/monitoring/api/v3/kinds-and-types (metric kinds and value
  types; its table of supported combinations, as ``tokenbroker.kernel.metrics`` reads it: DELTA
  is not offered to user-defined metrics. The stored copy searched for this server did not show
  the table, so refusing DELTA, STRING and a CUMULATIVE BOOL in CreateMetricDescriptor is the
  strict reading; for auto-created descriptors [RPC] TimeSeries says it outright);
* [RESOURCES] https://cloud.google.com/monitoring/api/resources (the labels of each monitored
  resource type), with the label sets used by Google's own exporters
  (GoogleCloudPlatform/opentelemetry-operations-python,
  ``opentelemetry-resourcedetector-gcp/.../_mapping.py``: ``generic_task`` has ``location``,
  ``namespace``, ``job``, ``task_id``; ``generic_node`` ``location``, ``namespace``, ``node_id``);
* [FILTERS] https://cloud.google.com/monitoring/api/v3/filters (``metric.type = "..."``,
  ``starts_with("...")`` and the other string functions, ``AND``, ``NOT``);
* [NAMING] https://cloud.google.com/monitoring/api/v3/naming-conventions (label keys);
* [KCC] GoogleCloudPlatform/k8s-config-connector, ``mockgcp/mockmonitoring/metricdescriptor.go``,
  a mock recorded against the real API: descriptor labels come back sorted by key, descriptors
  list the writable monitored resource types, "Could not find descriptor for metric '...'.";
* Error texts seen from the real service, where the docs name no message (the status is
  INVALID_ARGUMENT unless said otherwise):
  "One or more TimeSeries could not be written: timeSeries[73]: Field timeSeries[73].points[0]
  .distributionValue had an invalid value: Distribution value has |bucket_counts| fields that
  sum to 1 which does not equal the |count| field value of 0." (the current shape of a partial
  failure, micrometer-metrics/micrometer#5651, 2024; #4868; "Distribution value with |count| of
  0 has a non-zero |mean| value of ...", #5927; "Distribution bucket_counts(26) has a negative
  count.", #1325);
  "Distribution value has 15 |bucket_counts| fields, which is more than the 14 buckets allowed
  by the bucketing options." and "Distribution |explicit_buckets.bounds| does not have at least
  one entry." (census-ecosystem/opencensus-go-exporter-stackdriver#98, #234, #41);
  "Points must be written in order. One or more of the points specified had an older end time
  than the most recent point." (googleapis/python-monitoring#57: also for a point whose end time
  equals the last one's) and "... an older start time than the most recent point."
  (GoogleCloudPlatform/k8s-stackdriver#432);
  "One or more points were written more frequently than the maximum sampling period configured
  for the metric." (googleapis/google-cloud-node#5348, 2024;
  GoogleCloudPlatform/node-red-contrib-google-cloud, ``docs/monitoring.md``), whose status
  details the Go client renders as "total_point_count:4 errors:{status:{code:9} point_count:4}"
  (quoted in a public Go service's comment, found by exact-text search; the repository is not
  named there): the summary counts these points under FAILED_PRECONDITION while the call itself
  is INVALID_ARGUMENT (one public note reports a REST answer of 400 FAILED_PRECONDITION for the
  same refusal; this server keeps the gRPC shape);
  "Field timeSeries[4] had an invalid value: Duplicate TimeSeries encountered. Only one point can
  be written per TimeSeries per request." (influxdata/telegraf#13826; the later occurrence is
  the one named, so the first is written);
  "Field timeSeries[35].points had an invalid value: Only one point can be written per TimeSeries
  per request." (GoogleCloudPlatform/opentelemetry-operations-java#225);
  "Field timeSeries[5].points[0].interval.end_time had an invalid value of "...": Data points
  cannot be written more than approximately 24 hours in the past, specifically no more than
  25h10s in the past. Your data point is 73h59m25s before the present time, which is too far in
  the past." (influxdata/telegraf#13826; the figure here is [RPC]'s 25 hours);
  "Field timeSeries[1].points[0].interval.start_time had an invalid value of "...": The start
  time must be before the end time (...) for the non-gauge metric '...'." and "... must be equal
  to the end time (...) for the gauge metric '...'." (opencensus-go-exporter-stackdriver#266,
  open-telemetry/opentelemetry-dotnet#205);
  "Metric kind for metric external.googleapis.com/prometheus/my_metric must be CUMULATIVE, but is
  GAUGE." (Stackdriver/stackdriver-prometheus#21; the value-type message is shaped after it);
  "Field timeSeries[1].metric.labels[2] had an invalid value of "application": Unrecognized
  metric label." (spinnaker/spinnaker-monitoring, ``stackdriver_service_test.py``);
  "Field timeSeries[0].metric.labels had an invalid value of "http.scheme": Label key contains
  invalid characters." (GoogleCloudPlatform/opentelemetry-operations-go#98, which also shows
  "Request was missing field timeSeries.");
  "The set of resource labels is incomplete. Missing labels: (namespace task_id)."
  (GoogleCloudPlatform/opentelemetry-operations-java#139);
  "Metrics cannot be written to cloud_run_revision. See https://cloud.google.com/monitoring/
  custom-metrics/creating-metrics#which-resource for a list of writable resource types."
  (opentelemetry-operations-java#248) and "Unrecognized resource type: ." (#46);
  "Field timeSeries had an invalid value: A maximum of 200 TimeSeries can be written in a single
  request." (census-instrumentation/opencensus-node#634);
  ALREADY_EXISTS "Errors during metric descriptor creation: {(metric: ..., error: The metric
  already exists.)}." for a descriptor of another kind than the existing one
  (google/exposure-notifications-verification-server#1309, #1357;
  census-ecosystem/opencensus-go-exporter-stackdriver#239).
  Messages not seen anywhere are written in the same shape; the code says so where they are.
  Older answers put the indices after each message ("...: timeSeries[0]",
  opentelemetry-operations-java#139, 2022; "...: timeSeries[0-199]",
  Stackdriver/stackdriver-prometheus-sidecar#251, 2020); this server writes the current shape,
  indices first.

Partial failure ([RPC] CreateTimeSeries: "The response is empty if all time series in the request
were written. If any time series could not be written, a corresponding failure message is
included in the error response"; CreateTimeSeriesSummary: "The number of points that were
successfully written"): the valid series of a request are written, and the call fails with
INVALID_ARGUMENT, the message "One or more TimeSeries could not be written: timeSeries[i]: ...;
timeSeries[j-k]: ..." (one part per distinct message, with the indices it applies to), and a
``google.monitoring.v3.CreateTimeSeriesSummary`` in the status details (the gRPC
``grpc-status-details-bin`` trailer; the client exposes it in ``exception.details`` as an
``Any``): ``total_point_count``, ``success_point_count`` and one ``errors`` entry per status code
with its ``point_count``; the entries carry the code only, as the real ones do. A request-level
fault (no series, more than 200, a malformed name) writes nothing and has no summary.

Not modelled: DELTA metrics, STRING and MONEY values (not for user-defined metrics in [KINDS] and
[RPC] TimeSeries.points), the descriptor's asynchronous creation and deletion ([KCC]: the real
API creates a descriptor about a second after answering; here at once), built-in (non
user-defined) metric types, monitored resource descriptors, aggregation in ListTimeSeries,
QueryTimeSeries, CreateServiceTimeSeries, organization and folder scopes, the limits on labels
per descriptor and on active series, the ``project_id`` resource label being checked against the
request's project, and per-descriptor sampling periods (one period for all, ``5 s`` by default).
Unimplemented methods answer UNIMPLEMENTED, as gRPC does for any unknown method.

Test helpers: :meth:`MonitoringTestServer.series` reads the written points straight from memory,
:attr:`MonitoringTestServer.calls` counts calls per method, :meth:`MonitoringTestServer.fail_next`
makes the next calls of a method fail with a given status, :meth:`MonitoringTestServer.reset`
forgets everything. Time comes from one clock (``clock=``, seconds since the epoch).

Standalone: ``python -m tests.support.monitoring_server --port P`` prints ``READY 127.0.0.1:P``
once serving, and serves until SIGINT or SIGTERM. ``--max-workers`` sets the gRPC handler threads
(default 16).
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import itertools
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import grpc

# googleapis-common-protos ships .pyi stubs but no py.typed marker: typed Any here.
from google.api import metric_pb2  # type: ignore[import-untyped]
from google.auth.credentials import AnonymousCredentials
from google.cloud import monitoring_v3
from google.cloud.monitoring_v3.services.metric_service.transports import (
    MetricServiceGrpcTransport,
)
from google.cloud.monitoring_v3.types import metric_service
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.rpc import status_pb2  # type: ignore[import-untyped]  # as google.api above

from tests.support.grpc_server import (
    GrpcTestServer,
    UnaryMethod,
    announce_and_wait,
    standalone_parser,
)

SERVICE = "google.monitoring.v3.MetricService"
Descriptor = metric_pb2.MetricDescriptor
Kind = metric_pb2.MetricDescriptor.MetricKind
ValueType = metric_pb2.MetricDescriptor.ValueType

# The raw protobuf classes behind the proto-plus wrappers: the store works on them, so that
# timestamps keep their nanoseconds and fields can be tested for presence.
_CreateTimeSeriesRequest: Any = metric_service.CreateTimeSeriesRequest.pb()
_CreateTimeSeriesSummary: Any = metric_service.CreateTimeSeriesSummary.pb()
_ListTimeSeriesRequest: Any = metric_service.ListTimeSeriesRequest.pb()
_ListTimeSeriesResponse: Any = metric_service.ListTimeSeriesResponse.pb()
_TimeSeries: Any = monitoring_v3.TimeSeries.pb()

# [RPC] CreateTimeSeriesRequest.time_series: "The maximum number of TimeSeries objects per Create
# request is 200." ([QUOTAS]: "Time series included in a request: 200".)
MAX_TIME_SERIES_PER_REQUEST = 200
# [QUOTAS]: "one point each 5 seconds"; "the end times of points written to a time series be at
# least 5 seconds apart".
MIN_SAMPLING_PERIOD = timedelta(seconds=5)
# [RPC] TimeInterval: "the end time must not be more than 25 hours in the past or more than five
# minutes in the future".
MAX_AGE = timedelta(hours=25)
MAX_AHEAD = timedelta(minutes=5)
# [QUOTAS]: "Histogram buckets per custom distribution metric: 200".
MAX_BUCKETS = 200
# [RPC] ListMetricDescriptorsRequest.page_size: "The default and maximum value is 10,000."
MAX_DESCRIPTOR_PAGE = 10_000
# [RPC] ListTimeSeriesRequest.page_size: "If page_size is empty or more than 100,000 results, the
# effective page_size is 100,000 results."
MAX_SERIES_PAGE = 100_000
# [RPC] ListMetricDescriptorsRequest.active_only: "recent data (within roughly 25 hours)".
ACTIVE_WINDOW = timedelta(hours=25)

#: Domains of user-defined metric types ([CREATING]; [NAMING]: ``custom.googleapis.com/`` for
#: custom metrics, ``external.googleapis.com/`` for external ones).
USER_DEFINED_PREFIXES = ("custom.googleapis.com/", "external.googleapis.com/")
_METRIC_PATH = re.compile(r"[A-Za-z0-9_./-]+")
# [NAMING] label keys: letters, digits and underscores, starting with a letter, at most 100
# characters (a dot is refused: "Label key contains invalid characters.", module docstring).
_LABEL_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,99}")

#: The monitored resource types user-defined metrics can be written to, with their labels
#: ([CREATING] "Monitored resources for user-defined metrics", listed in
#: micrometer-metrics/micrometer#1907 and [KCC]; labels from [RESOURCES]). ``project_id`` is a
#: label of every type.
WRITABLE_RESOURCES: Mapping[str, tuple[str, ...]] = {
    "global": ("project_id",),
    "generic_task": ("project_id", "location", "namespace", "job", "task_id"),
    "generic_node": ("project_id", "location", "namespace", "node_id"),
    "gce_instance": ("project_id", "instance_id", "zone"),
    "k8s_cluster": ("project_id", "location", "cluster_name"),
    "k8s_node": ("project_id", "location", "cluster_name", "node_name"),
    "k8s_pod": ("project_id", "location", "cluster_name", "namespace_name", "pod_name"),
    "k8s_container": (
        "project_id",
        "location",
        "cluster_name",
        "namespace_name",
        "pod_name",
        "container_name",
    ),
    "aws_ec2_instance": ("project_id", "instance_id", "region", "aws_account"),
}
#: Writable for user-defined metrics ([CREATING]) but not modelled here: a request naming one is
#: answered UNIMPLEMENTED, so a test learns the server's limit instead of a wrong answer.
UNMODELLED_RESOURCES = frozenset(
    {"dataflow_job", "gae_instance", "gke_container", "k8s_service", "prometheus_target"}
)
#: Known Google resource types user-defined metrics cannot be written to (the real answer for
#: ``cloud_run_revision`` is in the module docstring); any other unknown type is "Unrecognized".
NOT_WRITABLE_RESOURCES = frozenset(
    {
        "cloud_run_revision",
        "cloud_run_job",
        "cloud_function",
        "gae_app",
        "cloudsql_database",
        "gcs_bucket",
        "pubsub_topic",
        "pubsub_subscription",
    }
)
_WHICH_RESOURCE = (
    "https://cloud.google.com/monitoring/custom-metrics/creating-metrics#which-resource"
)

# [KINDS]: the kinds and value types a user-defined metric may have (BOOL only as a GAUGE).
_USER_KINDS = frozenset({Descriptor.GAUGE, Descriptor.CUMULATIVE})
_USER_VALUE_TYPES = frozenset(
    {Descriptor.BOOL, Descriptor.INT64, Descriptor.DOUBLE, Descriptor.DISTRIBUTION}
)
_VALUE_FIELDS: Mapping[str, int] = {
    "bool_value": Descriptor.BOOL,
    "int64_value": Descriptor.INT64,
    "double_value": Descriptor.DOUBLE,
    "string_value": Descriptor.STRING,
    "distribution_value": Descriptor.DISTRIBUTION,
}
_NS = 1_000_000_000
_MS = 1_000_000


# -- errors -----------------------------------------------------------------------------------


class RpcError(Exception):
    """A gRPC status to answer with, optionally with ``google.rpc.Status`` details; raised inside
    the store, turned into ``context.abort`` by the server."""

    def __init__(self, code: grpc.StatusCode, message: str, details: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = tuple(details)


def _invalid(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class _Refusal:
    """Why one time series of a request was not written."""

    message: str
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT


def _status_number(code: grpc.StatusCode) -> int:
    number: int = code.value[0]
    return number


def _index_ranges(indices: Sequence[int]) -> str:
    """``[0, 2, 3, 4, 6]`` -> ``"0,2-4,6"``, as the real messages write them."""
    parts: list[str] = []
    start = previous = indices[0]
    for index in [*indices[1:], None]:
        if index is not None and index == previous + 1:
            previous = index
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if index is not None:
            start = previous = index
    return ",".join(parts)


# -- time -------------------------------------------------------------------------------------


def _ns(timestamp: Any) -> int:
    return int(timestamp.seconds) * _NS + int(timestamp.nanos)


def _timestamp(ns: int) -> Any:
    seconds, nanos = divmod(ns, _NS)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def _datetime(ns: int) -> datetime:
    seconds, nanos = divmod(ns, _NS)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=nanos // 1000)


def _rfc3339(ns: int) -> str:
    return _datetime(ns).isoformat()


def _span(ns: int) -> str:
    """A duration as the real messages write it: ``73h59m25s``, ``25h`` (zero parts left out)."""
    seconds = ns // _NS
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    text = "".join(
        f"{amount}{unit}"
        for amount, unit in ((hours, "h"), (minutes, "m"), (seconds, "s"))
        if amount
    )
    return text or "0s"


# -- storage ----------------------------------------------------------------------------------


class WrittenPoint(NamedTuple):
    """One stored point: its interval and its value (``int``, ``float``, ``bool``, or a
    ``google.api.distribution_pb2.Distribution``)."""

    start_time: datetime
    end_time: datetime
    value: Any


class WrittenSeries(NamedTuple):
    """What :meth:`MonitoringStore.series` returns for one time series; points oldest first."""

    metric_labels: dict[str, str]
    resource_labels: dict[str, str]
    points: list[WrittenPoint]


_Labels = tuple[tuple[str, str], ...]
_SeriesKey = tuple[str, _Labels, str, _Labels]


@dataclass
class _Point:
    start_ns: int
    end_ns: int
    value: Any  # a google.monitoring.v3.TypedValue (raw protobuf), owned by the store


@dataclass
class _Series:
    metric_type: str
    metric_labels: _Labels
    resource_type: str
    resource_labels: _Labels
    points: list[_Point] = field(default_factory=list)


@dataclass
class _Project:
    descriptors: dict[str, Any] = field(default_factory=dict)  # type -> MetricDescriptor
    series: dict[_SeriesKey, _Series] = field(default_factory=dict)  # in creation order


def _labels(mapping: Mapping[str, str]) -> _Labels:
    return tuple(sorted(mapping.items()))


def _typed_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "distribution_value":
        copied = type(value.distribution_value)()
        copied.CopyFrom(value.distribution_value)
        return copied
    return getattr(value, kind) if kind else None


def _copy(message: Any) -> Any:
    copied = type(message)()
    copied.CopyFrom(message)
    return copied


_PROJECT = re.compile(r"projects/([^/]+)")
_DESCRIPTOR_NAME = re.compile(r"projects/([^/]+)/metricDescriptors/(.+)")


class MonitoringStore:
    """The Cloud Monitoring semantics, independent of gRPC: methods take and return the raw
    protobuf messages of ``google.monitoring.v3`` and raise :class:`RpcError`."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        min_sampling_period: timedelta = MIN_SAMPLING_PERIOD,
    ) -> None:
        self._lock = threading.RLock()
        self._projects: dict[str, _Project] = {}
        self._clock = clock
        self._min_gap_ns = int(min_sampling_period.total_seconds() * _NS)

    def reset(self) -> None:
        with self._lock:
            self._projects.clear()

    def _now_ns(self) -> int:
        return int(self._clock() * _NS)

    def _state(self, project: str) -> _Project:
        return self._projects.setdefault(project, _Project())

    # -- names --------------------------------------------------------------------------------

    @staticmethod
    def _project_of(name: str) -> str:
        match = _PROJECT.fullmatch(name or "")
        if not match:
            if name.startswith(("organizations/", "folders/")):
                raise RpcError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"[{name}]: organization and folder scopes are not modelled by this test "
                    "server.",
                )
            # Not seen from the real service; [RPC] names the format "projects/[PROJECT_ID]".
            raise _invalid(f"Invalid resource name [{name}]: expected projects/[PROJECT_ID].")
        return match[1]

    @staticmethod
    def _descriptor_ref(name: str) -> tuple[str, str]:
        # [RPC] "projects/[PROJECT_ID_OR_NUMBER]/metricDescriptors/[METRIC_ID]"; the metric id
        # keeps its slashes ("custom.googleapis.com/my_test_metric").
        match = _DESCRIPTOR_NAME.fullmatch(name or "")
        if not match:
            raise _invalid(
                f"Invalid resource name [{name}]: expected "
                "projects/[PROJECT_ID]/metricDescriptors/[METRIC_ID]."
            )
        return match[1], match[2]

    # -- metric descriptors -------------------------------------------------------------------

    @staticmethod
    def _check_descriptor(given: Any) -> None:
        metric_type = given.type
        if not metric_type:
            raise _invalid("Field metricDescriptor.type is required.")  # shape of the real ones
        problem = _metric_type_problem(metric_type)
        if problem:
            raise _invalid(
                f'Field metricDescriptor.type had an invalid value of "{metric_type}": {problem}'
            )
        if given.metric_kind not in _USER_KINDS:
            # [KINDS]: user-defined metrics are GAUGE or CUMULATIVE.
            raise _invalid(
                f"Field metricDescriptor.metricKind had an invalid value of "
                f'"{Kind.Name(given.metric_kind)}": a user-defined metric must be GAUGE or '
                "CUMULATIVE."
            )
        if given.value_type not in _USER_VALUE_TYPES:
            raise _invalid(
                f"Field metricDescriptor.valueType had an invalid value of "
                f'"{ValueType.Name(given.value_type)}": a user-defined metric must be BOOL, '
                "INT64, DOUBLE or DISTRIBUTION."
            )
        if given.value_type == Descriptor.BOOL and given.metric_kind != Descriptor.GAUGE:
            # [KINDS]: BOOL values are GAUGE only.
            raise _invalid("A BOOL metric must be a GAUGE.")
        keys = [label.key for label in given.labels]
        for key in keys:
            if not _LABEL_KEY.fullmatch(key):
                raise _invalid(
                    f'Field metricDescriptor.labels had an invalid value of "{key}": Label key '
                    "contains invalid characters."
                )
        if len(set(keys)) != len(keys):
            raise _invalid("Field metricDescriptor.labels had an invalid value: duplicate keys.")

    def create_metric_descriptor(self, request: Any) -> Any:
        project = self._project_of(request.name)
        given = request.metric_descriptor
        self._check_descriptor(given)
        name = f"projects/{project}/metricDescriptors/{given.type}"
        if given.name and given.name != name:
            raise _invalid(f'Field metricDescriptor.name had an invalid value of "{given.name}".')
        with self._lock:
            state = self._state(project)
            existing = state.descriptors.get(given.type)
            if existing is not None and _conflicts(existing, given):
                # [RPC] MetricDescriptor: "deleting or altering it stops data collection and
                # makes the metric type's existing data unusable" -- the real API refuses a
                # descriptor whose kind or value type differs from the existing one with
                # ALREADY_EXISTS (module docstring). A label whose value type changes is refused
                # the same way: not documented, the strict choice.
                raise RpcError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    "Errors during metric descriptor creation: {(metric: "
                    f"{given.type}, error: The metric already exists.)}}.",
                )
            stored = _copy(given)
            stored.name = name
            # [RPC] CreateMetricDescriptor: "The metric descriptor is updated if it already
            # exists, except that metric labels are never removed." Sorted by key ([KCC]).
            labels = {label.key: label for label in (existing.labels if existing else ())}
            labels.update({label.key: label for label in given.labels})
            del stored.labels[:]
            stored.labels.extend(labels[key] for key in sorted(labels))
            if not stored.monitored_resource_types:
                stored.monitored_resource_types.extend(sorted(WRITABLE_RESOURCES))  # [KCC]
            state.descriptors[given.type] = stored
            return _copy(stored)

    def get_metric_descriptor(self, request: Any) -> Any:
        project, metric_type = self._descriptor_ref(request.name)
        with self._lock:
            stored = self._state(project).descriptors.get(metric_type)
            if stored is None:
                raise _descriptor_not_found(metric_type)
            return _copy(stored)

    def delete_metric_descriptor(self, request: Any) -> Any:
        project, metric_type = self._descriptor_ref(request.name)
        if not metric_type.startswith(USER_DEFINED_PREFIXES):
            # [RPC] DeleteMetricDescriptor: "Only user-created custom metrics can be deleted."
            raise _invalid(f"Only user-defined metric descriptors can be deleted: {metric_type}.")
        with self._lock:
            state = self._state(project)
            if state.descriptors.pop(metric_type, None) is None:
                raise _descriptor_not_found(metric_type)
            # [RPC] MetricDescriptor: deleting it "makes the metric type's existing data
            # unusable": its series go with it.
            for key in [key for key in state.series if key[0] == metric_type]:
                del state.series[key]
        return empty_pb2.Empty()

    def list_metric_descriptors(self, request: Any) -> Any:
        project = self._project_of(request.name)
        predicate = compile_filter(request.filter, allowed=("metric.type",))
        now = self._now_ns()
        with self._lock:
            state = self._state(project)
            active = {
                key[0]
                for key, series in state.series.items()
                if series.points and now - series.points[-1].end_ns <= _span_ns(ACTIVE_WINDOW)
            }
            matching = [
                _copy(descriptor)
                for metric_type, descriptor in sorted(state.descriptors.items())
                if predicate(_Subject(metric_type))
                and (not request.active_only or metric_type in active)
            ]
        # [RPC] page_size: "If a page_size <= 0 or > 10,000 is submitted, will instead return a
        # maximum of 10,000 results."
        size = (
            request.page_size
            if 0 < request.page_size <= MAX_DESCRIPTOR_PAGE
            else MAX_DESCRIPTOR_PAGE
        )
        start = _page_start(request.page_token, scope=f"{project}|{request.filter}")
        page = matching[start : start + size]
        response = metric_service.ListMetricDescriptorsResponse.pb()()
        response.metric_descriptors.extend(page)
        if start + size < len(matching):
            response.next_page_token = _page_token(
                start + size, scope=f"{project}|{request.filter}"
            )
        return response

    # -- writing time series ------------------------------------------------------------------

    def create_time_series(self, request: Any) -> Any:
        project = self._project_of(request.name)
        if not request.time_series:
            raise _invalid("Request was missing field timeSeries.")  # seen from the real API
        if len(request.time_series) > MAX_TIME_SERIES_PER_REQUEST:
            raise _invalid(
                "Field timeSeries had an invalid value: A maximum of "
                f"{MAX_TIME_SERIES_PER_REQUEST} TimeSeries can be written in a single request."
            )
        for series in request.time_series:
            if series.resource.type in UNMODELLED_RESOURCES:
                raise RpcError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"Monitored resource type {series.resource.type} is writable by user-defined "
                    "metrics but not modelled by this test server.",
                )
        refusals: list[tuple[int, int, _Refusal]] = []  # (index, points, why)
        written = 0
        with self._lock:
            state = self._state(project)
            now = self._now_ns()
            seen: set[_SeriesKey] = set()
            for index, series in enumerate(request.time_series):
                refusal = self._write(state, index, series, project=project, seen=seen, now=now)
                if refusal is None:
                    written += 1
                else:
                    refusals.append((index, len(series.points), refusal))
        if refusals:
            total = sum(len(series.points) for series in request.time_series)
            raise _partial_failure(total, written, refusals)
        return empty_pb2.Empty()

    def _write(
        self,
        state: _Project,
        index: int,
        series: Any,
        *,
        project: str,
        seen: set[_SeriesKey],
        now: int,
    ) -> _Refusal | None:
        """Validate one time series of a request and store its point; the reason it was
        refused otherwise. Checks run in a fixed order; the first failing one answers."""
        key: _SeriesKey = (
            series.metric.type,
            _labels(series.metric.labels),
            series.resource.type,
            _labels(series.resource.labels),
        )
        refusal = _shape_problem(index, series, key, seen) or _resource_problem(
            index, series.resource
        )
        if refusal is not None:
            return refusal
        point = series.points[0]
        descriptor, refusal = self._descriptor_for(state, project, index, series, point)
        if refusal is None:
            refusal = (
                _interval_problem(index, point, descriptor, now)
                or _distribution_problem(index, point)
                or self._history_problem(index, state.series.get(key), point, descriptor)
            )
        if refusal is None:
            self._store(state, key, series, point, descriptor)
        return refusal

    def _descriptor_for(
        self, state: _Project, project: str, index: int, series: Any, point: Any
    ) -> tuple[Any, _Refusal | None]:
        """The descriptor the series is checked against: the stored one, or the one its first
        write would auto-create ([CREATING] "Auto-creation of metric descriptors")."""
        value_type, refusal = _value_type_of(index, series, point)
        if refusal is not None:
            return None, refusal
        descriptor = state.descriptors.get(series.metric.type)
        if descriptor is None:
            return self._auto_descriptor(project, index, series, value_type)
        refusal = _descriptor_mismatch(index, series, value_type, descriptor)
        return (None, refusal) if refusal is not None else (descriptor, None)

    @staticmethod
    def _auto_descriptor(
        project: str, index: int, series: Any, value_type: int
    ) -> tuple[Any, _Refusal | None]:
        metric_type = series.metric.type
        kind = series.metric_kind or Descriptor.GAUGE
        if kind not in _USER_KINDS:
            # [RPC] TimeSeries.metric_kind: for an auto-created descriptor "must be either
            # GAUGE (the default) or CUMULATIVE". Message not seen from the real API.
            return None, _Refusal(
                f"Field timeSeries[{index}].metricKind had an invalid value of "
                f'"{Kind.Name(kind)}": an auto-created metric must be GAUGE or CUMULATIVE.'
            )
        if value_type == Descriptor.BOOL and kind != Descriptor.GAUGE:
            return None, _Refusal(f"Field timeSeries[{index}]: a BOOL metric must be a GAUGE.")
        for label_key in sorted(series.metric.labels):
            if not _LABEL_KEY.fullmatch(label_key):
                return None, _Refusal(
                    f"Field timeSeries[{index}].metric.labels had an invalid value of "
                    f'"{label_key}": Label key contains invalid characters.'
                )
        descriptor = Descriptor(
            name=f"projects/{project}/metricDescriptors/{metric_type}",
            type=metric_type,
            metric_kind=kind,
            value_type=value_type,
            unit=series.unit,
            # The description of an auto-created descriptor seen from the real API
            # (google/exposure-notifications-verification-server#1064).
            description=series.description or "Auto-created custom metric.",
            monitored_resource_types=sorted(WRITABLE_RESOURCES),
        )
        for label_key in sorted(series.metric.labels):
            descriptor.labels.add(key=label_key)
        return descriptor, None

    def _history_problem(
        self, index: int, stored: _Series | None, point: Any, descriptor: Any
    ) -> _Refusal | None:
        """The rules that compare a point with the last one written to its series."""
        if stored is None or not stored.points:
            return None
        last = stored.points[-1]
        end = _ns(point.interval.end_time)
        start = _ns(point.interval.start_time) if point.interval.HasField("start_time") else end
        if end <= last.end_ns:
            # [RPC] CreateTimeSeriesRequest.time_series: "The new data point must be more recent
            # than any other point in its time series." Real message (module docstring).
            return _Refusal(
                "Points must be written in order. One or more of the points specified had an "
                "older end time than the most recent point."
            )
        if end - last.end_ns < self._min_gap_ns:
            # [QUOTAS]: end times at least 5 seconds apart. Real message; the summary counts it
            # as FAILED_PRECONDITION (module docstring).
            return _Refusal(
                "One or more points were written more frequently than the maximum sampling "
                "period configured for the metric.",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        if descriptor.metric_kind == Descriptor.CUMULATIVE and start != last.start_ns:
            if start < last.start_ns:
                # [RPC] TimeInterval, CUMULATIVE: "subsequent points specifying the same start
                # time". Real message (module docstring).
                return _Refusal(
                    "Points must be written in order. One or more of the points specified had "
                    "an older start time than the most recent point."
                )
            if start < last.end_ns + _MS:
                # [RPC] TimeInterval: after a reset "The new start time must be at least a
                # millisecond after the end time of the previous interval." Message not seen
                # from the real API.
                return _Refusal(
                    f"Field timeSeries[{index}].points[0].interval.start_time had an invalid "
                    f'value of "{_rfc3339(start)}": a reset of the cumulative metric '
                    f"'{descriptor.type}' must start at least a millisecond after the end time "
                    f"({_rfc3339(last.end_ns)}) of the previous point."
                )
        return None

    @staticmethod
    def _store(state: _Project, key: _SeriesKey, series: Any, point: Any, descriptor: Any) -> None:
        metric_type = series.metric.type
        stored_descriptor = state.descriptors.get(metric_type)
        if stored_descriptor is None:
            state.descriptors[metric_type] = descriptor
        else:
            # [RPC] TimeSeries.unit: "This field can only be changed through CreateTimeSeries
            # when it is empty"; TimeSeries.description: "Once set, this field cannot be changed
            # through CreateTimeSeries."
            if series.unit and not stored_descriptor.unit:
                stored_descriptor.unit = series.unit
            if series.description and not stored_descriptor.description:
                stored_descriptor.description = series.description
        end = _ns(point.interval.end_time)
        start = _ns(point.interval.start_time) if point.interval.HasField("start_time") else end
        target = state.series.get(key)
        if target is None:
            target = state.series[key] = _Series(key[0], key[1], key[2], key[3])
        target.points.append(_Point(start, end, _copy(point.value)))

    # -- reading time series ------------------------------------------------------------------

    def list_time_series(self, request: Any) -> Any:
        project = self._project_of(request.name)
        predicate = compile_filter(
            request.filter,
            allowed=("metric.type", "resource.type", "metric.labels", "resource.labels"),
        )
        metric_type = predicate.single_metric_type
        if metric_type is None:
            # [RPC] ListTimeSeriesRequest.filter: "The filter must specify a single metric type".
            raise _invalid(
                f'Field filter had an invalid value of "{request.filter}": the filter must '
                'specify a single metric type (metric.type = "...").'
            )
        if request.order_by:
            # [RPC] order_by: "Unsupported: must be left blank."
            raise _invalid("Field orderBy had an invalid value: it must be left blank.")
        if _aggregates(request.aggregation) or request.HasField("secondary_aggregation"):
            raise RpcError(
                grpc.StatusCode.UNIMPLEMENTED,
                "Aggregation in ListTimeSeries is not modelled by this test server.",
            )
        if not request.HasField("interval") or not request.interval.HasField("end_time"):
            # [RPC] ListTimeSeriesRequest.interval and TimeInterval.end_time: "Required."
            raise _invalid("Field interval.endTime is required.")
        end = _ns(request.interval.end_time)
        start = _ns(request.interval.start_time) if request.interval.HasField("start_time") else end
        if start > end:
            # [RPC] TimeInterval.start_time: "The start time must not be later than the end time."
            raise _invalid("Field interval.startTime must not be later than interval.endTime.")
        headers = request.view == metric_service.ListTimeSeriesRequest.TimeSeriesView.HEADERS
        with self._lock:
            state = self._state(project)
            descriptor = state.descriptors.get(metric_type)
            found = []
            for series in state.series.values():
                if not predicate(_Subject.of(series)):
                    continue
                # [RPC] interval: "Only time series that contain data points in the specified
                # interval are included"; reads are (start, end], a single instant when the
                # start is left out ([RPC] TimeInterval).
                points = [
                    p for p in series.points if start < p.end_ns <= end or p.end_ns == start == end
                ]
                if points:
                    found.append(_listed(series, points, descriptor, headers=headers))
        size = request.page_size if 0 < request.page_size <= MAX_SERIES_PAGE else MAX_SERIES_PAGE
        scope = f"{project}|{request.filter}|{start}|{end}|{request.view}"
        first = _page_start(request.page_token, scope=scope)
        # A page holds whole series up to ``size`` points ([RPC]: "If view is set to FULL, this
        # is the maximum number of Points returned"; for HEADERS, series). Unlike the real API a
        # series is never split across pages; a page holds at least one.
        taken = 0
        last = first
        while last < len(found):
            weight = 1 if headers else len(found[last].points)
            if taken and taken + weight > size:
                break
            taken += weight
            last += 1
        response = _ListTimeSeriesResponse()
        response.time_series.extend(found[first:last])
        response.unit = descriptor.unit if descriptor is not None else ""
        if last < len(found):
            response.next_page_token = _page_token(last, scope=scope)
        return response

    # -- test helpers -------------------------------------------------------------------------

    def series(
        self, project: str, metric_type: str, resource_type: str | None = None
    ) -> list[WrittenSeries]:
        """The time series of ``metric_type`` in ``project`` (``"p"`` or ``"projects/p"``), in
        creation order, with their points oldest first -- read from memory, not through the
        API."""
        project = project.removeprefix("projects/")
        with self._lock:
            state = self._projects.get(project, _Project())
            return [
                WrittenSeries(
                    dict(series.metric_labels),
                    dict(series.resource_labels),
                    [
                        WrittenPoint(
                            _datetime(p.start_ns), _datetime(p.end_ns), _typed_value(p.value)
                        )
                        for p in series.points
                    ],
                )
                for series in state.series.values()
                if series.metric_type == metric_type
                and (resource_type is None or series.resource_type == resource_type)
            ]

    def descriptor(self, project: str, metric_type: str) -> Any:
        """A copy of the stored ``MetricDescriptor`` (raw protobuf), or ``None``."""
        project = project.removeprefix("projects/")
        with self._lock:
            stored = self._projects.get(project, _Project()).descriptors.get(metric_type)
            return None if stored is None else _copy(stored)


def _shape_problem(
    index: int, series: Any, key: _SeriesKey, seen: set[_SeriesKey]
) -> _Refusal | None:
    """The checks on a series' metric type, point count and identity within the request."""
    metric_type = series.metric.type
    problem = _metric_type_problem(metric_type)
    if problem:
        return _Refusal(
            f"Field timeSeries[{index}].metric.type had an invalid value of "
            f'"{metric_type}": {problem}'
        )
    if len(series.points) != 1:
        # [RPC] TimeSeries.points: "When creating a time series, this field must contain
        # exactly one point" (the real message is for two or more; none gets the same).
        return _Refusal(
            f"Field timeSeries[{index}].points had an invalid value: Only one point can be "
            "written per TimeSeries per request."
        )
    if key in seen:
        # [RPC] CreateTimeSeriesRequest.time_series: "Adds at most one data point to each of
        # several time series"; the first occurrence is written (module docstring).
        return _Refusal(
            f"Field timeSeries[{index}] had an invalid value: Duplicate TimeSeries "
            "encountered. Only one point can be written per TimeSeries per request."
        )
    seen.add(key)
    return None


def _value_type_of(index: int, series: Any, point: Any) -> tuple[int, _Refusal | None]:
    """The value type of the series' point, or why it cannot be written."""
    field_name = point.value.WhichOneof("value")
    value_type = _VALUE_FIELDS.get(field_name or "", Descriptor.VALUE_TYPE_UNSPECIFIED)
    if value_type not in _USER_VALUE_TYPES:
        # [RPC] TimeSeries.points: the point's type "must be BOOL, INT64, DOUBLE, or
        # DISTRIBUTION" for user-defined metrics. Message not seen from the real API.
        return value_type, _Refusal(
            f"Field timeSeries[{index}].points[0].value had an invalid value of "
            f'"{ValueType.Name(value_type)}": the value of a user-defined metric must be BOOL, '
            "INT64, DOUBLE or DISTRIBUTION."
        )
    if series.value_type and series.value_type != value_type:
        # [RPC] TimeSeries.value_type: "If present, it must be the same as the type of the
        # data in the points field." Message not seen from the real API.
        return value_type, _Refusal(
            f"Field timeSeries[{index}].valueType had an invalid value of "
            f'"{ValueType.Name(series.value_type)}": the point\'s value is '
            f"{ValueType.Name(value_type)}."
        )
    return value_type, None


def _descriptor_mismatch(
    index: int, series: Any, value_type: int, descriptor: Any
) -> _Refusal | None:
    """Whether the series fits the stored descriptor of its metric type."""
    metric_type = series.metric.type
    if series.metric_kind and series.metric_kind != descriptor.metric_kind:
        # [RPC] TimeSeries.metric_kind: "If present, it must be the same as the metric kind of
        # the associated metric." Real message (module docstring).
        return _Refusal(
            f"Metric kind for metric {metric_type} must be "
            f"{Kind.Name(descriptor.metric_kind)}, but is {Kind.Name(series.metric_kind)}."
        )
    if value_type != descriptor.value_type:
        # [RPC] TimeSeries.points: "the point's type must be the same as the value type of the
        # associated metric". Shaped after the metric-kind message.
        return _Refusal(
            f"Value type for metric {metric_type} must be "
            f"{ValueType.Name(descriptor.value_type)}, but is {ValueType.Name(value_type)}."
        )
    declared = {label.key for label in descriptor.labels}
    undeclared = [
        (position, key)
        for position, key in enumerate(sorted(series.metric.labels))
        if key not in declared
    ]
    if undeclared:
        # Real message (module docstring); the position is the label's in key order.
        position, key = undeclared[0]
        return _Refusal(
            f"Field timeSeries[{index}].metric.labels[{position}] had an invalid value of "
            f'"{key}": Unrecognized metric label.'
        )
    return None


def _span_ns(span: timedelta) -> int:
    return int(span.total_seconds() * _NS)


def _descriptor_not_found(metric_type: str) -> RpcError:
    # The real message ([KCC]; awaited by name in spring-cloud-gcp's integration tests).
    return RpcError(
        grpc.StatusCode.NOT_FOUND, f"Could not find descriptor for metric '{metric_type}'."
    )


def _metric_type_problem(metric_type: str) -> str | None:
    if not metric_type.startswith(USER_DEFINED_PREFIXES):
        # [CREATING]: user-defined metric types live under custom.googleapis.com/ (or
        # external.googleapis.com/). Message not seen from the real API.
        return (
            "only user-defined metric types (custom.googleapis.com/..., "
            "external.googleapis.com/...) can be written."
        )
    path = metric_type.split("/", 1)[1]
    if not _METRIC_PATH.fullmatch(path):
        # Real message (stackdriver-prometheus-sidecar#251, cut short there).
        return "The metric type must be a URL-formatted string with a domain and non-empty path."
    return None


def _conflicts(existing: Any, given: Any) -> bool:
    if existing.metric_kind != given.metric_kind or existing.value_type != given.value_type:
        return True
    kept = {label.key: label.value_type for label in existing.labels}
    return any(kept.get(label.key, label.value_type) != label.value_type for label in given.labels)


def _resource_problem(index: int, resource: Any) -> _Refusal | None:
    resource_type = resource.type
    if resource_type not in WRITABLE_RESOURCES:
        if resource_type in NOT_WRITABLE_RESOURCES:
            return _Refusal(
                f"Metrics cannot be written to {resource_type}. See {_WHICH_RESOURCE} for a list "
                "of writable resource types."
            )
        return _Refusal(f"Unrecognized resource type: {resource_type}.")
    required = WRITABLE_RESOURCES[resource_type]
    missing = [key for key in required if not resource.labels.get(key)]
    if missing:
        # [RESOURCES] each label of the type; real message (module docstring), keys in order.
        listed = " ".join(sorted(missing))
        return _Refusal(f"The set of resource labels is incomplete. Missing labels: ({listed}).")
    for position, label_key in enumerate(sorted(resource.labels)):
        if label_key not in required:
            # Not seen from the real API: shaped after "Unrecognized metric label."; the strict
            # choice for a label the resource type does not have.
            return _Refusal(
                f"Field timeSeries[{index}].resource.labels[{position}] had an invalid value of "
                f'"{label_key}": Unrecognized resource label.'
            )
    return None


def _interval_problem(index: int, point: Any, descriptor: Any, now: int) -> _Refusal | None:
    interval = point.interval
    where = f"Field timeSeries[{index}].points[0].interval"
    if not interval.HasField("end_time"):
        # [RPC] TimeInterval.end_time: "Required."
        return _Refusal(f"{where}.end_time is required.")
    end = _ns(interval.end_time)
    metric = descriptor.type
    if descriptor.metric_kind == Descriptor.GAUGE:
        if interval.HasField("start_time") and _ns(interval.start_time) != end:
            # [RPC] TimeInterval, GAUGE: "If both start and end times are specified, they must
            # be identical." Real message (module docstring).
            given = _rfc3339(_ns(interval.start_time))
            return _Refusal(
                f'{where}.start_time had an invalid value of "{given}": '
                f"The start time must be equal to the end time ({_rfc3339(end)}) for the gauge "
                f"metric '{metric}'."
            )
    else:
        start = _ns(interval.start_time) if interval.HasField("start_time") else end
        if start >= end:
            # [RPC] TimeInterval, CUMULATIVE: "the start time and end time must specify a
            # non-zero interval". Real message (module docstring).
            return _Refusal(
                f'{where}.start_time had an invalid value of "{_rfc3339(start)}": The start '
                f"time must be before the end time ({_rfc3339(end)}) for the non-gauge metric "
                f"'{metric}'."
            )
    if now - end > _span_ns(MAX_AGE):
        # [RPC] TimeInterval: "not be more than 25 hours in the past". Real message shape.
        return _Refusal(
            f'{where}.end_time had an invalid value of "{_rfc3339(end)}": Data points cannot be '
            "written more than approximately 24 hours in the past, specifically no more than "
            f"{_span(_span_ns(MAX_AGE))} in the past. Your data point is {_span(now - end)} "
            "before the present time, which is too far in the past."
        )
    if end - now > _span_ns(MAX_AHEAD):
        # [RPC] TimeInterval: "or more than five minutes in the future". Message not seen from
        # the real API: shaped after the one for the past.
        return _Refusal(
            f'{where}.end_time had an invalid value of "{_rfc3339(end)}": Data points cannot be '
            f"written more than {_span(_span_ns(MAX_AHEAD))} in the future. Your data point is "
            f"{_span(end - now)} after the present time, which is too far in the future."
        )
    return None


def _buckets(options: Any) -> tuple[int, str | None]:
    """The number of buckets ``options`` define, and why they are invalid if they are
    ([RPC] ``google/api/distribution.proto`` BucketOptions)."""
    kind = options.WhichOneof("options")
    fault = None
    if kind == "explicit_buckets":
        bounds = list(options.explicit_buckets.bounds)
        count = len(bounds) + 1
        if not bounds:
            # "The bounds field must contain at least one element." Real message.
            fault = "Distribution |explicit_buckets.bounds| does not have at least one entry."
        elif any(b <= a for a, b in itertools.pairwise(bounds)):
            # "The values must be monotonically increasing." Message not seen from the real API.
            fault = "Distribution |explicit_buckets.bounds| must be strictly increasing."
    elif kind == "linear_buckets":
        linear = options.linear_buckets
        count = linear.num_finite_buckets + 2
        # Linear: num_finite_buckets and width "Must be greater than 0."
        if linear.num_finite_buckets <= 0 or linear.width <= 0:
            fault = "Distribution |linear_buckets| needs num_finite_buckets > 0 and width > 0."
    elif kind == "exponential_buckets":
        exponential = options.exponential_buckets
        count = exponential.num_finite_buckets + 2
        # Exponential: num_finite_buckets > 0, growth_factor > 1, scale > 0.
        if (
            exponential.num_finite_buckets <= 0
            or exponential.growth_factor <= 1
            or exponential.scale <= 0
        ):
            fault = (
                "Distribution |exponential_buckets| needs num_finite_buckets > 0, growth_factor > "
                "1 and scale > 0."
            )
    else:
        # BucketOptions: "Exactly one of these three fields must be set."
        count = 0
        fault = "Distribution |bucket_options| must set one of its three bucket types."
    return count, fault


def _distribution_problem(index: int, point: Any) -> _Refusal | None:
    if point.value.WhichOneof("value") != "distribution_value":
        return None
    why = next(_distribution_faults(point.value.distribution_value), None)
    if why is None:
        return None
    return _Refusal(
        f"Field timeSeries[{index}].points[0].distributionValue had an invalid value: {why}"
    )


def _distribution_faults(value: Any) -> Iterator[str]:
    """What is wrong with a ``Distribution`` ([RPC] ``google/api/distribution.proto``), first
    fault first, in the real API's words where they are known (module docstring)."""
    counts = list(value.bucket_counts)
    if value.count < 0:
        yield f"Distribution |count| of {value.count} is negative."  # "Must be non-negative."
    if value.count == 0 and value.mean != 0:
        # mean: "If count is zero then this field must be zero."
        yield f"Distribution value with |count| of 0 has a non-zero |mean| value of {value.mean!r}."
    if value.count == 0 and value.sum_of_squared_deviation != 0:
        yield (
            "Distribution value with |count| of 0 has a non-zero |sum_of_squared_deviation| value "
            f"of {value.sum_of_squared_deviation!r}."
        )
    if value.count == 0 and value.HasField("range"):
        yield "Distribution value with |count| of 0 has a |range|."  # "must not be present"
    if value.HasField("bucket_options"):
        buckets, fault = _buckets(value.bucket_options)
        if fault is not None:
            yield fault
        if buckets > MAX_BUCKETS:
            yield f"Distribution has {buckets} buckets, more than the {MAX_BUCKETS} allowed."
        if len(counts) > buckets:
            # bucket_counts: "should contain N values, where N is the number of buckets".
            yield (
                f"Distribution value has {len(counts)} |bucket_counts| fields, which is more than "
                f"the {buckets} buckets allowed by the bucketing options."
            )
    elif counts:
        yield "Distribution value has |bucket_counts| but no |bucket_options|."
    for position, count in enumerate(counts):
        if count < 0:
            yield f"Distribution bucket_counts({position}) has a negative count."
    if counts and sum(counts) != value.count:
        # bucket_counts: "the sum of the values in bucket_counts must equal the value in the
        # count field of the distribution" (fewer than N values: "the remaining values are
        # assumed to be 0").
        yield (
            f"Distribution value has |bucket_counts| fields that sum to {sum(counts)} which does "
            f"not equal the |count| field value of {value.count}."
        )


def _partial_failure(
    total: int, written: int, refusals: Sequence[tuple[int, int, _Refusal]]
) -> RpcError:
    """The error a partly written request answers with (module docstring, Partial failure)."""
    by_message: dict[str, list[int]] = {}
    points_by_code: collections.Counter[grpc.StatusCode] = collections.Counter()
    for index, points, refusal in refusals:
        by_message.setdefault(refusal.message, []).append(index)
        points_by_code[refusal.code] += points
    parts = [
        f"timeSeries[{_index_ranges(indices)}]: {text}" for text, indices in by_message.items()
    ]
    message = "One or more TimeSeries could not be written: " + "; ".join(parts)
    summary = _CreateTimeSeriesSummary(total_point_count=total, success_point_count=written)
    for code, points in points_by_code.items():
        error = summary.errors.add(point_count=points)
        error.status.code = _status_number(code)
    detail = any_pb2.Any()
    detail.Pack(summary)
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message, (detail,))


def _listed(series: _Series, points: Sequence[_Point], descriptor: Any, *, headers: bool) -> Any:
    listed = _TimeSeries()
    listed.metric.type = series.metric_type
    listed.metric.labels.update(dict(series.metric_labels))
    listed.resource.type = series.resource_type
    listed.resource.labels.update(dict(series.resource_labels))
    if descriptor is not None:
        listed.metric_kind = descriptor.metric_kind
        listed.value_type = descriptor.value_type
        listed.unit = descriptor.unit
    if not headers:
        # [RPC] TimeSeries.points: "When listing time series, points are returned in reverse
        # time order."
        for stored in sorted(points, key=lambda p: p.end_ns, reverse=True):
            point = listed.points.add()
            point.interval.end_time.CopyFrom(_timestamp(stored.end_ns))
            point.interval.start_time.CopyFrom(_timestamp(stored.start_ns))
            point.value.CopyFrom(stored.value)
    return listed


def _aggregates(aggregation: Any) -> bool:
    return bool(
        aggregation.per_series_aligner
        or aggregation.cross_series_reducer
        or aggregation.group_by_fields
        or aggregation.HasField("alignment_period")
    )


# -- paging -----------------------------------------------------------------------------------


def _page_token(offset: int, *, scope: str) -> str:
    digest = hashlib.sha256(scope.encode()).hexdigest()[:16]
    return base64.urlsafe_b64encode(json.dumps({"at": offset, "scope": digest}).encode()).decode()


def _page_start(token: str, *, scope: str) -> int:
    """Where the page a ``page_token`` asks for starts; a token is only valid with the request
    that produced it."""
    if not token:
        return 0
    try:
        raw = json.loads(base64.urlsafe_b64decode(token.encode()))
        offset, token_scope = int(raw["at"]), str(raw["scope"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise _invalid("Invalid page_token.") from None
    if token_scope != hashlib.sha256(scope.encode()).hexdigest()[:16] or offset < 0:
        raise _invalid("The page_token does not belong to this request.")
    return offset


# -- filters ----------------------------------------------------------------------------------
# [FILTERS], the part tests need: restrictions joined by AND (or juxtaposed), each optionally
# preceded by NOT, of the form ``SELECTOR = VALUE`` or ``SELECTOR != VALUE``. Selectors:
# ``metric.type``, ``resource.type``, ``metric.label.KEY`` / ``metric.labels.KEY``,
# ``resource.label.KEY`` / ``resource.labels.KEY``. Values: a quoted string, or
# ``starts_with("...")``, ``ends_with("...")``, ``has_substring("...")``, ``one_of("a", ...)``.
# Anything else (OR, parentheses, regular expressions, other selectors) is INVALID_ARGUMENT.


@dataclass(frozen=True)
class _Subject:
    """What a filter is evaluated against."""

    metric_type: str
    resource_type: str = ""
    metric_labels: Mapping[str, str] = field(default_factory=dict)
    resource_labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, series: _Series) -> _Subject:
        return cls(
            series.metric_type,
            series.resource_type,
            dict(series.metric_labels),
            dict(series.resource_labels),
        )

    def value(self, selector: str) -> str | None:
        if selector == "metric.type":
            return self.metric_type
        if selector == "resource.type":
            return self.resource_type
        head, _, key = selector.rpartition(".")
        labels = self.metric_labels if head.startswith("metric.") else self.resource_labels
        return labels.get(key)


_TOKEN = re.compile(
    r'\s*(?:(?P<string>"(?:[^"\\]|\\.)*")|(?P<op>!=|=)|(?P<open>\()|(?P<close>\))|(?P<comma>,)'
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_.]*))"
)
_FUNCTIONS: Mapping[str, Callable[[str, Sequence[str]], bool]] = {
    "starts_with": lambda actual, args: actual.startswith(args[0]),
    "ends_with": lambda actual, args: actual.endswith(args[0]),
    "has_substring": lambda actual, args: args[0] in actual,
    "one_of": lambda actual, args: actual in args,
}
_Term = Callable[[_Subject], bool]


class Filter:
    """A compiled filter: call it with a subject; :attr:`single_metric_type` is the exact type
    it requires, if any (ListTimeSeries needs one)."""

    def __init__(self, terms: Sequence[_Term], single_metric_type: str | None) -> None:
        self._terms = tuple(terms)
        self.single_metric_type = single_metric_type

    def __call__(self, subject: _Subject) -> bool:
        return all(term(subject) for term in self._terms)


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if not match or match.end() == position:
            raise _invalid(
                f'Field filter had an invalid value of "{text}": unexpected text at {position}.'
            )
        kind = match.lastgroup or ""
        tokens.append((kind, match[kind]))
        position = match.end()
    return tokens


def compile_filter(text: str, *, allowed: Sequence[str]) -> Filter:
    """Compile a monitoring filter ([FILTERS], the subset above) whose selectors start with one
    of ``allowed`` (``metric.labels`` admits ``metric.label.KEY`` and ``metric.labels.KEY``)."""
    tokens = _tokens(text or "")
    terms: list[_Term] = []
    exact_types: list[str] = []
    position = 0

    def fail(why: str) -> RpcError:
        return _invalid(f'Field filter had an invalid value of "{text}": {why}.')

    def take(kind: str) -> str:
        nonlocal position
        if position >= len(tokens) or tokens[position][0] != kind:
            raise fail(f"expected {kind}")
        position += 1
        return tokens[position - 1][1]

    while position < len(tokens):
        if tokens[position] == ("word", "AND") and terms:
            position += 1
        negate = tokens[position] == ("word", "NOT") if position < len(tokens) else False
        position += negate
        selector = take("word")
        if not _selector_allowed(selector, allowed):
            raise fail(f"unsupported selector {selector}")
        operator = take("op")
        if position < len(tokens) and tokens[position][0] == "word":
            function = take("word")
            if function not in _FUNCTIONS:
                raise fail(f"unknown function {function}")
            take("open")
            args = [json.loads(take("string"))]
            while position < len(tokens) and tokens[position][0] == "comma":
                position += 1
                args.append(json.loads(take("string")))
            take("close")
            test = _FUNCTIONS[function]
        else:
            args = [json.loads(take("string"))]
            test = _FUNCTIONS["one_of"]
            if selector == "metric.type" and operator == "=" and not negate:
                exact_types.append(args[0])
        terms.append(_term(selector, test, args, negate=negate != (operator == "!=")))
    single = exact_types[0] if len(set(exact_types)) == 1 else None
    return Filter(terms, single)


def _selector_allowed(selector: str, allowed: Sequence[str]) -> bool:
    if selector in {"metric.type", "resource.type"}:
        return selector in allowed
    for prefix in ("metric", "resource"):
        for form in (f"{prefix}.label.", f"{prefix}.labels."):
            if selector.startswith(form) and len(selector) > len(form):
                return f"{prefix}.labels" in allowed
    return False


def _term(
    selector: str, test: Callable[[str, Sequence[str]], bool], args: Sequence[str], *, negate: bool
) -> _Term:
    def term(subject: _Subject) -> bool:
        actual = subject.value(selector)
        matched = actual is not None and test(actual, args)
        return matched != negate

    return term


# -- gRPC server ------------------------------------------------------------------------------

_METHODS: dict[str, tuple[str, Any, Any]] = {
    # method: (store attribute, request deserializer, response serializer)
    "CreateMetricDescriptor": (
        "create_metric_descriptor",
        metric_service.CreateMetricDescriptorRequest.pb().FromString,
        metric_pb2.MetricDescriptor.SerializeToString,
    ),
    "GetMetricDescriptor": (
        "get_metric_descriptor",
        metric_service.GetMetricDescriptorRequest.pb().FromString,
        metric_pb2.MetricDescriptor.SerializeToString,
    ),
    "ListMetricDescriptors": (
        "list_metric_descriptors",
        metric_service.ListMetricDescriptorsRequest.pb().FromString,
        metric_service.ListMetricDescriptorsResponse.pb().SerializeToString,
    ),
    "DeleteMetricDescriptor": (
        "delete_metric_descriptor",
        metric_service.DeleteMetricDescriptorRequest.pb().FromString,
        empty_pb2.Empty.SerializeToString,
    ),
    "CreateTimeSeries": (
        "create_time_series",
        _CreateTimeSeriesRequest.FromString,
        empty_pb2.Empty.SerializeToString,
    ),
    "ListTimeSeries": (
        "list_time_series",
        _ListTimeSeriesRequest.FromString,
        _ListTimeSeriesResponse.SerializeToString,
    ),
}
#: The methods served (the rest of ``MetricService`` answers UNIMPLEMENTED).
METHODS = tuple(_METHODS)
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


def make_channel(address: str) -> Any:
    """An insecure gRPC channel to ``address`` (``host:port``)."""
    return grpc.insecure_channel(address)


def make_client(address: str) -> monitoring_v3.MetricServiceClient:
    """The official client over an insecure channel to ``address`` (``host:port``).

    The credentials go to the transport: the client refuses ``credentials=`` together with a
    transport instance, and the transport ignores them when given a channel.
    """
    return client_over(make_channel(address))


def client_over(channel: Any) -> monitoring_v3.MetricServiceClient:
    """The official client over an existing gRPC ``channel`` (closing it is the caller's)."""
    transport = MetricServiceGrpcTransport(channel=channel, credentials=AnonymousCredentials())
    return monitoring_v3.MetricServiceClient(transport=transport)


class MonitoringTestServer(GrpcTestServer):
    """The gRPC server around a :class:`MonitoringStore`; ``start()`` binds a free port of
    127.0.0.1. Counts calls per method (failed calls included) in :attr:`calls`."""

    service = SERVICE

    def __init__(
        self,
        *,
        port: int = 0,
        clock: Callable[[], float] = time.time,
        min_sampling_period: timedelta = MIN_SAMPLING_PERIOD,
        max_workers: int = 16,
    ) -> None:
        super().__init__(port=port, max_workers=max_workers)
        self.store = MonitoringStore(clock=clock, min_sampling_period=min_sampling_period)
        self._lock = threading.Lock()
        self._calls: collections.Counter[str] = collections.Counter()
        self._failures: dict[str, collections.deque[tuple[grpc.StatusCode, str]]] = {}

    # -- test helpers -------------------------------------------------------------------------

    @property
    def calls(self) -> collections.Counter[str]:
        """A snapshot of the calls received so far, by method name (``CreateTimeSeries``)."""
        with self._lock:
            return collections.Counter(self._calls)

    def reset_calls(self) -> None:
        with self._lock:
            self._calls.clear()

    def fail_next(
        self, method: str, code: grpc.StatusCode, times: int = 1, message: str | None = None
    ) -> None:
        """Make the next ``times`` calls of ``method`` (``"CreateTimeSeries"``, one of
        :data:`METHODS`) fail with ``code`` before doing anything; they still count in
        :attr:`calls`."""
        if method not in _METHODS:
            raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
        if times < 1:
            raise ValueError("times must be at least 1")
        text = message or f"Injected by the test server: {code.name}."
        with self._lock:
            self._failures.setdefault(method, collections.deque()).extend([(code, text)] * times)

    def reset(self) -> None:
        """Forget every descriptor, series, call count and pending failure."""
        self.store.reset()
        with self._lock:
            self._calls.clear()
            self._failures.clear()

    def series(
        self, project: str, metric_type: str, resource_type: str | None = None
    ) -> list[WrittenSeries]:
        """See :meth:`MonitoringStore.series`."""
        return self.store.series(project, metric_type, resource_type)

    def descriptor(self, project: str, metric_type: str) -> Any:
        """See :meth:`MonitoringStore.descriptor`."""
        return self.store.descriptor(project, metric_type)

    # -- serving ------------------------------------------------------------------------------

    def _handler(self, method: str, attribute: str) -> Callable[[Any, Any], Any]:
        implementation = getattr(self.store, attribute)

        def handle(request: Any, context: Any) -> Any:
            with self._lock:
                self._calls[method] += 1
                pending = self._failures.get(method)
                injected = pending.popleft() if pending else None
            if injected is not None:
                context.abort(*injected)
            try:
                return implementation(request)
            except RpcError as error:
                if error.details:
                    status = status_pb2.Status(
                        code=_status_number(error.code), message=error.message
                    )
                    status.details.extend(error.details)
                    context.set_trailing_metadata(
                        ((_STATUS_DETAILS_KEY, status.SerializeToString()),)
                    )
                context.abort(error.code, error.message)

        return handle

    def _methods(self) -> dict[str, UnaryMethod]:
        return {
            method: UnaryMethod(self._handler(method, attribute), deserializer, serializer)
            for method, (attribute, deserializer, serializer) in _METHODS.items()
        }

    def client(self) -> monitoring_v3.MetricServiceClient:
        """The official client, connected to this server; closed by :meth:`stop`."""
        return client_over(self._connect(make_channel, _close_channel))


def _close_channel(channel: Any) -> None:
    channel.close()


def main(argv: Iterable[str] | None = None) -> int:
    parser = standalone_parser("A local Cloud Monitoring v3 gRPC server.")
    args = parser.parse_args(None if argv is None else list(argv))
    server = MonitoringTestServer(port=args.port, max_workers=args.max_workers).start()
    announce_and_wait(f"READY {server.address}")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
