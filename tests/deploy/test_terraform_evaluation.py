"""Terraform itself evaluates the module's variables and locals, and the broker reads the result.

A module of only variables, locals and outputs needs no provider, so ``terraform init`` and
``terraform apply`` run offline. The test builds one from the real ``variables.tf`` and the
real ``locals`` block of ``main.tf`` (the project number, which the module reads from
``data.google_project``, becomes a literal), lets Terraform compute the functions'
environments and the IAM conditions, and hands the environments to the broker's own
``Settings.from_env``: what Terraform would deploy is a configuration the broker accepts, with
the identity mode and audiences the module promises. The variables' validations run too.
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

import pytest

from tests.deploy import hcl
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
    (work / "outputs.tf").write_text(
        "".join(f'output "{name}" {{\n  value = local.{name}\n}}\n' for name in OUTPUTS)
    )
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
