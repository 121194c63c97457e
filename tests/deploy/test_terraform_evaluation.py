"""Terraform itself evaluates the module's variables and locals, and the broker reads the result.

A module of only variables, locals and outputs needs no provider, so ``terraform init`` and
``terraform apply`` run offline. The test builds one from the real ``variables.tf`` and the
real ``locals`` blocks of ``main.tf`` and ``monitoring.tf`` (the project number, which the
module reads from ``data.google_project``, becomes a literal), lets Terraform compute the
functions' environments and the IAM conditions, and hands the environments to the broker's own
``Settings.from_env``: what Terraform would deploy is a configuration the broker accepts, with
the identity mode and audiences the module promises. The variables' validations run too.

The alert policies are evaluated as well: each ``google_monitoring_alert_policy`` body, as
python-hcl2 reads it, is written back as an object-valued output (blocks become lists of
objects), so Terraform computes every filter, duration and threshold, and the result is parsed
as the Monitoring API's own ``AlertPolicy`` message (``google.cloud.monitoring_v3``), which
refuses an unknown field, an enum value that does not exist and a malformed duration. Their
preconditions run on ``terraform_data`` resources (built into Terraform), and the dashboard is
rendered by the real ``templatefile``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hcl2
import pytest
from google.cloud import monitoring_v3
from google.protobuf import descriptor as protobuf_descriptor
from google.protobuf import json_format

from tests.deploy import cloud_monitoring as cm
from tests.deploy import hcl
from tokenbroker.adapters.gcp.secret_manager_pointed import PointedSecretManagerStore
from tokenbroker.adapters.memory import MemoryStateStore
from tokenbroker.entrypoints import settings as settings_module
from tokenbroker.entrypoints.operators import GCLOUD_CLIENT_ID
from tokenbroker.entrypoints.settings import Settings

pytestmark = pytest.mark.terraform

PROJECT_NUMBER = "123456789012"
REQUIRED = {
    "project_id": "acme-prod",
    "region": "europe-west1",
    "refresher_source_zip": "refresher.zip",
    "issuer_source_zip": "issuer.zip",
    "issuer_policy_toml": "version = 1\n",
}
OUTPUTS = (
    "issuer_environment",
    "refresher_environment",
    "secrets_condition",
    "database_condition",
    "issuer_audiences",
    "connect_environment",
    "connect_invokers",
    "connect_ingress",
    "cli_environment",
    # monitoring.tf
    "refresh_interval_seconds",
    "refresh_absence_seconds",
    "gauge_window_seconds",
    "alert_seconds_to_expiry",
    "alert_outage_budget_seconds",
    "secret_manager_refreshes_per_minute",
    "quota_limited_duration_seconds",
    "dashboard_variables",
)
ALERT_POLICIES = (
    "consecutive_failures",
    "needs_reauth",
    "seconds_to_expiry",
    "outage_budget",
    "refresher_not_run",
    "issuer_5xx",
    "secret_manager_quota",
)


class Refused(Exception):
    """Terraform refused the variables (a validation failed)."""


def _locals_block(main_tf: str) -> str:
    start = main_tf.index("\nlocals {") + 1
    depth = 0
    for end in range(start, len(main_tf)):
        depth += {"{": 1, "}": -1}.get(main_tf[end], 0)
        if main_tf[end] == "}" and depth == 0:
            return main_tf[start : end + 1]
    raise AssertionError("unterminated locals block")


def _hcl(value: Any) -> str:
    """A value as python-hcl2 returns it (unprocessed), written back as an HCL expression: a
    quoted template stays as written, ``${expr}`` becomes ``expr``, a block an object."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        if value.startswith('"'):
            assert not value.startswith('"<<'), "a heredoc in a resource body: move it to a local"
            return value
        match = re.fullmatch(r"\$\{(.*)\}", value, re.DOTALL)
        assert match, value
        return match[1]
    if isinstance(value, list):
        return "[" + ", ".join(_hcl(v) for v in value) + "]"
    assert isinstance(value, dict), value
    items = [f"{k} = {_hcl(v)}" for k, v in value.items() if not k.startswith("__")]
    return "{\n" + "\n".join(items) + "\n}"


def _policy_outputs(monitoring_tf: str) -> str:
    """One output per alert policy (its body as an object, meta-arguments left out) and one
    ``terraform_data`` per policy that carries the policy's preconditions."""
    raw = hcl2.loads(monitoring_tf)
    text = []
    for entry in raw["resource"]:
        for kind, named in entry.items():
            if kind != '"google_monitoring_alert_policy"':
                continue
            for quoted, body in named.items():
                name = quoted.strip('"')
                fields = {k: v for k, v in body.items() if k not in hcl.META_ARGUMENTS}
                text.append(f'output "policy_{name}" {{\n  value = {_hcl(fields)}\n}}\n')
                preconditions = [
                    p for block in body.get("lifecycle", []) for p in block.get("precondition", [])
                ]
                if preconditions:
                    checks = "".join(
                        f"    precondition {{\n      condition = {_hcl(p['condition'])}\n"
                        f"      error_message = {_hcl(p['error_message'])}\n    }}\n"
                        for p in preconditions
                    )
                    assert "google_" not in checks, (
                        "a precondition on resources: not evaluable here"
                    )
                    text.append(
                        f'resource "terraform_data" "{name}" {{\n  lifecycle {{\n{checks}  }}\n}}\n'
                    )
    return "".join(text)


@pytest.fixture(scope="module")
def evaluate(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, Any]]:
    terraform = shutil.which("terraform")
    if not terraform:
        pytest.skip(
            "terraform is not installed (https://developer.hashicorp.com/terraform/install)"
        )
    work = tmp_path_factory.mktemp("terraform-eval")
    shutil.copy(hcl.MODULE / "variables.tf", work / "variables.tf")
    block = _locals_block((hcl.MODULE / "main.tf").read_text())
    assert block.count("data.google_project.this.number") == 1
    (work / "locals.tf").write_text(
        block.replace("data.google_project.this.number", f'"{PROJECT_NUMBER}"')
    )
    monitoring_tf = (hcl.MODULE / "monitoring.tf").read_text()
    assert monitoring_tf.count("\nlocals {") == 1  # the one block copied
    monitoring_locals = _locals_block(monitoring_tf)
    assert "data." not in re.sub(r"(?m)#.*$", "", monitoring_locals)
    (work / "monitoring_locals.tf").write_text(monitoring_locals)
    shutil.copy(hcl.MODULE / "dashboard.json", work / "dashboard.json")
    (work / "outputs.tf").write_text(
        "".join(f'output "{name}" {{\n  value = local.{name}\n}}\n' for name in OUTPUTS)
        + 'output "dashboard_json" {\n'
        + '  value = templatefile("${path.module}/dashboard.json", local.dashboard_variables)\n}\n'
    )
    (work / "policies.tf").write_text(_policy_outputs(monitoring_tf))
    env = {**os.environ, "TF_CLI_CONFIG_FILE": os.devnull, "CHECKPOINT_DISABLE": "1"}
    env.pop("TF_DATA_DIR", None)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [terraform, *args],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )

    init = run("init", "-input=false", "-no-color")
    assert init.returncode == 0, init.stdout + init.stderr

    def evaluate(**variables: Any) -> dict[str, Any]:
        (work / "test.tfvars.json").write_text(json.dumps({**REQUIRED, **variables}))
        applied = run(
            "apply", "-input=false", "-no-color", "-auto-approve", "-var-file=test.tfvars.json"
        )
        if applied.returncode != 0:
            raise Refused(" ".join((applied.stdout + applied.stderr).split()))
        shown = run("output", "-json")
        assert shown.returncode == 0, shown.stderr
        return {name: spec["value"] for name, spec in json.loads(shown.stdout).items()}

    return evaluate


def test_the_issuers_environment_is_a_configuration_the_broker_accepts(
    evaluate: Callable[..., dict[str, Any]],
) -> None:
    env = evaluate()["issuer_environment"]
    settings = Settings.from_env(env)
    assert settings.backend == "gcp"
    assert settings.adapters == ("secret-manager", "firestore", "pubsub")
    assert settings.caller_identity == "platform"
    # Both URLs of the function (docs/issuer.md): a caller's ID token may carry either.
    assert settings.issuer_audiences == (
        "https://europe-west1-acme-prod.cloudfunctions.net/tokenbroker-issuer",
        f"https://tokenbroker-issuer-{PROJECT_NUMBER}.europe-west1.run.app",
    )
    assert settings.project == "acme-prod"
    assert settings.secret_prefix == "tokenbroker-"
    assert settings.firestore_database == "tokenbroker"
    assert settings.firestore_collection == "tokenbroker_connections"
    assert settings.policy_file == Path("/etc/tokenbroker/policy/policy.toml")


def test_the_operators_extras_cannot_change_the_identity_mode_or_audiences(
    evaluate: Callable[..., dict[str, Any]],
) -> None:
    env = evaluate(
        issuer_environment={
            "TOKENBROKER_CALLER_IDENTITY": "verify",
            "TOKENBROKER_ISSUER_AUDIENCE": "https://attacker.example",
            "TOKENBROKER_BACKEND": "memory",
            "TOKENBROKER_CONCURRENCY": "64",
        }
    )["issuer_environment"]
    settings = Settings.from_env(env)
    assert settings.caller_identity == "platform"
    assert "https://attacker.example" not in settings.issuer_audiences
    assert settings.backend == "gcp"
    assert settings.concurrency == 64  # extras that are not the module's own pass through


def test_verify_mode_and_extra_audiences(evaluate: Callable[..., dict[str, Any]]) -> None:
    extra = "https://tokenbroker-issuer-abc123-ew.a.run.app"
    outputs = evaluate(issuer_caller_identity="verify", issuer_extra_audiences=[extra])
    settings = Settings.from_env(outputs["issuer_environment"])
    assert settings.caller_identity == "verify"
    assert settings.issuer_audiences[-1] == extra
    assert len(settings.issuer_audiences) == 3
    assert list(settings.issuer_audiences) == outputs["issuer_audiences"]


def test_the_refreshers_environment_is_a_configuration_the_broker_accepts(
    evaluate: Callable[..., dict[str, Any]],
) -> None:
    env = evaluate(refresher_environment={"TOKENBROKER_TICK_LIMIT": "500"})["refresher_environment"]
    settings = Settings.from_env(env)
    assert settings.adapters == ("secret-manager", "firestore", "pubsub")
    assert settings.topic_path == "projects/acme-prod/topics/tokenbroker-events"
    assert settings.tick_limit == 500
    assert not any(k.startswith("TOKENBROKER_ISSUER") for k in env)
    # Secret Manager's default quotas (https://cloud.google.com/secret-manager/quotas).
    assert (
        settings.secret_manager_reads_per_minute,
        settings.secret_manager_writes_per_minute,
    ) == (
        600,
        600,
    )


def test_the_extras_cannot_change_the_stores_the_secret_roles_are_cut_for(
    evaluate: Callable[..., dict[str, Any]],
) -> None:
    """iam.tf's secret roles hold what the pointer protocol calls, which runs with Secret
    Manager over Firestore: the module pins both stores for every function and the CLI."""
    extras = {"TOKENBROKER_SECRET_STORE": "memory", "TOKENBROKER_STATE_STORE": "memory"}
    outputs = evaluate(
        refresher_environment=extras,
        issuer_environment=extras,
        connect={"enabled": True, "source_zip": "connect.zip"},
        operators=["user:alice@example.com"],
    )
    for name in ("refresher", "issuer", "connect", "cli"):
        settings = Settings.from_env(outputs[f"{name}_environment"])
        assert settings.adapters[:2] == ("secret-manager", "firestore"), name


def _refreshes_per_window(reads: int, writes: int) -> int:
    """What the broker's Secret Manager store (the pointer protocol) lets one window carry."""
    store = PointedSecretManagerStore(
        object(),
        project="acme-prod",
        pointers=MemoryStateStore(),
        reads_per_minute=reads,
        writes_per_minute=writes,
    )
    return store.request_quota().refreshes_per_window


@pytest.mark.parametrize(
    ("reads", "writes"),
    [(600, 600), (1800, 6000), (100, 600), (5, 1), (100_000, 100_000)],
)
def test_the_secret_manager_budget_reaches_the_refresher_and_the_cli(
    evaluate: Callable[..., dict[str, Any]], reads: int, writes: int
) -> None:
    """The two variables become the refresher's settings, and the CLI's (its refreshes spend
    the same budget); the figure the quota alert quotes is what the broker computes."""
    outputs = evaluate(
        secret_manager_reads_per_minute=reads, secret_manager_writes_per_minute=writes
    )
    for name in ("refresher", "cli"):
        settings = Settings.from_env(outputs[f"{name}_environment"])
        assert settings.secret_manager_reads_per_minute == reads, name
        assert settings.secret_manager_writes_per_minute == writes, name
    assert outputs["secret_manager_refreshes_per_minute"] == _refreshes_per_window(reads, writes)
    # The issuer and the connect function run no tick: they spend no budget.
    assert not any("PER_MINUTE" in k for k in outputs["issuer_environment"])


def test_the_budget_variables_take_what_the_broker_takes() -> None:
    """The variables' bounds are the broker's (settings.BOUNDS): a value Terraform accepts is
    never refused by the function at cold start."""
    bounds = {b.field: b for b in settings_module.BOUNDS}
    variables = hcl.load(hcl.MODULE).variables
    for name in ("secret_manager_reads_per_minute", "secret_manager_writes_per_minute"):
        bound = bounds[name]
        (validation,) = variables[name]["validation"]
        condition = validation["condition"]
        assert not (bound.open_low or bound.open_high), name
        assert f"var.{name} >= {int(bound.low)}" in condition, condition
        assert f"var.{name} <= {int(bound.high)}" in condition, condition
        assert variables[name]["default"] == 600


def _starts_with(condition: str) -> str:
    """The prefix of a CEL ``resource.name.startsWith("...")`` condition."""
    match = re.fullmatch(r'resource\.name\.startsWith\("([^"\\]+)"\)', condition)
    assert match, condition
    return match[1]


def test_the_secrets_condition_covers_the_connections_secrets_and_nothing_else(
    evaluate: Callable[..., dict[str, Any]],
) -> None:
    outputs = evaluate()
    prefix = _starts_with(outputs["secrets_condition"])
    assert prefix == f"projects/{PROJECT_NUMBER}/secrets/tokenbroker-"
    # Resource names as IAM conditions see them (project number): a connection's secret and
    # its versions match; the policy secret, other secrets and other projects do not.
    for name in (
        f"projects/{PROJECT_NUMBER}/secrets/tokenbroker-zoho-eu",
        f"projects/{PROJECT_NUMBER}/secrets/tokenbroker-zoho-eu/versions/7",
    ):
        assert name.startswith(prefix), name
    for name in (
        f"projects/{PROJECT_NUMBER}/secrets/tokenbroker_issuer_policy",
        f"projects/{PROJECT_NUMBER}/secrets/payroll-db-password",
        f"projects/9{PROJECT_NUMBER}/secrets/tokenbroker-zoho-eu",
    ):
        assert not name.startswith(prefix), name
    assert outputs["database_condition"] == (
        'resource.name == "projects/acme-prod/databases/tokenbroker"'
    )
    custom = evaluate(secret_prefix="broker_", firestore_database="(default)")
    assert _starts_with(custom["secrets_condition"]).endswith("/secrets/broker_")
    assert custom["database_condition"].endswith('databases/(default)"')


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"issuer_callers": ["allUsers"]}, "service account emails only"),
        ({"issuer_callers": ["allAuthenticatedUsers"]}, "service account emails only"),
        ({"issuer_callers": ["user:alice@example.com"]}, "service account emails only"),
        ({"issuer_callers": ["alice@example.com"]}, "service account emails only"),
        ({"issuer_caller_identity": "none"}, "platform or verify"),
        ({"issuer_ingress": "PUBLIC"}, "ALLOW_INTERNAL_ONLY"),
        ({"secret_prefix": ""}, "non-empty prefix"),
        ({"secret_prefix": "a/b"}, "non-empty prefix"),
        ({"refresh_payload": "run!"}, "must be JSON"),
        ({"name": "a-name-far-too-long-for-ids"}, "3-19"),
        ({"connect": {"enabled": True}}, "connect.source_zip is required"),
        ({"max_delivery_attempts": 2}, "5 to 100"),
        ({"operators": ["allUsers"]}, "no allUsers or allAuthenticatedUsers"),
        ({"operators": ["allAuthenticatedUsers"]}, "no allUsers or allAuthenticatedUsers"),
        ({"operators": ["alice@example.com"]}, "no allUsers or allAuthenticatedUsers"),
        ({"connect": {"identity": "none"}}, "platform or iap"),
        ({"connect": {"identity": "iap"}}, "connect.iap_audience is required"),
        ({"connect": {"public_url": "http://connect.example.com"}}, "an https origin"),
        ({"connect": {"public_url": "https://connect.example.com/"}}, "an https origin"),
        ({"connect": {"ingress": "PUBLIC"}}, "ALLOW_INTERNAL_AND_GCLB"),
    ],
)
def test_the_variables_refuse_what_would_open_or_break_the_deployment(
    evaluate: Callable[..., dict[str, Any]], variables: dict[str, Any], message: str
) -> None:
    with pytest.raises(Refused, match=re.escape(message)):
        evaluate(**variables)


def test_the_defaults_and_service_account_callers_are_accepted(
    evaluate: Callable[..., dict[str, Any]],
) -> None:
    evaluate(
        issuer_callers=["crm-sync@acme-prod.iam.gserviceaccount.com"],
        connect={"enabled": True, "source_zip": "connect.zip"},
    )


def test_the_connect_functions_environment_is_a_configuration_the_broker_accepts(
    evaluate: Callable[..., dict[str, Any]],
) -> None:
    outputs = evaluate(
        connect={"enabled": True, "source_zip": "connect.zip"},
        operators=["user:alice@example.com", "group:ops@example.com", "domain:acme.example"],
    )
    settings = Settings.from_env(outputs["connect_environment"])
    assert settings.adapters == ("secret-manager", "firestore", "pubsub")
    assert settings.operator_identity == "platform"
    assert settings.connect_url == "http://localhost:8080"
    # Groups open the door (IAM); the function's allow-list holds what it can check.
    assert settings.connect_operators == ("user:alice@example.com", "domain:acme.example")
    assert settings.sessions_collection == "tokenbroker_connections_authorization_sessions"
    assert outputs["connect_invokers"] == [
        "user:alice@example.com",
        "group:ops@example.com",
        "domain:acme.example",
    ]
    assert outputs["connect_ingress"] == "ALLOW_ALL"
    assert settings.connect_audiences == (
        "http://localhost:8080",
        "https://europe-west1-acme-prod.cloudfunctions.net/tokenbroker-connect",
        f"https://tokenbroker-connect-{PROJECT_NUMBER}.europe-west1.run.app",
        GCLOUD_CLIENT_ID,
    )


def test_behind_iap_the_invoker_is_the_iap_agent(evaluate: Callable[..., dict[str, Any]]) -> None:
    audience = f"/projects/{PROJECT_NUMBER}/global/backendServices/42"
    outputs = evaluate(
        connect={
            "enabled": True, "source_zip": "connect.zip", "identity": "iap",
            "iap_audience": audience, "public_url": "https://connect.acme.example",
            "allowed_operators": ["alice@acme.example"],
        },
    )  # fmt: skip
    settings = Settings.from_env(outputs["connect_environment"])
    assert settings.operator_identity == "iap"
    assert settings.iap_audiences == (audience,)
    assert settings.connect_url == "https://connect.acme.example"
    assert settings.connect_operators == ("alice@acme.example",)
    assert outputs["connect_invokers"] == [
        f"serviceAccount:service-{PROJECT_NUMBER}@gcp-sa-iap.iam.gserviceaccount.com"
    ]
    assert outputs["connect_ingress"] == "ALLOW_INTERNAL_AND_GCLB"


# --- monitoring ----------------------------------------------------------------------------

CHANNEL = "projects/acme-prod/notificationChannels/1234567890"


def _to_api(value: dict[str, Any], message: protobuf_descriptor.Descriptor) -> dict[str, Any]:
    """A policy as Terraform evaluated it, in the API message's shape: a nested block (a list
    of one object) becomes the message it stands for, repeated ones stay lists; ``project``
    is Terraform's, not the message's."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key == "project" or item is None:
            continue
        assert key in message.fields_by_name, f"{message.name} has no field {key!r}"
        field = message.fields_by_name[key]
        nested = field.message_type
        if (
            nested is None
            or nested.GetOptions().map_entry
            or nested.full_name.startswith("google.protobuf.")
        ):
            out[key] = item
        elif field.is_repeated:
            out[key] = [_to_api(element, nested) for element in item]
        else:
            (single,) = item
            out[key] = _to_api(single, nested)
    return out


def _policies(outputs: dict[str, Any]) -> dict[str, monitoring_v3.AlertPolicy]:
    message = monitoring_v3.AlertPolicy.pb()
    parsed = {}
    for name in ALERT_POLICIES:
        api = _to_api(outputs[f"policy_{name}"], message.DESCRIPTOR)
        # ParseDict refuses unknown fields, enum names the API lacks and malformed durations.
        parsed[name] = monitoring_v3.AlertPolicy.wrap(json_format.ParseDict(api, message()))
    return parsed


def _condition(policy: monitoring_v3.AlertPolicy) -> Any:
    (condition,) = policy.conditions
    return condition.condition_threshold or condition.condition_absent


def test_the_alert_policies_are_monitoring_api_messages(
    evaluate: Callable[..., dict[str, Any]],
) -> None:
    outputs = evaluate(notification_channels=[CHANNEL])
    for name, policy in _policies(outputs).items():
        assert list(policy.notification_channels) == [CHANNEL], name
        assert policy.severity != monitoring_v3.AlertPolicy.Severity.SEVERITY_UNSPECIFIED, name
        assert policy.combiner == monitoring_v3.AlertPolicy.ConditionCombinerType.OR
        assert policy.alert_strategy.auto_close.total_seconds() >= 1800
        docs = policy.documentation
        assert docs.mime_type == "text/markdown"
        # The API's limits: 8,192 characters of content, a subject cut at 255 bytes.
        assert 200 < len(docs.content) <= 8192, name
        assert len(docs.subject.encode()) <= 255, name
        # Terraform filled in everything but Cloud Monitoring's own variables.
        for text in (docs.content, docs.subject, policy.display_name):
            assert set(re.findall(r"\$\{([^}]*)\}", text)) <= {"metric.label.connection"}, text
        assert "acme-prod" in docs.content and "tokenbroker" in docs.content
        assert policy.user_labels["app"] == "tokenbroker"
        assert policy.user_labels["managed-by"] == "terraform"
        condition = _condition(policy)
        assert condition.duration.total_seconds() % 60 == 0, name
        for aggregation in [
            *condition.aggregations,
            *getattr(condition, "denominator_aggregations", []),
        ]:
            period = aggregation.alignment_period.total_seconds()
            assert period >= 60 and period % 60 == 0, (name, period)
        query = cm.parse_filter(condition.filter)
        if query.metric_type.startswith("custom.googleapis.com/"):
            assert query.resource_labels == {"project_id": "acme-prod", "namespace": "tokenbroker"}
        else:
            assert query.resource_labels["service_name"] == "tokenbroker-issuer"
            assert query.resource_labels["location"] == "europe-west1"


@pytest.mark.parametrize(
    ("variables", "interval"),
    [
        ({}, 60),  # "* * * * *"
        ({"refresh_schedule": "*/5 * * * *"}, 300),
        (
            {
                "refresh_schedule": "0,30 * * * *",
                "refresh_interval_seconds": 1800,
                "refresher_environment": {"TOKENBROKER_MIN_LEAD_SECONDS": "3600"},
            },
            1800,
        ),
        ({"refresh_interval_seconds": 60}, 60),
    ],
)
def test_the_refresher_alert_waits_two_intervals_of_the_schedule(
    evaluate: Callable[..., dict[str, Any]], variables: dict[str, Any], interval: int
) -> None:
    outputs = evaluate(**variables)
    assert outputs["refresh_interval_seconds"] == interval
    policies = _policies(outputs)
    absent = policies["refresher_not_run"].conditions[0].condition_absent
    # Two intervals: a whole number of minutes, never under MetricAbsence's 120 s.
    assert absent.duration.total_seconds() == 2 * interval
    (aggregation,) = absent.aggregations
    assert aggregation.alignment_period.total_seconds() == interval
    # Gauges (and the quota alert's held-back ticks) are aligned over two ticks: each window
    # holds a point of every live series.
    for name in (
        "consecutive_failures",
        "needs_reauth",
        "seconds_to_expiry",
        "outage_budget",
        "secret_manager_quota",
    ):
        (aggregation,) = _condition(policies[name]).aggregations
        assert aggregation.alignment_period.total_seconds() == 2 * interval, name
    # Longer than a healthy dip lasts: the fleet read interval (300 s) and three ticks.
    budget = _condition(policies["outage_budget"]).duration.total_seconds()
    assert budget == -(-(300 + 3 * interval) // 60) * 60
    dashboard = json.loads(outputs["dashboard_json"])
    assert f'"{2 * interval}s"' in json.dumps(dashboard)


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"refresh_schedule": "0,30 * * * *"}, "set the seconds between its ticks"),
        ({"refresh_schedule": "*/5 * * * *", "refresh_interval_seconds": 60}, "disagrees"),
        # Ticks as far apart as the lead: a token could expire between two of them.
        ({"refresh_schedule": "*/10 * * * *"}, "tick more often"),
        ({"refresh_interval_seconds": 90}, "whole number of minutes"),
        ({"refresh_interval_seconds": 30}, "whole number of minutes"),
        ({"refresh_interval_seconds": 7200}, "whole number of minutes"),
        ({"notification_channels": ["1234567890"]}, "full channel names"),
        ({"notification_channels": ["projects/p/channels/1"]}, "full channel names"),
        ({"alert_consecutive_failures": 0}, "a whole number, at least 1"),
        ({"alert_consecutive_failures": 2.5}, "a whole number, at least 1"),
        ({"alert_seconds_to_expiry": -1}, "a positive number of seconds"),
        ({"alert_outage_budget_seconds": 0}, "a positive number of seconds"),
        ({"alert_issuer_5xx_ratio": 1.5}, "a fraction between 0 and 1"),
        ({"alert_issuer_5xx_ratio": 0}, "a fraction between 0 and 1"),
        ({"alert_quota_limited_seconds": 90}, "a whole number of minutes from 60 to 86400"),
        ({"alert_quota_limited_seconds": 0}, "a whole number of minutes from 60 to 86400"),
        ({"alert_quota_limited_seconds": 86460}, "a whole number of minutes from 60 to 86400"),
        ({"secret_manager_reads_per_minute": 0}, "a whole number of requests per minute"),
        ({"secret_manager_writes_per_minute": -600}, "a whole number of requests per minute"),
        ({"secret_manager_writes_per_minute": 600.5}, "a whole number of requests per minute"),
        ({"secret_manager_reads_per_minute": 100_001}, "a whole number of requests per minute"),
        (
            {"refresher_environment": {"TOKENBROKER_SECRET_MANAGER_WRITES_PER_MINUTE": "1200"}},
            "set the Secret Manager budget with secret_manager_reads_per_minute",
        ),
    ],
)
def test_the_monitoring_variables_refuse_what_would_break_an_alert(
    evaluate: Callable[..., dict[str, Any]], variables: dict[str, Any], message: str
) -> None:
    with pytest.raises(Refused, match=re.escape(message)):
        evaluate(**variables)


def test_the_expiry_thresholds_follow_the_refreshers_settings(
    evaluate: Callable[..., dict[str, Any]],
) -> None:
    """A healthy connection is renewed at the first tick after its remaining life falls below
    the lead (at least TOKENBROKER_MIN_LEAD_SECONDS), and its gauge is re-read every
    TOKENBROKER_METRICS_FLEET_INTERVAL_SECONDS: the per-connection alert sits two ticks short
    of the lead, the outage-budget alert at the lead for longer than a reading can lag. The
    module reads the same settings the broker does."""
    default = evaluate()
    settings = Settings.from_env(default["refresher_environment"])
    lead, lag = settings.min_lead_seconds, settings.metrics_fleet_interval_seconds
    assert (lead, lag) == (600, 300)
    assert default["alert_seconds_to_expiry"] == lead - 2 * 60
    assert default["alert_outage_budget_seconds"] == lead
    policies = _policies(default)
    assert _condition(policies["outage_budget"]).duration.total_seconds() == lag + 3 * 60
    env = {
        "TOKENBROKER_MIN_LEAD_SECONDS": "1200",
        "TOKENBROKER_METRICS_FLEET_INTERVAL_SECONDS": "0",
    }
    changed = evaluate(refresher_environment=env)
    settings = Settings.from_env(changed["refresher_environment"])
    assert (settings.min_lead_seconds, settings.metrics_fleet_interval_seconds) == (1200, 0)
    policies = _policies(changed)
    assert _condition(policies["seconds_to_expiry"]).threshold_value == 1200 - 2 * 60
    assert _condition(policies["outage_budget"]).threshold_value == 1200
    assert _condition(policies["outage_budget"]).duration.total_seconds() == 3 * 60
    # Ticks far apart: never under a quarter of the lead.
    assert evaluate(refresh_schedule="*/5 * * * *")["alert_seconds_to_expiry"] == 150
    explicit = evaluate(alert_seconds_to_expiry=120, alert_outage_budget_seconds=900)
    policies = _policies(explicit)
    assert _condition(policies["seconds_to_expiry"]).threshold_value == 120
    assert _condition(policies["outage_budget"]).threshold_value == 900
    # "At least N failures in a row" on an integer gauge: more than N - 1.
    policies = _policies(evaluate(alert_consecutive_failures=5))
    threshold = _condition(policies["consecutive_failures"])
    assert threshold.comparison == monitoring_v3.ComparisonType.COMPARISON_GT
    assert threshold.threshold_value == 4


def test_the_quota_alert_waits_half_the_smallest_lead_and_quotes_the_budget(
    evaluate: Callable[..., dict[str, Any]],
) -> None:
    """Held back in every two-tick window for half the refresher's smallest lead (whole
    minutes, at least two windows): a burst that drains sooner opens nothing. The text says
    what the budget carries, with this deployment's figures."""

    def quota(outputs: dict[str, Any]) -> Any:
        return _condition(_policies(outputs)["secret_manager_quota"])

    default = evaluate()
    assert default["quota_limited_duration_seconds"] == 300
    assert quota(default).duration.total_seconds() == 300
    docs = _policies(default)["secret_manager_quota"].documentation.content
    assert "600 write and 600 read requests a minute" in docs
    assert "at most 300 refreshes a tick" in docs
    lead = evaluate(refresher_environment={"TOKENBROKER_MIN_LEAD_SECONDS": "1500"})
    assert quota(lead).duration.total_seconds() == 720  # 750 s, in whole minutes
    # Ticks five minutes apart: windows of ten minutes, two of them.
    sparse = evaluate(refresh_schedule="*/5 * * * *")
    assert quota(sparse).duration.total_seconds() == 1200
    # 3,000 writes carry 1,500 refreshes: the pointer protocol sends no read request.
    explicit = evaluate(alert_quota_limited_seconds=900, secret_manager_writes_per_minute=3000)
    assert quota(explicit).duration.total_seconds() == 900
    assert "at most 1500 refreshes a tick" in (
        _policies(explicit)["secret_manager_quota"].documentation.content
    )


def test_the_functions_write_metrics_under_the_namespace_the_alerts_watch(
    evaluate: Callable[..., dict[str, Any]],
) -> None:
    """The metrics' generic_task resource carries namespace = the module's name and
    location = the region (TOKENBROKER_METRICS_NAMESPACE, TOKENBROKER_REGION): every custom
    filter of the policies names that namespace."""
    outputs = evaluate(name="broker-eu")
    for function in ("refresher", "issuer"):
        settings = Settings.from_env(outputs[f"{function}_environment"])
        assert settings.metrics_destination == "cloud-monitoring", function
        assert (settings.metrics_namespace, settings.region) == ("broker-eu", "europe-west1")
    for name, policy in _policies(outputs).items():
        query = cm.parse_filter(_condition(policy).filter)
        if query.metric_type.startswith("custom.googleapis.com/"):
            assert query.resource_labels["namespace"] == "broker-eu", name


def _filters(value: Any) -> list[str]:
    """Every ``filter`` of a dashboard, at any depth."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            found += [item] if key == "filter" else _filters(item)
    elif isinstance(value, list):
        for item in value:
            found += _filters(item)
    return found


def test_terraform_renders_the_dashboard_the_checks_read(
    evaluate: Callable[..., dict[str, Any]],
) -> None:
    """test_terraform_monitoring.py checks dashboard.json rendered by hcl.render_template:
    the real templatefile gives the same JSON."""
    outputs = evaluate(name="broker-eu", alert_issuer_5xx_ratio=0.02)
    rendered = outputs["dashboard_json"]
    assert rendered == hcl.render_template(
        (hcl.MODULE / "dashboard.json").read_text(), outputs["dashboard_variables"]
    )
    dashboard = json.loads(rendered)
    assert dashboard["displayName"] == "tokenbroker (broker-eu)"
    filters = " ".join(_filters(dashboard))
    assert 'resource.label.service_name = "broker-eu-issuer"' in filters
    assert 'resource.label.namespace = "broker-eu"' in filters
    assert "0.02" in rendered
