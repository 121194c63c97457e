"""Cloud Monitoring: the :class:`~tokenbroker.ports.MetricsExporter` port, on the official
``google-cloud-monitoring`` client (``monitoring_v3``), imported at the first write -- never on
the cold-start path.

What the API asks of a writer (https://cloud.google.com/monitoring/custom-metrics/creating-metrics,
https://cloud.google.com/monitoring/quotas, the ``CreateTimeSeries`` reference
https://cloud.google.com/monitoring/api/ref_v3/rpc/google.monitoring.v3#google.monitoring.v3.MetricService.CreateTimeSeries):

* at most 200 time series per request, each with exactly one point: a snapshot is sent in
  chunks of :data:`MAX_SERIES_PER_REQUEST`;
* points of one series in time order, and not more often than one every
  :data:`MIN_SECONDS_BETWEEN_POINTS` (the documented rate for user-defined metrics): a series
  written less than that long ago is left out of this write (the next one carries its newer
  value; a cumulative count loses nothing);
* ``CUMULATIVE`` points carry the start of the count (the process's start, the recorder's
  ``start``), strictly before their end; ``GAUGE`` points only an end;
* every series names its monitored resource: ``generic_task`` (project_id, location,
  namespace, job, task_id), one of the types user-defined metrics may be written against
  (https://cloud.google.com/monitoring/custom-metrics#which-resource); the ``task_id`` is the
  instance's own, so the cumulative series of two instances never collide.

Metric descriptors are created once per exporter, before the first write (creating an
existing one with the same definition succeeds); a write that fails is one
:class:`~tokenbroker.kernel.errors.TokenBrokerError` for the caller to log, and the series it
carried are tried again with the next snapshot.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from tokenbroker.adapters.gcp.errors import translate
from tokenbroker.kernel.errors import TokenBrokerError
from tokenbroker.kernel.metrics import (
    Distribution,
    Kind,
    Metric,
    Sample,
    Snapshot,
    ValueType,
)

__all__ = [
    "MAX_SERIES_PER_REQUEST",
    "MIN_SECONDS_BETWEEN_POINTS",
    "CloudMonitoringExporter",
    "make_client",
]

MAX_SERIES_PER_REQUEST = 200
MIN_SECONDS_BETWEEN_POINTS = 5.0
#: Seconds a write may take before it is given up (the refresher's answer waits for it).
WRITE_TIMEOUT = 10.0
RESOURCE_TYPE = "generic_task"
RESOURCE_LABELS = ("project_id", "location", "namespace", "job", "task_id")


def make_client(endpoint: str | None = None) -> Any:
    """The official ``MetricServiceClient``: the real service with Application Default
    Credentials, or, given ``endpoint`` (``host:port`` of a test server), an insecure channel."""
    from google.cloud import monitoring_v3  # noqa: PLC0415 - heavy, lazily

    if not endpoint:
        return monitoring_v3.MetricServiceClient()
    import grpc  # noqa: PLC0415
    from google.auth.credentials import AnonymousCredentials  # noqa: PLC0415
    from google.cloud.monitoring_v3.services.metric_service.transports import (  # noqa: PLC0415
        MetricServiceGrpcTransport,
    )

    channel = grpc.insecure_channel(endpoint)
    transport = MetricServiceGrpcTransport(channel=channel, credentials=AnonymousCredentials())
    return monitoring_v3.MetricServiceClient(transport=transport)


class CloudMonitoringExporter:
    """Writes snapshots as ``generic_task`` series of ``project``; ``resource`` holds the
    other labels of the resource (location, namespace, job, task_id)."""

    def __init__(
        self,
        *,
        project: str,
        resource: Mapping[str, str],
        endpoint: str | None = None,
        client: Any = None,
    ) -> None:
        missing = [k for k in RESOURCE_LABELS if k != "project_id" and not resource.get(k)]
        if missing:
            raise ValueError(f"generic_task resource without {', '.join(missing)}")
        self.project = project
        self.resource = {"project_id": project, **{k: resource[k] for k in RESOURCE_LABELS[1:]}}
        self._endpoint = endpoint
        self._client = client
        self._lock = threading.Lock()
        self._described: set[str] = set()
        #: When each series (metric type, label values) was last written.
        self._written: dict[tuple[str, tuple[str, ...]], datetime] = {}
        #: Writes refused or failed, and series left out for the sampling rate.
        self.failures = 0
        self.deferred = 0

    def close(self) -> None:
        client, self._client = self._client, None
        transport = getattr(client, "transport", None)
        if transport is not None:
            transport.close()

    def _opened(self) -> Any:
        if self._client is None:
            self._client = make_client(self._endpoint)
        return self._client

    def write(self, snapshot: Snapshot) -> None:
        with self._lock:  # one write at a time: the series' order depends on it
            try:
                self._write(snapshot)
            except TokenBrokerError:
                self.failures += 1
                raise
            except Exception as error:  # noqa: BLE001 - no credentials (google.auth), a client
                self.failures += 1  # that cannot be built: a clear error, not a traceback
                raise translate(error, "Cloud Monitoring") from None

    def _write(self, snapshot: Snapshot) -> None:
        from google.cloud import monitoring_v3  # noqa: PLC0415

        client = self._opened()
        self._describe(client, {s.metric for s in snapshot.samples})
        due: list[Sample] = []
        for sample in snapshot.samples:
            last = self._written.get((sample.metric.type, sample.labels))
            if last is not None and snapshot.at - last < timedelta(
                seconds=MIN_SECONDS_BETWEEN_POINTS
            ):
                self.deferred += 1
                continue
            due.append(sample)
        for start in range(0, len(due), MAX_SERIES_PER_REQUEST):
            chunk = due[start : start + MAX_SERIES_PER_REQUEST]
            series = [self._series(monitoring_v3, s, snapshot) for s in chunk]
            try:
                client.create_time_series(
                    name=f"projects/{self.project}", time_series=series, timeout=WRITE_TIMEOUT
                )
            except Exception as error:  # noqa: BLE001 - google.api_core's, translated
                raise translate(error, "Cloud Monitoring write") from None
            for sample in chunk:
                self._written[(sample.metric.type, sample.labels)] = snapshot.at

    def _describe(self, client: Any, metrics: set[Metric]) -> None:
        from google.api import label_pb2, metric_pb2  # noqa: PLC0415

        for m in sorted(metrics - {m for m in metrics if m.type in self._described},
                        key=lambda m: m.name):  # fmt: skip
            descriptor = metric_pb2.MetricDescriptor(
                type=m.type,
                metric_kind=metric_pb2.MetricDescriptor.MetricKind.Value(m.kind.value),
                value_type=metric_pb2.MetricDescriptor.ValueType.Value(m.value_type.value),
                unit=m.unit,
                description=m.description,
                display_name=f"tokenbroker {m.name}",
                labels=[
                    label_pb2.LabelDescriptor(key=label.key, description=label.description)
                    for label in m.labels
                ],
            )
            try:
                client.create_metric_descriptor(
                    name=f"projects/{self.project}",
                    metric_descriptor=descriptor,
                    timeout=WRITE_TIMEOUT,
                )
            except Exception as error:  # noqa: BLE001
                found = translate(error, f"Cloud Monitoring descriptor {m.name}")
                if found.code != "already_exists":
                    raise found from None
            self._described.add(m.type)

    def _series(self, monitoring_v3: Any, sample: Sample, snapshot: Snapshot) -> Any:
        m = sample.metric
        end = snapshot.at
        interval: dict[str, Any] = {"end_time": end}
        if m.kind is Kind.CUMULATIVE:
            start = snapshot.start
            if start >= end:  # the API wants start strictly before end
                start = end - timedelta(milliseconds=1)
            interval["start_time"] = start
        return monitoring_v3.TimeSeries(
            metric={"type": m.type, "labels": sample.label_map()},
            resource={"type": RESOURCE_TYPE, "labels": self.resource},
            metric_kind=m.kind.value,
            value_type=m.value_type.value,
            unit=m.unit,
            points=[{"interval": interval, "value": _value(m, sample.value)}],
        )


def _value(m: Metric, value: int | float | Distribution) -> dict[str, Any]:
    if m.value_type is ValueType.DISTRIBUTION:
        assert isinstance(value, Distribution)  # noqa: S101 - the catalogue's promise
        return {"distribution_value": _distribution(value)}
    if m.value_type is ValueType.INT64:
        return {"int64_value": int(value)}  # type: ignore[arg-type]
    return {"double_value": float(value)}  # type: ignore[arg-type]


def _distribution(d: Distribution) -> dict[str, Any]:
    return {
        "count": d.count,
        "mean": d.mean if d.count else 0.0,
        "sum_of_squared_deviation": d.sum_of_squared_deviation,
        "bucket_options": {"explicit_buckets": {"bounds": list(d.bounds)}},
        "bucket_counts": list(d.counts),
    }
