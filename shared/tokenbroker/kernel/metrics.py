"""The metrics tokenbroker writes, and the in-memory recorder the hot paths count into.

One catalogue (:data:`CATALOGUE`) names every metric: its type under :data:`PREFIX`, kind,
value type, unit and labels, each label's values bounded (``docs/operations.md`` is generated
from the same list and lists what to do about each). The refresher and the issuer count into
a :class:`Recorder` -- a dict update under a lock, no I/O, no clock read of its own -- and an
exporter (:class:`~tokenbroker.ports.MetricsExporter`; Cloud Monitoring in
:mod:`tokenbroker.adapters.gcp.monitoring`) writes :meth:`Recorder.snapshot` in batches, once
per tick and once per interval, never per request. A metrics failure is logged and counted,
never raised into a refresh or an issue.

Kinds follow Cloud Monitoring's model for user-defined metrics
(https://cloud.google.com/monitoring/api/v3/kinds-and-types): counters and distributions are
``CUMULATIVE`` from the process's start (each process writes its own series: the monitored
resource carries an instance id), state is ``GAUGE``. ``DELTA`` is not offered for
user-defined metrics.

Cardinality: ``connection`` labels exist only on the per-connection gauges, and at most
:data:`DEFAULT_CONNECTION_LIMIT` connections are written per interval -- the failing ones
first, then the nearest expiry -- the fleet gauges cover the rest. Callers' emails are never
labels (the audit log has them).
"""

from __future__ import annotations

import bisect
import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

__all__ = [
    "CATALOGUE",
    "DEFAULT_CONNECTION_LIMIT",
    "LATENCY_BOUNDS_MS",
    "PREFIX",
    "Distribution",
    "Kind",
    "Label",
    "Metric",
    "Recorder",
    "Sample",
    "Snapshot",
    "ValueType",
    "metric",
]

#: Every metric type is ``PREFIX + name`` (user-defined metrics live under custom.googleapis.com).
PREFIX = "custom.googleapis.com/tokenbroker/"
#: Connections written per interval on the per-connection gauges (failing first, then the
#: nearest expiry); the fleet gauges cover all of them.
DEFAULT_CONNECTION_LIMIT = 200


class Kind(enum.StrEnum):
    GAUGE = "GAUGE"
    CUMULATIVE = "CUMULATIVE"


class ValueType(enum.StrEnum):
    INT64 = "INT64"
    DOUBLE = "DOUBLE"
    DISTRIBUTION = "DISTRIBUTION"


@dataclass(frozen=True)
class Label:
    key: str
    description: str
    #: The values the label may take (``None``: bounded otherwise, as documented).
    values: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Kind
    value_type: ValueType
    unit: str
    description: str
    labels: tuple[Label, ...] = ()

    @property
    def type(self) -> str:
        return PREFIX + self.name

    @property
    def label_keys(self) -> tuple[str, ...]:
        return tuple(label.key for label in self.labels)


REFRESH_OUTCOMES = (
    "rotated",  # a new access token stored (and the refresh token, when it rotated)
    "transient",  # failed, will be retried after a backoff
    "permanent",  # refused for good: the connection needs re-authorisation
    "internal",  # a bug or a value no rule foresaw: retried, alerted apart
    "deferred",  # not attempted: lease too short, or a token-endpoint budget spent
    "skipped_leased",  # another refresher held the lease
    "unknown_outcome",  # presented, no answer: the refresh token may be spent (at risk)
    "quota_deferred",  # claimed, given back: the store's request quota was spent
)
ISSUER_OUTCOMES = (
    "issued",
    "cache_hit",
    "unauthenticated",
    "denied",
    "bad_request",
    "refused",
    "unavailable",
    "error",
)
#: ``fleet/connections`` statuses: the connection statuses, with the active connections whose
#: last refresh outcome is unknown counted apart (``at_risk``: served until shortly before
#: expiry, then presented once more).
CONNECTION_STATUSES = ("active", "at_risk", "needs_reauth", "disabled")
#: Upper bounds (ms) of the latency distributions' buckets; one more bucket for above.
LATENCY_BOUNDS_MS: tuple[float, ...] = (
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 30_000,
)  # fmt: skip

_CONNECTION = Label("connection", "Connection id (at most the connection limit per interval).")
_PROVIDER = Label("provider", "Provider profile of the connection (profiles.toml names).")
_GRANT = Label("grant", "Grant used to acquire the token.", ("refresh_token",
               "client_credentials", "jwt_bearer", "impersonation", "static"))  # fmt: skip

CATALOGUE: tuple[Metric, ...] = (
    Metric("refresh/ticks", Kind.CUMULATIVE, ValueType.INT64, "1",
           "Refresh ticks run (an absent series means the refresher stopped).",
           (Label("result", "How the tick ended.", ("ok", "failed")),)),
    Metric("refresh/outcomes", Kind.CUMULATIVE, ValueType.INT64, "1",
           "Refresh outcomes by class.",
           (Label("outcome", "What the refresh came to.", REFRESH_OUTCOMES),)),
    Metric("refresh/quota_limited_ticks", Kind.CUMULATIVE, ValueType.INT64, "1",
           "Refresh ticks in which the credential store's request quota held refreshes back: "
           "the claim was capped at what one quota window carries (more may be due), or "
           "claims were given back (quota_deferred)."),
    Metric("refresh/acquisition_latency", Kind.CUMULATIVE, ValueType.DISTRIBUTION, "ms",
           "Time from sending a token request to its answer.", (_PROVIDER, _GRANT)),
    Metric("connection/consecutive_failures", Kind.GAUGE, ValueType.INT64, "1",
           "Consecutive failed refreshes of a connection.", (_CONNECTION,)),
    Metric("connection/seconds_to_expiry", Kind.GAUGE, ValueType.DOUBLE, "s",
           "Seconds until a connection's current access token expires.", (_CONNECTION,)),
    Metric("fleet/connections", Kind.GAUGE, ValueType.INT64, "1",
           "Connections by status.",
           (Label("status", "Connection status.", CONNECTION_STATUSES),)),
    Metric("fleet/min_seconds_to_expiry", Kind.GAUGE, ValueType.DOUBLE, "s",
           "The least seconds to expiry over active connections."),
    Metric("fleet/outage_budget_seconds", Kind.GAUGE, ValueType.DOUBLE, "s",
           "How long consumers keep working if the broker stopped now: the earliest expiry "
           "among the access tokens consumers can hold (active connections)."),
    Metric("issuer/decisions", Kind.CUMULATIVE, ValueType.INT64, "1",
           "Issuer decisions by outcome.",
           (Label("outcome", "The decision.", ISSUER_OUTCOMES),)),
    Metric("issuer/latency", Kind.CUMULATIVE, ValueType.DISTRIBUTION, "ms",
           "Time the issuer took to decide and answer.",
           (Label("outcome", "The decision.", ISSUER_OUTCOMES),)),
)  # fmt: skip

_BY_NAME = {m.name: m for m in CATALOGUE}


def metric(name: str) -> Metric:
    """The catalogue's metric ``name`` (``KeyError`` for an unknown one: a bug)."""
    return _BY_NAME[name]


@dataclass
class Distribution:
    """Counts per bucket of :data:`LATENCY_BOUNDS_MS` (explicit buckets), with the count, mean
    and sum of squared deviation Cloud Monitoring's ``Distribution`` carries."""

    bounds: tuple[float, ...] = LATENCY_BOUNDS_MS
    counts: list[int] = field(default_factory=list)
    count: int = 0
    mean: float = 0.0
    sum_of_squared_deviation: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def add(self, value: float) -> None:
        if not math.isfinite(value) or value < 0:
            return  # a clock step: not a latency
        # Bucket i holds [bounds[i-1], bounds[i]): a value on a bound belongs above it.
        self.counts[bisect.bisect_right(self.bounds, value)] += 1
        # Welford's update: the API's mean and sum of squared deviation without the values.
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.sum_of_squared_deviation += delta * (value - self.mean)

    def copy(self) -> Distribution:
        return Distribution(
            self.bounds, list(self.counts), self.count, self.mean, self.sum_of_squared_deviation
        )


Value = int | float | Distribution


@dataclass(frozen=True)
class Sample:
    """One series' value: the metric, its label values (in the metric's label order), the value."""

    metric: Metric
    labels: tuple[str, ...]
    value: Value

    def label_map(self) -> dict[str, str]:
        return dict(zip(self.metric.label_keys, self.labels, strict=True))


@dataclass(frozen=True)
class Snapshot:
    """What a recorder holds at ``at``; cumulative samples count from ``start``."""

    start: datetime
    at: datetime
    samples: tuple[Sample, ...]


class Recorder:
    """Counters, distributions and gauges in memory, for one thread: the event loop records
    and takes snapshots (no lock: a dict update costs the issuer's hot path ~0.2 µs). Only
    the exporter's write runs in a worker thread, on the snapshot's copies. ``start`` is when
    cumulative counts began (the process's start)."""

    def __init__(self, start: datetime) -> None:
        self.start = start
        self._counters: dict[tuple[str, tuple[str, ...]], int] = {}
        self._distributions: dict[tuple[str, tuple[str, ...]], Distribution] = {}
        self._gauges: dict[str, dict[tuple[str, ...], int | float]] = {}

    def count(self, name: str, *labels: str, by: int = 1) -> None:
        key = (name, labels)
        self._counters[key] = self._counters.get(key, 0) + by

    def observe(self, name: str, value: float, *labels: str) -> None:
        key = (name, labels)
        found = self._distributions.get(key)
        if found is None:
            found = self._distributions[key] = Distribution()
        found.add(value)

    def gauges(self, name: str, values: Mapping[tuple[str, ...], int | float]) -> None:
        """Replace every series of gauge ``name`` by ``values`` (label values -> value): a
        gauge reports the state now, and a series no longer reported is no longer written."""
        metric(name)  # a name outside the catalogue is a bug, found here rather than at export
        self._gauges[name] = dict(values)

    def gauge(self, name: str, value: int | float | None) -> None:
        """A gauge without labels; ``None`` stops writing it (nothing to report)."""
        self.gauges(name, {} if value is None else {(): value})

    def snapshot(self, at: datetime) -> Snapshot:
        samples = [
            *(Sample(metric(n), ls, v) for (n, ls), v in self._counters.items()),
            *(Sample(metric(n), ls, d.copy()) for (n, ls), d in self._distributions.items()),
            *(Sample(metric(n), ls, v) for n, series in self._gauges.items()
              for ls, v in series.items()),
        ]  # fmt: skip
        return Snapshot(self.start, at, tuple(samples))


def validate(samples: Iterable[Sample]) -> Sequence[str]:
    """Problems with ``samples`` against the catalogue (label count and allowed values)."""
    problems = []
    for sample in samples:
        m = sample.metric
        if len(sample.labels) != len(m.labels):
            problems.append(f"{m.name}: {len(sample.labels)} label values for {m.label_keys}")
            continue
        for label, value in zip(m.labels, sample.labels, strict=True):
            if label.values is not None and value not in label.values:
                problems.append(f"{m.name}: {label.key}={value!r} is not one of {label.values}")
    return problems
