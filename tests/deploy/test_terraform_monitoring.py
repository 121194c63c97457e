"""The module's monitoring (monitoring.tf, dashboard.json) against the library's metric catalogue
and what Cloud Monitoring accepts, read from the parsed files (python-hcl2).

The catalogue (``tokenbroker.kernel.metrics.CATALOGUE``) is the contract between the library,
which writes the metrics, and this module, which declares their descriptors, alerts on them
and charts them: every metric type named here must be the catalogue's (or a documented
built-in), every label a filter or a grouping names must be one the metric has, and every
aligner and reducer must suit the metric's kind and value type
(``tests/deploy/cloud_monitoring.py``). What Terraform computes (durations, thresholds, the
rendered policies) is checked after Terraform evaluates it, in ``test_terraform_evaluation.py``.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.deploy import cloud_monitoring as cm
from tests.deploy import hcl
from tokenbroker.entrypoints import cli, settings
from tokenbroker.kernel import metrics
from tokenbroker.refresh.fleet import record_tick
from tokenbroker.refresh.tick import TickSummary

pytestmark = pytest.mark.terraform

ALERTS = (
    "consecutive_failures",
    "needs_reauth",
    "seconds_to_expiry",
    "outage_budget",
    "refresher_not_run",
    "issuer_5xx",
    "secret_manager_quota",
)
#: Only these compare in a metric threshold (MetricThreshold.comparison:
#: https://cloud.google.com/monitoring/api/ref_v3/rest/v3/projects.alertPolicies#metricthreshold).
COMPARISONS = {"COMPARISON_GT", "COMPARISON_LT"}
SEVERITIES = {"CRITICAL", "ERROR", "WARNING"}
DASHBOARD = hcl.MODULE / "dashboard.json"
OPERATIONS = hcl.ROOT / "docs" / "operations.md"


@pytest.fixture(scope="module")
def module() -> hcl.Configuration:
    return hcl.load(hcl.MODULE)


def _policies(module: hcl.Configuration) -> dict[str, hcl.Resource]:
    return {r.name: r for r in module.of_type("google_monitoring_alert_policy")}


def _conditions(policy: hcl.Resource) -> list[tuple[str, hcl.Block]]:
    found = [
        (kind, body)
        for condition in policy.body["conditions"]
        for kind in ("condition_threshold", "condition_absent")
        for body in condition.get(kind, [])
    ]
    assert len(found) == len(policy.body["conditions"]), policy.address
    return found


def _resolved(text: str, module: hcl.Configuration) -> str:
    """``text`` with the module's string locals in place: a bare ``${local.x}`` or
    interpolations of them."""
    match = re.fullmatch(r"\$\{local\.(\w+)\}", text)
    if match:
        value = module.locals[match[1]]
        assert isinstance(value, str), (text, value)
        text = value
    return hcl.expand_locals(text, module)


def _documentation(policy: hcl.Resource, module: hcl.Configuration) -> str:
    content = policy.block("documentation")["content"]
    assert content == f"${{local.alert_documentation.{policy.name}}}", policy.address
    return hcl.heredoc(module.locals["alert_documentation"][policy.name])


# --- the metric descriptors are the catalogue ----------------------------------------------


def test_the_metric_descriptors_are_the_catalogue(module: hcl.Configuration) -> None:
    assert module.locals["metric_prefix"] == metrics.PREFIX
    declared = module.locals["metric_descriptors"]
    assert set(declared) == {m.name for m in metrics.CATALOGUE}
    for m in metrics.CATALOGUE:
        spec = declared[m.name]
        assert spec["kind"] == m.kind.value, m.name
        assert spec["value_type"] == m.value_type.value, m.name
        assert spec["unit"] == m.unit, m.name
        assert spec["description"] == m.description, m.name
        assert spec["labels"] == {label.key: label.description for label in m.labels}, m.name
    (descriptor,) = module.of_type("google_monitoring_metric_descriptor")
    body = descriptor.body
    assert hcl.reference(body["for_each"]) == (
        "var.create_metric_descriptors ? local.metric_descriptors : {}"
    )
    assert body["type"] == "${local.metric_prefix}${each.key}"
    assert body["metric_kind"] == "${each.value.kind}"
    assert body["value_type"] == "${each.value.value_type}"
    (labels,) = body["dynamic"]
    content = labels["labels"]["content"][0]
    assert content["value_type"] == "STRING"
    assert labels["labels"]["for_each"] == "${each.value.labels}"


def test_the_functions_and_the_policies_wait_for_the_descriptors(
    module: hcl.Configuration,
) -> None:
    """Cloud Monitoring refuses a policy on a custom metric it does not know yet, and a first
    write would auto-create a descriptor with whatever labels it happened to carry."""
    descriptors = "${google_monitoring_metric_descriptor.tokenbroker}"
    for function in ("refresher", "issuer"):
        resource = module.resource(f"google_cloudfunctions2_function.{function}")
        assert descriptors in resource.body["depends_on"], function
    for name, policy in _policies(module).items():
        filters = " ".join(_resolved(b["filter"], module) for _, b in _conditions(policy))
        if metrics.PREFIX in filters:
            assert descriptors in policy.body["depends_on"], name
    assert descriptors in module.resource("google_monitoring_dashboard.fleet").body["depends_on"]


# --- who may write them ----------------------------------------------------------------------


def test_the_refresher_and_the_issuer_may_write_metrics_and_nobody_else(
    module: hcl.Configuration,
) -> None:
    writers = {
        r.body["member"]: r
        for r in module.resources.values()
        if r.body.get("role") == "roles/monitoring.metricWriter"
    }
    assert set(writers) == {
        "serviceAccount:${google_service_account.refresher.email}",
        "serviceAccount:${google_service_account.issuer.email}",
    }
    for grant in writers.values():
        # Project-level and unconditional: Cloud Monitoring has no narrower grant for writing
        # time series; not tied to var.monitoring (the functions write either way).
        assert grant.type == "google_project_iam_member", grant.address
        assert grant.body["project"] == "${var.project_id}"
        assert "condition" not in grant.body and "count" not in grant.body, grant.address
    # No other Cloud Monitoring role anywhere (reading data, editing policies).
    for resource in module.resources.values():
        role = resource.body.get("role")
        if isinstance(role, str) and role.startswith("roles/monitoring."):
            assert role == "roles/monitoring.metricWriter", resource.address


# --- the alert policies --------------------------------------------------------------------


def test_the_alert_policies_are_the_documented_seven(module: hcl.Configuration) -> None:
    assert set(_policies(module)) == set(ALERTS)


@pytest.mark.parametrize("name", ALERTS)
def test_each_policy_is_toggled_wired_and_labelled(module: hcl.Configuration, name: str) -> None:
    policy = _policies(module)[name]
    body = policy.body
    assert hcl.reference(body["count"]) == "var.monitoring ? 1 : 0"
    assert body["project"] == "${var.project_id}"
    assert body["notification_channels"] == "${var.notification_channels}"
    assert body["severity"] in SEVERITIES
    assert body["combiner"] == "OR"
    assert "${var.name}" in body["display_name"]
    assert hcl.reference(body["user_labels"]).startswith("merge(local.labels, {")
    auto_close = policy.block("alert_strategy")["auto_close"]
    assert cm.seconds(auto_close) >= 1800 and cm.seconds(auto_close) % 60 == 0, auto_close
    assert policy.block("documentation")["mime_type"] == "text/markdown"
    assert "${var.name}" in policy.block("documentation")["subject"]


@pytest.mark.parametrize("name", ALERTS)
def test_each_policy_says_what_it_means_and_what_to_do(
    module: hcl.Configuration, name: str
) -> None:
    text = _documentation(_policies(module)[name], module)
    assert "**What it means.**" in text and "**What to do.**" in text, name
    assert re.search(r"`tokenbroker [a-z]+", text), f"{name}: no CLI command to run"
    assert "${local.cli_note}" in text, name  # how the CLI reaches this deployment
    # The text goes to the API as it is rendered: an alerting variable must be written $${...}
    # in HCL, so Terraform leaves ${metric.label.connection} for Cloud Monitoring.
    for variable in re.findall(r"(?<!\$)\$\{([^}]*)\}", text):
        assert variable.split(".")[0] in {"var", "local"}, (name, variable)
    for variable in re.findall(r"\$\$\{([^}]*)\}", text):
        assert variable in {"metric.label.connection"}, (name, variable)
        conditions = _conditions(_policies(module)[name])
        groups = [g for _, b in conditions for a in b["aggregations"] for g in a["group_by_fields"]]
        assert variable in groups, f"{name}: ${{{variable}}} is not a label of the incident"


def _cli_spans(text: str) -> list[str]:
    return re.findall(r"`(tokenbroker [^`]+)`", text)


def _check_cli(text: str, where: str) -> int:
    """Every ``tokenbroker COMMAND --option`` in backticks is a command of the CLI with that
    option; returns how many were checked."""
    spans = _cli_spans(text)
    # The group's own options (``tokenbroker --json status``) come before the command.
    global_options = {o for p in cli.main.params for o in getattr(p, "opts", [])}
    for span in spans:
        words = span.split()[1:]
        while words and words[0] in global_options:
            words = words[1:]
        command = cli.main.commands.get(words[0]) if words else None
        assert command is not None, f"{where}: `{span}`: no such command"
        options = {o for p in command.params for o in getattr(p, "opts", [])} | global_options
        for word in words[1:]:
            if word.startswith("--"):
                assert word in options, f"{where}: `{span}`: {command.name} has no {word}"
    every_option = global_options | {
        o for c in cli.main.commands.values() for p in c.params for o in getattr(p, "opts", [])
    }
    for option in re.findall(r"`(--[a-z-]+)`", text):
        assert option in every_option, f"{where}: `{option}` is no option of the CLI"
    return len(spans)


def test_every_cli_command_the_texts_name_exists(module: hcl.Configuration) -> None:
    checked = 0
    for name, policy in _policies(module).items():
        checked += _check_cli(_documentation(policy, module), name)
    dashboard = json.loads(hcl.render_template(DASHBOARD.read_text(), _sample_variables(module)))
    texts = [t["widget"]["text"]["content"] for t in _tiles(dashboard) if "text" in t["widget"]]
    checked += _check_cli(" ".join(texts), "dashboard.json")
    checked += _check_cli(OPERATIONS.read_text(), "docs/operations.md")
    assert checked >= 20


def _query_problems(
    where: str, module: hcl.Configuration, text: str, aggregations: list[hcl.Block]
) -> list[str]:
    """One filter and its aggregation: a known metric, its labels and label values, and an
    aggregation its kind and value type allow."""
    query = cm.parse_filter(_resolved(text, module))
    info = cm.known_metrics().get(query.metric_type)
    if info is None:
        return [f"{where}: {query.metric_type} is neither the catalogue's nor a built-in"]
    problems = cm.label_problems(where, info, query)
    for label, value in query.metric_labels.items():
        allowed = _label_values(info.type, label) if label in info.labels else None
        if allowed is not None and value not in allowed:
            problems.append(f"{where}: {label}={value!r} is not one of {allowed}")
    (aggregation,) = aggregations
    found, _ = cm.aggregation_problems(where, info, aggregation, literal_periods=False)
    return problems + found


def test_every_condition_names_catalogue_metrics_and_labels_with_valid_aggregations(
    module: hcl.Configuration,
) -> None:
    problems: list[str] = []
    for name, policy in _policies(module).items():
        for kind, body in _conditions(policy):
            where = f"{name}.{kind}"
            problems += _query_problems(where, module, body["filter"], body["aggregations"])
            if "denominator_filter" in body:
                problems += _query_problems(
                    f"{where} denominator",
                    module,
                    body["denominator_filter"],
                    body["denominator_aggregations"],
                )
                # "the same alignment period and ... the same periodicity and labels"
                if body["aggregations"] != body["denominator_aggregations"]:
                    problems.append(f"{where}: numerator and denominator aggregate apart")
            if kind == "condition_threshold" and body["comparison"] not in COMPARISONS:
                problems.append(f"{where}: comparison {body['comparison']}")
            duration = body["duration"]
            if "${" not in duration and cm.seconds(duration) % 60:
                problems.append(f"{where}: duration {duration} is not whole minutes")
    assert problems == [], "\n".join(problems)


def _label_values(metric_type: str, label: str) -> tuple[str, ...] | None:
    if metric_type in cm.BUILT_IN:
        return ("1xx", "2xx", "3xx", "4xx", "5xx") if label == "response_code_class" else None
    (m,) = [m for m in metrics.CATALOGUE if m.type == metric_type]
    (found,) = [x for x in m.labels if x.key == label]
    return found.values


def test_custom_series_are_this_deployments_only(module: hcl.Configuration) -> None:
    """The functions write under namespace = the module's name and location = the region
    (both functions' environments: main.tf), and every custom filter watches that namespace."""
    common = module.locals["common_environment"]
    assert common[settings.ENV_METRICS_NAMESPACE] == "${var.name}"
    assert common[settings.ENV_REGION] == "${var.region}"
    series = cm.parse_filter(
        'metric.type = "x" AND ' + hcl.expand_locals(module.locals["tokenbroker_series"], module)
    )
    assert series.resource_type == "generic_task"
    assert series.resource_labels == {"project_id": "${var.project_id}", "namespace": "${var.name}"}
    issuer = cm.parse_filter(_resolved(module.locals["issuer_requests"], module))
    assert issuer.resource_labels["service_name"] == "${local.functions.issuer}"
    assert module.locals["functions"]["issuer"] == "${var.name}-issuer"
    for name, policy in _policies(module).items():
        for _, body in _conditions(policy):
            text = _resolved(body["filter"], module)
            if metrics.PREFIX in text:
                assert text.endswith(" AND ${local.tokenbroker_series}") or (
                    hcl.expand_locals(module.locals["tokenbroker_series"], module) in text
                ), name


def test_the_per_connection_alerts_name_the_connection(module: hcl.Configuration) -> None:
    """An incident per connection: the series are grouped by the connection label (and only
    by it), so the incident and its text name the connection."""
    policies = _policies(module)
    for name in ("consecutive_failures", "seconds_to_expiry"):
        ((_, body),) = _conditions(policies[name])
        (aggregation,) = body["aggregations"]
        assert aggregation["group_by_fields"] == ["metric.label.connection"], name
        assert "${metric.label.connection}" in _documentation(policies[name], module).replace(
            "$${", "${"
        )
    # Fleet-wide ones reduce every process's series into one (no connection, no task_id).
    for name in ("needs_reauth", "outage_budget", "refresher_not_run", "secret_manager_quota"):
        ((_, body),) = _conditions(policies[name])
        (aggregation,) = body["aggregations"]
        assert aggregation["group_by_fields"] == ["resource.label.namespace"], name
        assert aggregation["cross_series_reducer"] in {"REDUCE_MAX", "REDUCE_MIN", "REDUCE_SUM"}


def test_thresholds_come_from_the_variables(module: hcl.Configuration) -> None:
    conditions = {name: _conditions(p)[0][1] for name, p in _policies(module).items()}
    assert conditions["consecutive_failures"]["comparison"] == "COMPARISON_GT"
    # "at least N" on an integer gauge
    assert conditions["consecutive_failures"]["threshold_value"] == (
        "${var.alert_consecutive_failures - 1}"
    )
    assert conditions["needs_reauth"]["threshold_value"] == 0
    assert conditions["seconds_to_expiry"]["threshold_value"] == "${local.alert_seconds_to_expiry}"
    assert conditions["outage_budget"]["threshold_value"] == "${local.alert_outage_budget_seconds}"
    assert conditions["issuer_5xx"]["threshold_value"] == "${var.alert_issuer_5xx_ratio}"
    assert module.variables["alert_consecutive_failures"]["default"] == 3
    assert module.variables["alert_issuer_5xx_ratio"]["default"] == 0.05
    # The derived defaults start from the refresher's settings, with the broker's defaults.
    defaults = settings.Settings()
    for local, variable, default in (
        ("refresher_min_lead_seconds", settings.ENV_MIN_LEAD, defaults.min_lead_seconds),
        (
            "metrics_fleet_interval_seconds",
            settings.ENV_METRICS_FLEET_INTERVAL,
            defaults.metrics_fleet_interval_seconds,
        ),
    ):
        assert hcl.reference(module.locals[local]) == (
            f'tonumber(lookup(var.refresher_environment, "{variable}", "{int(default)}"))'
        )


def test_the_refresher_alert_waits_two_intervals(module: hcl.Configuration) -> None:
    ((kind, body),) = _conditions(_policies(module)["refresher_not_run"])
    assert kind == "condition_absent"
    assert cm.parse_filter(_resolved(body["filter"], module)).metric_type == (
        metrics.metric("refresh/ticks").type
    )
    assert body["duration"] == "${local.refresh_absence_seconds}s"
    assert hcl.reference(module.locals["refresh_absence_seconds"]) == (
        "max(120, 2 * local.refresh_interval_seconds)"
    )
    (aggregation,) = body["aggregations"]
    assert aggregation["cross_series_reducer"] == "REDUCE_SUM"  # every process's ticks together


def test_the_quota_alert_counts_held_back_ticks_in_every_two_tick_window(
    module: hcl.Configuration,
) -> None:
    """Sustained pressure, not a burst: the ticks the Secret Manager budget held refreshes back
    in, summed over every refresher process per window of two ticks (each window holds a tick),
    above zero in every window for the duration. WARNING: nothing is lost while it holds (the
    expiry alerts follow if the wait outlasts the lead)."""
    policy = _policies(module)["secret_manager_quota"]
    assert policy.body["severity"] == "WARNING"
    ((kind, body),) = _conditions(policy)
    assert kind == "condition_threshold"
    query = cm.parse_filter(_resolved(body["filter"], module))
    assert query.metric_type == metrics.metric("refresh/quota_limited_ticks").type
    assert query.metric_labels == {}
    assert (body["comparison"], body["threshold_value"]) == ("COMPARISON_GT", 0)
    assert body["duration"] == "${local.quota_limited_duration_seconds}s"
    assert body["evaluation_missing_data"] == "EVALUATION_MISSING_DATA_INACTIVE"
    (aggregation,) = body["aggregations"]
    assert aggregation == {
        "alignment_period": "${local.gauge_window_seconds}s",
        "per_series_aligner": "ALIGN_DELTA",
        "cross_series_reducer": "REDUCE_SUM",
        "group_by_fields": ["resource.label.namespace"],
    }
    text = _documentation(policy, module)
    for remedy in ("secret_manager_writes_per_minute", "secret_manager_reads_per_minute"):
        assert f"`{remedy}`" in text and remedy in module.variables, remedy
    assert "https://cloud.google.com/secret-manager/quotas" in text
    assert "Fan out" in text


@pytest.mark.parametrize(
    ("summary", "held_back"),
    [
        (TickSummary(refreshed=10, quota_limited=True), 1),  # capped at one window's worth
        (TickSummary(quota_deferred=4), 1),  # others had spent the budget
        (TickSummary(refreshed=10, quota_limited=True, quota_deferred=10), 1),
        (TickSummary(refreshed=3), 0),  # a zero: the series exists from the first tick
        (None, 0),  # a tick that raised before its summary
    ],
)
def test_the_refresher_writes_what_the_quota_alert_counts(
    summary: TickSummary | None, held_back: int
) -> None:
    recorder = metrics.Recorder(datetime(2026, 1, 1, tzinfo=UTC))
    record_tick(recorder, summary, ok=summary is not None)
    written = {
        (s.metric.name, s.labels): s.value
        for s in recorder.snapshot(datetime(2026, 1, 1, 0, 1, tzinfo=UTC)).samples
    }
    assert written[("refresh/quota_limited_ticks", ())] == held_back
    assert metrics.validate(recorder.snapshot(datetime(2026, 1, 1, tzinfo=UTC)).samples) == []


# --- the dashboard -------------------------------------------------------------------------

#: The fields of each Dashboard API message the template may use
#: (google/monitoring/dashboard/v1: dashboard, layouts, widget, xychart, scorecard, table,
#: text, metrics and common.proto; https://cloud.google.com/monitoring/api/ref_v3/rest/v1/projects.dashboards).
SHAPE: dict[str, set[str]] = {
    "Dashboard": {"displayName", "mosaicLayout", "labels", "dashboardFilters"},
    "MosaicLayout": {"columns", "tiles"},
    "Tile": {"xPos", "yPos", "width", "height", "widget"},
    "Widget": {"title", "xyChart", "scorecard", "timeSeriesTable", "text"},
    "XyChart": {"dataSets", "thresholds", "xAxis", "yAxis", "chartOptions", "timeshiftDuration"},
    "DataSet": {
        "timeSeriesQuery",
        "plotType",
        "legendTemplate",
        "minAlignmentPeriod",
        "targetAxis",
    },
    "Scorecard": {"timeSeriesQuery", "gaugeView", "sparkChartView", "blankView", "thresholds"},
    "TimeSeriesTable": {"dataSets", "metricVisualization", "columnSettings"},
    "TableDataSet": {
        "timeSeriesQuery",
        "tableTemplate",
        "minAlignmentPeriod",
        "tableDisplayOptions",
    },
    "Text": {"content", "format", "style"},
    "TimeSeriesQuery": {"timeSeriesFilter", "timeSeriesFilterRatio", "unitOverride"},
    "TimeSeriesFilter": {"filter", "aggregation", "secondaryAggregation", "pickTimeSeriesFilter"},
    "TimeSeriesFilterRatio": {
        "numerator",
        "denominator",
        "secondaryAggregation",
        "pickTimeSeriesFilter",
    },
    "RatioPart": {"filter", "aggregation"},
    "Aggregation": {"alignmentPeriod", "perSeriesAligner", "crossSeriesReducer", "groupByFields"},
    "PickTimeSeriesFilter": {"rankingMethod", "numTimeSeries", "direction"},
    "Threshold": {"label", "value", "color", "direction", "targetAxis"},
}
WIDGETS = {"xyChart", "scorecard", "timeSeriesTable", "text"}
PLOT_TYPES = {"LINE", "STACKED_AREA", "STACKED_BAR", "HEATMAP"}


def _sample_variables(module: hcl.Configuration) -> dict[str, Any]:
    """Values for dashboard.json's template variables, one per key the module passes."""
    keys = set(module.locals["dashboard_variables"])
    sample = {
        "name": "tokenbroker",
        "project_id": "acme-prod",
        "region": "europe-west1",
        "issuer_service": "tokenbroker-issuer",
        "window": "120s",
        "outage_budget_alert": 600,
        "seconds_expiry_alert": 300,
        "issuer_5xx_ratio": 0.05,
    }
    assert set(sample) == keys, keys ^ set(sample)
    return sample


@pytest.fixture(scope="module")
def dashboard(module: hcl.Configuration) -> dict[str, Any]:
    resource = module.resource("google_monitoring_dashboard.fleet")
    assert hcl.reference(resource.body["count"]) == "var.monitoring ? 1 : 0"
    assert hcl.reference(resource.body["dashboard_json"]) == (
        'templatefile("${path.module}/dashboard.json", local.dashboard_variables)'
    )
    used = set(re.findall(r"(?<!\$)\$\{(\w+)\}", DASHBOARD.read_text()))
    assert used == set(module.locals["dashboard_variables"]), used
    parsed: dict[str, Any] = json.loads(
        hcl.render_template(DASHBOARD.read_text(), _sample_variables(module))
    )
    return parsed


def _tiles(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    tiles: list[dict[str, Any]] = dashboard["mosaicLayout"]["tiles"]
    return tiles


def _shape(kind: str, value: Any, where: str, problems: list[str]) -> None:
    if not isinstance(value, dict):
        problems.append(f"{where}: {kind} is not an object")
        return
    unknown = set(value) - SHAPE[kind]
    if unknown:
        problems.append(f"{where}: {kind} has no field {sorted(unknown)}")
    children = {
        ("Dashboard", "mosaicLayout"): "MosaicLayout",
        ("Tile", "widget"): "Widget",
        ("Widget", "xyChart"): "XyChart",
        ("Widget", "scorecard"): "Scorecard",
        ("Widget", "timeSeriesTable"): "TimeSeriesTable",
        ("Widget", "text"): "Text",
        ("DataSet", "timeSeriesQuery"): "TimeSeriesQuery",
        ("Scorecard", "timeSeriesQuery"): "TimeSeriesQuery",
        ("TableDataSet", "timeSeriesQuery"): "TimeSeriesQuery",
        ("TimeSeriesQuery", "timeSeriesFilter"): "TimeSeriesFilter",
        ("TimeSeriesQuery", "timeSeriesFilterRatio"): "TimeSeriesFilterRatio",
        ("TimeSeriesFilter", "aggregation"): "Aggregation",
        ("TimeSeriesFilter", "pickTimeSeriesFilter"): "PickTimeSeriesFilter",
        ("TimeSeriesFilterRatio", "numerator"): "RatioPart",
        ("TimeSeriesFilterRatio", "denominator"): "RatioPart",
        ("RatioPart", "aggregation"): "Aggregation",
    }
    lists = {
        ("MosaicLayout", "tiles"): "Tile",
        ("XyChart", "dataSets"): "DataSet",
        ("XyChart", "thresholds"): "Threshold",
        ("Scorecard", "thresholds"): "Threshold",
        ("TimeSeriesTable", "dataSets"): "TableDataSet",
    }
    for key, item in value.items():
        if (kind, key) in children:
            _shape(children[(kind, key)], item, f"{where}.{key}", problems)
        elif (kind, key) in lists:
            for i, element in enumerate(item):
                _shape(lists[(kind, key)], element, f"{where}.{key}[{i}]", problems)


def test_the_dashboard_has_the_api_shape(dashboard: dict[str, Any]) -> None:
    problems: list[str] = []
    _shape("Dashboard", dashboard, "dashboard", problems)
    assert problems == [], "\n".join(problems)
    assert dashboard["displayName"] == "tokenbroker (tokenbroker)"
    for tile in _tiles(dashboard):
        widget = tile["widget"]
        contents = set(widget) & WIDGETS
        assert len(contents) == 1 and widget.get("title"), widget  # a oneof, and a title
        for data_set in widget.get("xyChart", {}).get("dataSets", []):
            assert data_set.get("plotType", "LINE") in PLOT_TYPES, data_set
        for threshold in widget.get("xyChart", {}).get("thresholds", []):
            # "Color is not allowed in a XyChart", nor direction (metrics.proto, Threshold).
            assert set(threshold) <= {"label", "value", "targetAxis"}, threshold


def test_the_tiles_fit_48_columns_and_do_not_overlap(dashboard: dict[str, Any]) -> None:
    """MosaicLayout: 1-48 columns (the REST reference's MosaicLayout.columns); a tile is at
    least 1 x 1, inside the columns, at a non-negative position. Zero positions are left out:
    the API leaves them out when it answers, and a written 0 would show as a change on every
    plan (terraform-provider-google#16173)."""
    layout = dashboard["mosaicLayout"]
    assert layout["columns"] == 48
    cells: dict[tuple[int, int], str] = {}
    for tile in _tiles(dashboard):
        title = tile["widget"]["title"]
        for key in ("xPos", "yPos"):
            assert tile.get(key, 0) >= 0 and tile.get(key) != 0, (title, key)
        x, y = tile.get("xPos", 0), tile.get("yPos", 0)
        width, height = tile["width"], tile["height"]
        assert width >= 1 and height >= 1, title
        assert x + width <= layout["columns"], f"{title}: past column {layout['columns']}"
        for cx in range(x, x + width):
            for cy in range(y, y + height):
                assert (cx, cy) not in cells, f"{title} overlaps {cells[(cx, cy)]}"
                cells[(cx, cy)] = title
    # No holes left of a tile in its rows: the layout is the one drawn.
    rows = {cy for (_, cy) in cells}
    assert rows == set(range(max(rows) + 1))


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """(tile title, {filter, aggregation}, plot type) for every query of the dashboard."""
    found = []
    for tile in _tiles(dashboard):
        widget, title = tile["widget"], tile["widget"]["title"]
        sets: list[tuple[dict[str, Any], str]] = []
        if "xyChart" in widget:
            sets += [
                (d["timeSeriesQuery"], d.get("plotType", "LINE"))
                for d in widget["xyChart"]["dataSets"]
            ]
        if "timeSeriesTable" in widget:
            sets += [(d["timeSeriesQuery"], "TABLE") for d in widget["timeSeriesTable"]["dataSets"]]
        if "scorecard" in widget:
            sets.append((widget["scorecard"]["timeSeriesQuery"], "SCORECARD"))
        for query, plot in sets:
            if "timeSeriesFilter" in query:
                found.append((title, query["timeSeriesFilter"], plot))
            else:
                ratio = query["timeSeriesFilterRatio"]
                assert ratio["numerator"]["aggregation"] == ratio["denominator"]["aggregation"]
                found += [(title, ratio["numerator"], plot), (title, ratio["denominator"], plot)]
    return found


def test_every_chart_queries_catalogue_metrics_with_valid_aggregations(
    dashboard: dict[str, Any],
) -> None:
    known = cm.known_metrics()
    problems: list[str] = []
    charted = set()
    for title, query, plot in _queries(dashboard):
        parsed = cm.parse_filter(query["filter"])
        info = known.get(parsed.metric_type)
        if info is None:
            problems.append(
                f"{title}: {parsed.metric_type} is neither the catalogue's nor a built-in"
            )
            continue
        charted.add(info.type)
        problems += cm.label_problems(title, info, parsed)
        if info.resource == "generic_task":
            assert parsed.resource_labels == {"project_id": "acme-prod", "namespace": "tokenbroker"}
        found, (_, value) = cm.aggregation_problems(title, info, query["aggregation"])
        problems += found
        if plot == "HEATMAP" and value != "DISTRIBUTION":
            problems.append(f"{title}: a heatmap needs distributions, the query makes {value}")
        if plot in {"SCORECARD", "TABLE"} and value == "DISTRIBUTION":
            problems.append(f"{title}: a {plot.lower()} shows numbers, not distributions")
    assert problems == [], "\n".join(problems)
    # The fleet at a glance: every metric of the catalogue is on it.
    assert {m.type for m in metrics.CATALOGUE} <= charted, {
        m.type for m in metrics.CATALOGUE
    } - charted
