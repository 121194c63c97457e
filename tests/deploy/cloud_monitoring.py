"""What Cloud Monitoring accepts, as far as the module's alert policies and dashboard use it.

The metrics the module names are the library's catalogue (``tokenbroker.kernel.metrics``) and
one built-in metric, Cloud Run's request count. For each, its kind, value type and labels; for
each monitored resource, its labels; for each aligner and reducer, the kinds and value types it
is valid for and what it turns them into, as ``google/monitoring/v3/common.proto`` states them
(https://cloud.google.com/monitoring/api/ref_v3/rest/v3/projects.alertPolicies#aligner and
#reducer): ALIGN_RATE and ALIGN_DELTA take CUMULATIVE and DELTA series, ALIGN_MAX, ALIGN_MIN and
ALIGN_MEAN take GAUGE and DELTA numbers, percentiles take distributions, and so on.

:func:`parse_filter` reads the monitoring filters the module writes -- ``metric.type``,
``resource.type`` and label equalities joined by ``AND``
(https://cloud.google.com/monitoring/api/v3/filters) -- and refuses anything else, so a filter
the checks cannot read fails instead of passing unread.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenbroker.kernel import metrics

NUMERIC = frozenset({"INT64", "DOUBLE"})
DISTRIBUTION = frozenset({"DISTRIBUTION"})
ANY_VALUE = NUMERIC | DISTRIBUTION | {"BOOL", "STRING"}


@dataclass(frozen=True)
class MetricInfo:
    type: str
    kind: str  # GAUGE, DELTA, CUMULATIVE
    value_type: str  # INT64, DOUBLE, DISTRIBUTION, ...
    labels: frozenset[str]
    resource: str  # the monitored resource type its series are written against


#: Monitored resources' labels
#: (https://cloud.google.com/monitoring/api/resources#tag_generic_task, #tag_cloud_run_revision).
RESOURCE_LABELS: Mapping[str, frozenset[str]] = {
    "generic_task": frozenset({"project_id", "location", "namespace", "job", "task_id"}),
    "cloud_run_revision": frozenset(
        {"project_id", "service_name", "revision_name", "location", "configuration_name"}
    ),
}

#: Built-in metrics the module names, documented in the metrics list
#: (https://cloud.google.com/monitoring/api/metrics_gcp#gcp-run): the number of requests that
#: reached a revision, by response code and class ("2xx", "5xx", ...).
BUILT_IN: Mapping[str, MetricInfo] = {
    "run.googleapis.com/request_count": MetricInfo(
        "run.googleapis.com/request_count",
        "DELTA",
        "INT64",
        frozenset({"response_code", "response_code_class", "route"}),
        "cloud_run_revision",
    ),
}


def catalogue() -> dict[str, MetricInfo]:
    """The library's metrics, written against generic_task (docs/operations.md, Metrics)."""
    return {
        m.type: MetricInfo(
            m.type, m.kind.value, m.value_type.value, frozenset(m.label_keys), "generic_task"
        )
        for m in metrics.CATALOGUE
    }


def known_metrics() -> dict[str, MetricInfo]:
    return {**catalogue(), **BUILT_IN}


@dataclass(frozen=True)
class Operation:
    """An aligner or reducer: the kinds and value types it takes, and what it makes of them
    (``None``: unchanged)."""

    kinds: frozenset[str]
    value_types: frozenset[str]
    kind_out: str | None = None
    value_out: str | None = None


def _op(
    kinds: str, values: frozenset[str], kind_out: str | None = None, value_out: str | None = None
) -> Operation:
    return Operation(frozenset(kinds.split()), values, kind_out, value_out)


ALIGNERS: Mapping[str, Operation] = {
    "ALIGN_DELTA": _op("CUMULATIVE DELTA", NUMERIC | DISTRIBUTION, "DELTA"),
    "ALIGN_RATE": _op("CUMULATIVE DELTA", NUMERIC, "GAUGE", "DOUBLE"),
    "ALIGN_INTERPOLATE": _op("GAUGE", NUMERIC),
    "ALIGN_NEXT_OLDER": _op("GAUGE", ANY_VALUE),
    "ALIGN_MIN": _op("GAUGE DELTA", NUMERIC),
    "ALIGN_MAX": _op("GAUGE DELTA", NUMERIC),
    "ALIGN_MEAN": _op("GAUGE DELTA", NUMERIC, value_out="DOUBLE"),
    "ALIGN_COUNT": _op("GAUGE DELTA", NUMERIC | {"BOOL"}, value_out="INT64"),
    "ALIGN_SUM": _op("GAUGE DELTA", NUMERIC | DISTRIBUTION),
    "ALIGN_STDDEV": _op("GAUGE DELTA", NUMERIC, value_out="DOUBLE"),
    **{
        f"ALIGN_PERCENTILE_{p}": _op("GAUGE DELTA", DISTRIBUTION, "GAUGE", "DOUBLE")
        for p in ("99", "95", "50", "05")
    },
}

REDUCERS: Mapping[str, Operation] = {
    "REDUCE_MEAN": _op("GAUGE DELTA", NUMERIC | DISTRIBUTION, value_out="DOUBLE"),
    "REDUCE_MIN": _op("GAUGE DELTA", NUMERIC),
    "REDUCE_MAX": _op("GAUGE DELTA", NUMERIC),
    "REDUCE_SUM": _op("GAUGE DELTA", NUMERIC | DISTRIBUTION),
    "REDUCE_STDDEV": _op("GAUGE DELTA", NUMERIC | DISTRIBUTION, value_out="DOUBLE"),
    "REDUCE_COUNT": _op("GAUGE DELTA", ANY_VALUE, value_out="INT64"),
    **{
        f"REDUCE_PERCENTILE_{p}": _op("GAUGE DELTA", NUMERIC | DISTRIBUTION, value_out="DOUBLE")
        for p in ("99", "95", "50", "05")
    },
}


@dataclass(frozen=True)
class Filter:
    metric_type: str
    resource_type: str | None
    metric_labels: dict[str, str] = field(default_factory=dict)
    resource_labels: dict[str, str] = field(default_factory=dict)


_CLAUSE = re.compile(
    r'(?P<what>metric|resource)\.(?:type|labels?\.(?P<label>[a-z_][a-z0-9_]*))\s*=\s*"(?P<value>[^"]*)"'
)


def parse_filter(text: str) -> Filter:
    """``metric.type = "..." AND resource.type = "..." AND metric.label.k = "v" ...``."""
    metric_type = resource_type = None
    metric_labels: dict[str, str] = {}
    resource_labels: dict[str, str] = {}
    for clause in re.split(r"\s+AND\s+", text.strip()):
        match = _CLAUSE.fullmatch(clause.strip())
        assert match, f"a filter clause the checks cannot read: {clause!r} in {text!r}"
        what, label, value = match["what"], match["label"], match["value"]
        if label is None:
            if what == "metric":
                assert metric_type is None, text
                metric_type = value
            else:
                assert resource_type is None, text
                resource_type = value
        else:
            labels = metric_labels if what == "metric" else resource_labels
            assert label not in labels, text
            labels[label] = value
    assert metric_type, f"no metric.type in {text!r}"
    return Filter(metric_type, resource_type, metric_labels, resource_labels)


def seconds(duration: str) -> int:
    """A protobuf Duration's JSON form, whole seconds (``"300s"``)."""
    match = re.fullmatch(r"([0-9]+)s", duration)
    assert match, f"not a duration in whole seconds: {duration!r}"
    return int(match[1])


def label_problems(where: str, info: MetricInfo, query: Filter) -> list[str]:
    problems = []
    if query.resource_type != info.resource:
        problems.append(
            f"{where}: {info.type} is written on {info.resource}, not {query.resource_type}"
        )
    problems += [
        f"{where}: {info.type} has no label {label!r}"
        for label in query.metric_labels
        if label not in info.labels
    ]
    problems += [
        f"{where}: {info.resource} has no label {label!r}"
        for label in query.resource_labels
        if label not in RESOURCE_LABELS.get(info.resource, frozenset())
    ]
    return problems


def _apply(
    where: str, name: str, table: Mapping[str, Operation], kind: str, value: str
) -> tuple[list[str], str, str]:
    """One aligner or reducer on a (kind, value type): its problems and what it produces."""
    operation = table.get(name)
    if operation is None:
        return [f"{where}: unknown {name}"], kind, value
    if kind not in operation.kinds or value not in operation.value_types:
        return [f"{where}: {name} is not valid for {kind} {value}"], kind, value
    return [], operation.kind_out or kind, operation.value_out or value


def _group_problems(where: str, info: MetricInfo, groups: list[str]) -> list[str]:
    problems = []
    for group in groups:
        match = re.fullmatch(r"(metric|resource)\.labels?\.([a-z_][a-z0-9_]*)", group)
        labels = info.labels if match and match[1] == "metric" else RESOURCE_LABELS[info.resource]
        if not match:
            problems.append(f"{where}: cannot read group-by field {group!r}")
        elif match[2] not in labels:
            problems.append(
                f"{where}: {info.type} has no {match[1]} label {match[2]!r} to group by"
            )
    return problems


def aggregation_problems(
    where: str, info: MetricInfo, aggregation: Mapping[str, Any], *, literal_periods: bool = True
) -> tuple[list[str], tuple[str, str]]:
    """Problems of one ``Aggregation`` (snake_case or camelCase keys) on ``info``'s series, and
    the (kind, value type) it produces. ``literal_periods``: the alignment period must be a
    literal duration (false where Terraform computes it: checked after evaluation)."""

    def get(snake: str, camel: str) -> Any:
        return aggregation.get(snake, aggregation.get(camel))

    problems: list[str] = []
    kind, value = info.kind, info.value_type
    aligner = get("per_series_aligner", "perSeriesAligner") or "ALIGN_NONE"
    reducer = get("cross_series_reducer", "crossSeriesReducer") or "REDUCE_NONE"
    period = str(get("alignment_period", "alignmentPeriod"))
    if aligner != "ALIGN_NONE":
        found, kind, value = _apply(f"{where} ({info.type})", aligner, ALIGNERS, kind, value)
        problems += found
        if period == "None":
            problems.append(f"{where}: {aligner} without an alignment period")
        elif (literal_periods or "${" not in period) and seconds(period) < 60:
            problems.append(f"{where}: alignment period {period} is under 60 s")
    if reducer != "REDUCE_NONE":
        if aligner == "ALIGN_NONE":
            problems.append(f"{where}: {reducer} needs an aligner")
        found, kind, value = _apply(f"{where} (aligned)", reducer, REDUCERS, kind, value)
        problems += found
    problems += _group_problems(where, info, get("group_by_fields", "groupByFields") or [])
    return problems, (kind, value)
