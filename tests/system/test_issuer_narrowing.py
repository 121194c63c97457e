"""The issuer's decisions as deployed (a real ``functions-framework --asgi`` process over the
embedded backend, callers' ID tokens checked against oidc-provider's JWKS): scope narrowing at
a real provider that keeps its refresh tokens, and live status (issue 9, items 2 and 3)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.logs import trace_fields
from tests.support.oidc import RT_FIXED_ID, RT_FIXED_SECRET, OidcServer
from tests.system.helpers import (
    caller_id_token,
    embedded_runtime,
    registry,
    request_token,
    schemathesis_run,
)
from tests.system.processes import BIN, REPO, functions_framework
from tokenbroker.adapters.embedded import new_key_text
from tokenbroker.kernel.model import ClientAuthMethod, Connection, Credential, GrantType
from tokenbroker.kernel.secret import Secret

pytestmark = pytest.mark.system

SOURCE = REPO / "functions" / "issuer" / "main.py"
AUDIENCE = "https://issuer.tokenbroker.test"
READER = "reader@tb-test.iam.gserviceaccount.com"
OWNER = "owner@tb-test.iam.gserviceaccount.com"
PROFILES = """
[fixed]
description = "an RFC 6749 server that keeps its refresh tokens (oidc-provider's rt-fixed)"
grants = ["refresh_token"]
auth_method = "client_secret_basic"
rotates_refresh_tokens = false
supports_scope_narrowing = true
default_lifetime_seconds = 3600
"""


def provider_claims(oidc: OidcServer, token: str) -> dict[str, Any]:
    from joserfc import jwt
    from joserfc.jwk import KeySet

    keys = KeySet.import_key_set(httpx.get(oidc.jwks_url, timeout=10).json())
    decoded = jwt.decode(token, keys, algorithms=["RS256"])
    return dict(decoded.claims)


@dataclass
class Deployment:
    url: str
    oidc: OidcServer
    env: dict[str, str]
    log: Path

    def id_token(self, email: str) -> str:
        return caller_id_token(self.oidc, AUDIENCE, email)

    def token(self, body: Any, email: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return request_token(self.url, body, self.id_token(email), headers)

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON lines of the process's output so far (gunicorn's own lines are text)."""
        text = self.log.read_text(errors="replace")
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "tokenbroker"), *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, oidc_server: OidcServer
) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("issuer-narrowing")
    key = new_key_text()
    state_dir = work / "state"
    profiles = work / "profiles.toml"
    profiles.write_text(PROFILES)
    tokens = oidc_server.obtain_refresh_token(
        RT_FIXED_ID, RT_FIXED_SECRET, scope="openid offline_access api:read api:write"
    )
    runtime = embedded_runtime(state_dir, encryption_key=Secret(key), profiles_file=profiles)
    now = runtime.clock.now()
    from datetime import timedelta

    registry(runtime).register(
        Connection(
            id="docs", profile="fixed", grant=GrantType.REFRESH_TOKEN, client_id=RT_FIXED_ID,
            scopes=("openid", "offline_access", "api:read", "api:write"),
            token_url=oidc_server.token_url, auth_method=ClientAuthMethod.BASIC,
        ),
        Credential(
            refresh_token=Secret(tokens["refresh_token"]),
            client_secret=Secret(RT_FIXED_SECRET),
            access_token=Secret(tokens["access_token"]),
            obtained_at=now,
            expires_at=now + timedelta(seconds=int(tokens["expires_in"])),
        ),
    )  # fmt: skip
    runtime.close()
    policy = work / "policy.toml"
    policy.write_text(
        f"""
version = 1

[[grants]]
callers = ["{READER}"]
connections = ["docs"]
scopes = ["api:read"]
max_lifetime_seconds = 120

[[grants]]
callers = ["{OWNER}"]
connections = ["docs"]
scopes = ["*"]
max_lifetime_seconds = 900
"""
    )
    capture = work / "capture"
    capture.mkdir()
    env = {
        "TOKENBROKER_STATE_DIR": str(state_dir),
        "TOKENBROKER_ENCRYPTION_KEY": key,
        "TOKENBROKER_PROFILES_FILE": str(profiles),
        "TOKENBROKER_POLICY_FILE": str(policy),
        "TOKENBROKER_ISSUER_AUDIENCE": AUDIENCE,
        "TOKENBROKER_ID_TOKEN_ISSUERS": oidc_server.issuer,
        "TOKENBROKER_ID_TOKEN_KEYS_URL": oidc_server.jwks_url,
        "TOKENBROKER_TEST_CAPTURE_DIR": str(capture),
        # What the log lines name: the project of their traces, the function (Cloud Run sets
        # K_SERVICE; Terraform sets the project).
        "TOKENBROKER_GCP_PROJECT": "tb-system",
        "K_SERVICE": "tokenbroker-issuer",
    }
    with functions_framework("issue", SOURCE, env, name="issuer-narrowing", asgi=True) as url:
        yield Deployment(url, oidc_server, env, capture / "issuer-narrowing.process.out")


def test_a_narrowed_token_has_exactly_the_scope_asked_and_the_grants_lifetime(
    deployment: Deployment,
) -> None:
    """The defect: narrowing failed in the deployed function (every narrowing request
    answered 500). Now the provider is asked for the subset, and its answer is passed on
    with exactly that scope and a lifetime within the grant's."""
    answer = deployment.token({"connection": "docs", "scopes": ["api:read"]}, READER)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["scope"] == "api:read"
    assert 0 < body["expires_in"] <= 120
    # The provider issued it for that scope: its JWT access token (RFC 9068), verified
    # against the provider's keys, says so -- and says how long it really lives.
    claims = provider_claims(deployment.oidc, body["access_token"])
    assert claims["scope"] == "api:read"
    assert claims["client_id"] == RT_FIXED_ID
    assert claims["exp"] >= time.time() + body["expires_in"] - 5
    # Asked again: the same token from the cache, still within the grant.
    again = deployment.token({"connection": "docs", "scopes": ["api:read"]}, READER)
    assert again.json()["access_token"] == body["access_token"]
    assert again.json()["expires_in"] <= 120


def test_a_narrowed_caller_is_never_given_the_full_token(deployment: Deployment) -> None:
    full = deployment.token({"connection": "docs"}, OWNER)
    assert full.status_code == 200, full.text
    master = full.json()["access_token"]
    # No scopes asked: what the grant allows, narrowed -- not the connection's own token.
    mine = deployment.token({"connection": "docs"}, READER)
    assert mine.status_code == 200, mine.text
    assert (mine.json()["scope"], mine.json()["access_token"] != master) == ("api:read", True)
    assert provider_claims(deployment.oidc, mine.json()["access_token"])["scope"] == "api:read"
    denied = deployment.token({"connection": "docs", "scopes": ["api:write"]}, READER)
    assert denied.status_code == 403, denied.text
    assert master not in denied.text


def test_disable_stops_the_very_next_request_and_enable_restores(deployment: Deployment) -> None:
    """The defect: ``tokenbroker disable`` did not stop tokens already cached (still served
    35 s later). The CLI, another process, changes the status; the next request is refused."""
    assert deployment.token({"connection": "docs"}, OWNER).status_code == 200
    narrowed = {"connection": "docs", "scopes": ["api:read"]}
    assert deployment.token(narrowed, READER).status_code == 200
    done = deployment.cli("disable", "docs")
    assert done.returncode == 0, done.stderr
    try:
        for body, email in (({"connection": "docs"}, OWNER), (narrowed, READER)):
            refused = deployment.token(body, email)
            assert refused.status_code == 409, refused.text
            assert "access_token" not in refused.json()
    finally:
        assert deployment.cli("enable", "docs").returncode == 0
    assert deployment.token({"connection": "docs"}, OWNER).status_code == 200


def test_the_decisions_leave_no_token_in_the_log(deployment: Deployment) -> None:
    issued = deployment.token({"connection": "docs", "scopes": ["api:read"]}, READER).json()
    text = deployment.log.read_text()
    assert issued["access_token"] not in text
    for line in text.splitlines():
        if line.startswith("{"):
            json.loads(line)


def test_every_line_of_a_traced_request_names_its_trace_and_no_line_after_it(
    deployment: Deployment,
) -> None:
    """As Cloud Run passes it on (``traceparent``, else ``X-Cloud-Trace-Context`` with the span
    in decimal), the trace is on every line a request causes -- its audit line above all,
    which the served process writes straight to stderr, batched -- in Cloud Logging's form
    (https://cloud.google.com/trace/docs/trace-log-integration); a request without one, or with
    a malformed one, has none. Every JSON line of the process is Cloud Logging's structured
    JSON with the function's label."""
    trace_id, legacy_id = secrets.token_hex(16), secrets.token_hex(16)
    body = {"connection": "docs", "scopes": ["api:write"]}  # asked by no other test

    def decisions() -> list[dict[str, Any]]:
        return [x for x in deployment.log_lines() if x["message"] == "token decision"
                and x["caller"] == OWNER and x["scopes_asked"] == "api:write"]  # fmt: skip

    sent = [
        {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        {"X-Cloud-Trace-Context": f"{legacy_id}/74;o=0"},
        {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "X-Cloud-Trace-Context":
         f"{legacy_id}/1;o=1"},  # both: traceparent wins
        {"traceparent": "00-" + "Q" * 32 + "-00f067aa0ba902b7-01"},
        {},
    ]  # fmt: skip
    for headers in sent:
        answer = deployment.token(body, OWNER, headers)
        assert answer.status_code == 200, answer.text
    deadline = time.monotonic() + 10
    while len(decisions()) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.05)  # routine lines are batched (at most 50 ms)
    assert len(decisions()) == len(sent)
    project = "projects/tb-system/traces/"
    expected: list[dict[str, Any]] = [
        {"logging.googleapis.com/trace": project + trace_id,
         "logging.googleapis.com/spanId": "00f067aa0ba902b7",
         "logging.googleapis.com/trace_sampled": True},
        {"logging.googleapis.com/trace": project + legacy_id,
         "logging.googleapis.com/spanId": "000000000000004a",
         "logging.googleapis.com/trace_sampled": False},
        {"logging.googleapis.com/trace": project + trace_id,
         "logging.googleapis.com/spanId": "00f067aa0ba902b7",
         "logging.googleapis.com/trace_sampled": True},
        {},
        {},
    ]  # fmt: skip
    got = [trace_fields(x) for x in decisions()]
    assert got == expected
    assert "Q" * 32 not in deployment.log.read_text(errors="replace")
    for line in deployment.log_lines():
        assert {"severity", "message", "time"} <= set(line)
        assert line["logging.googleapis.com/labels"]["function"] == "tokenbroker-issuer"


@pytest.mark.parametrize("caller", [READER, OWNER])
def test_schemathesis_with_the_policys_real_names_finds_no_server_errors(
    deployment: Deployment, tmp_path: Path, caller: str
) -> None:
    """Generated requests that name this deployment's connection and scopes (and some that
    do not), so the policy's grants, narrowing and pass-through are all reached: no 5xx, and
    every answer matches docs/issuer.openapi.yaml."""
    generated, passed, output = schemathesis_run(
        deployment.url,
        tmp_path,
        token=deployment.id_token(caller),
        operations="^/token",
        connections=["docs", "ghost"],
        scopes=["api:read", "api:write", "openid", "offline_access", "x"],
    )
    assert generated == passed > 20, output[-3000:]
