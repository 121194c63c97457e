"""Connecting accounts against the real oidc-provider: ``tokenbroker authorize`` as an
operator runs it (a subprocess, its loopback callback on an ephemeral port), with the provider's
login and consent followed by an HTTP client (auto-consent), then a normal refresh; recovery of
a needs_reauth connection; consent denied; the state's single use, counted at the provider."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.conftest import save_output
from tests.support.oidc import CONNECT_ID, CONNECT_SECRET, OidcServer
from tests.system.helpers import embedded_runtime
from tests.system.processes import BIN
from tokenbroker.kernel.errors import InvalidAuthorizationState
from tokenbroker.kernel.model import Connection, GrantType
from tokenbroker.kernel.secret import Secret

pytestmark = pytest.mark.system

SCOPES = ("api:read",)
CSP = "default-src 'none'; style-src 'unsafe-inline'"


class Operator:
    """Runs ``tokenbroker`` commands on one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.env = {**os.environ, "TOKENBROKER_STATE_DIR": str(state_dir), "S": CONNECT_SECRET}
        self.env.pop("TOKENBROKER_ENCRYPTION_KEY", None)
        self.env.pop("DISPLAY", None)  # never a browser here
        self.outputs: list[str] = []

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(BIN / "tokenbroker"), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
            check=False,
        )
        self.outputs += [result.stdout, result.stderr]
        save_output("authorize", " ".join(args), result.stdout, result.stderr)
        return result

    def authorize(self, *args: str) -> Authorizing:
        proc = subprocess.Popen(
            [str(BIN / "tokenbroker"), "--json", "authorize", *args, "--no-browser"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )
        return Authorizing(self, proc, " ".join(args))


class Authorizing:
    """A running ``tokenbroker authorize``: its URL, then its outcome."""

    def __init__(self, operator: Operator, proc: subprocess.Popen[str], label: str) -> None:
        self.operator, self.proc, self.label = operator, proc, label
        self.stderr_head: list[str] = []

    def url(self) -> str:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.stderr_head.append(line)
            if line.startswith("http"):
                return line.strip()
        self.proc.kill()
        out, err = self.proc.communicate()
        raise AssertionError(f"no URL printed: {''.join(self.stderr_head)}{err}{out}")

    def finish(self) -> subprocess.CompletedProcess[str]:
        out, err = self.proc.communicate(timeout=60)
        err = "".join(self.stderr_head) + err
        self.operator.outputs += [out, err]
        save_output("authorize", self.label, out, err)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)


@pytest.fixture
def operator(tmp_path: Path) -> Operator:
    return Operator(tmp_path / "state")


@pytest.fixture
def denying(oidc: OidcServer) -> Iterator[OidcServer]:
    oidc.set_consent(deny=True)
    try:
        yield oidc
    finally:
        oidc.set_consent(deny=False)


def new_connection_args(oidc: OidcServer, cid: str) -> list[str]:
    return [
        cid,
        "--client-id", CONNECT_ID,
        "--client-secret-env", "S",
        "--token-url", oidc.token_url,
        "--param", f"authorization_url={oidc.authorization_url}",
        *(arg for scope in SCOPES for arg in ("--scope", scope)),
        "--timeout", "60",
    ]  # fmt: skip


def consent_and_call_back(oidc: OidcServer, url: str) -> tuple[str, httpx.Response]:
    """Follow the provider as a browser would, then deliver its redirect to the loopback."""
    callback = oidc.follow_authorization(url)
    parts = urlsplit(callback)
    assert (parts.scheme, parts.hostname, parts.path) == ("http", "127.0.0.1", "/callback")
    with httpx.Client(timeout=30) as browser:
        return callback, browser.get(callback)


def assert_safe_page(page: httpx.Response, callback: str) -> None:
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"].startswith(CSP)
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["referrer-policy"] == "no-referrer"
    for name, values in parse_qs(urlsplit(callback).query).items():
        if name in ("code", "state"):
            assert values[0] not in page.text
    assert "<script" not in page.text and "src=" not in page.text and "http" not in page.text


def test_authorize_connects_a_new_account_that_then_refreshes(
    oidc: OidcServer, operator: Operator
) -> None:
    running = operator.authorize(*new_connection_args(oidc, "crm"))
    url = running.url()
    query = parse_qs(urlsplit(url).query)
    assert query["code_challenge_method"] == ["S256"]
    assert query["scope"] == [" ".join(SCOPES)]
    callback, page = consent_and_call_back(oidc, url)
    assert page.status_code == 200, page.text
    assert "Account connected" in page.text
    assert_safe_page(page, callback)
    done = running.finish()
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["state"]["status"] == "active"
    assert result["authorized"]["new"] is True
    assert result["authorized"]["event"] == "connection.connected"
    assert result["authorized"]["missing_scopes"] == []
    assert oidc.stats()["token_requests_by_grant_type"] == {"authorization_code": 1}

    # The one-shot loopback server is gone: a replayed callback reaches nothing at all.
    with pytest.raises(httpx.TransportError), httpx.Client(timeout=5) as browser:
        browser.get(callback)

    refreshed = operator.run("--json", "refresh", "crm")
    assert refreshed.returncode == 0, refreshed.stderr
    assert json.loads(refreshed.stdout)["refreshed"] == 1
    stats = oidc.stats()
    assert stats["token_requests_by_grant_type"] == {"authorization_code": 1, "refresh_token": 1}
    assert stats["refresh_token_reuse"] == 0
    events = json.loads(operator.run("--json", "events", "--connection", "crm").stdout)
    assert [e["type"] for e in events][:2] == ["connection.connected", "credential.rotated"]


def test_a_needs_reauth_connection_is_recovered_through_the_flow(
    oidc: OidcServer, operator: Operator, tmp_path: Path
) -> None:
    running = operator.authorize(*new_connection_args(oidc, "crm"))
    consent_and_call_back(oidc, running.url())
    assert running.finish().returncode == 0

    # The account holder revokes the grant: the next refresh is refused, needs_reauth.
    runtime = embedded_runtime(tmp_path / "state")
    try:
        refresh_token = runtime.secrets.get("crm").credential.refresh_token
        assert refresh_token is not None
        oidc.revoke(refresh_token.reveal(), CONNECT_ID, CONNECT_SECRET)
    finally:
        runtime.close()
    assert operator.run("refresh", "crm").returncode == 1
    shown = json.loads(operator.run("--json", "show", "crm").stdout)
    assert shown["state"]["status"] == "needs_reauth"

    running = operator.authorize("crm", "--timeout", "60")
    callback, page = consent_and_call_back(oidc, running.url())
    assert page.status_code == 200 and "Account connected" in page.text
    assert_safe_page(page, callback)
    done = running.finish()
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["state"]["status"] == "active"
    assert result["state"]["consecutive_failures"] == 0
    assert result["state"]["last_error"] is None
    assert result["authorized"]["event"] == "connection.recovered"
    events = json.loads(operator.run("--json", "events", "--connection", "crm").stdout)
    assert events[-1]["type"] == "connection.recovered"
    assert events[-1]["consecutive_failures"] >= 1
    refreshed = operator.run("--json", "refresh", "crm")
    assert refreshed.returncode == 0, refreshed.stderr
    assert oidc.stats()["refresh_token_reuse"] == 0


def test_a_narrower_grant_is_refused_or_recorded_when_accepted(
    oidc: OidcServer, operator: Operator
) -> None:
    """oidc-provider answers a code exchange with the access token's scope only (``api:read``,
    its resource indicator's): ``openid`` asked is not in the answer's ``scope``."""
    args = [*new_connection_args(oidc, "crm"), "--scope", "openid"]
    running = operator.authorize(*args)
    callback, page = consent_and_call_back(oidc, running.url())
    assert page.status_code == 403 and "did not grant openid" in page.text
    assert_safe_page(page, callback)
    done = running.finish()
    assert done.returncode == 1 and "insufficient_scope" not in done.stdout
    assert "did not grant openid" in done.stderr
    assert operator.run("show", "crm").returncode == 1  # nothing stored

    running = operator.authorize(*args, "--accept-narrower-scopes")
    callback, page = consent_and_call_back(oidc, running.url())
    assert page.status_code == 200 and "did not grant: openid" in page.text
    done = running.finish()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["authorized"]["missing_scopes"] == ["openid"]
    assert json.loads(done.stdout)["authorized"]["granted_scopes"] == ["api:read"]


def test_consent_denied_is_a_clear_page_and_exit_1(denying: OidcServer, operator: Operator) -> None:
    running = operator.authorize(*new_connection_args(denying, "crm"))
    callback, page = consent_and_call_back(denying, running.url())
    assert "error=access_denied" in callback
    assert page.status_code == 403
    assert "Not connected" in page.text and "denied" in page.text
    assert_safe_page(page, callback)
    done = running.finish()
    assert done.returncode == 1
    assert "denied" in done.stderr and "access_denied" in done.stderr
    assert denying.stats()["token_requests"] == 0
    assert operator.run("show", "crm").returncode == 1  # nothing registered


def test_no_answer_in_time_exits_1(oidc: OidcServer, operator: Operator) -> None:
    args = new_connection_args(oidc, "crm")
    args[args.index("--timeout") + 1] = "1"
    running = operator.authorize(*args)
    running.url()
    done = running.finish()
    assert done.returncode == 1
    assert "no answer" in done.stderr
    assert oidc.stats()["token_requests"] == 0


def test_bad_input_is_exit_2_before_anything_starts(operator: Operator, tmp_path: Path) -> None:
    done = operator.run("authorize", "crm", "--scope", "api:read")  # a new one needs a client
    assert done.returncode == 2
    done = operator.run(
        "authorize", "crm", "--client-id", "c", "--param", "authorization_url=http://x.example/a",
        "--token-url", "https://x.example/token", "--client-secret-env", "S",
    )  # fmt: skip
    assert done.returncode == 2 and "https" in done.stderr
    done = operator.run("authorize", "crm", "--client-id", "c", "--token-url", "https://x/t")
    assert done.returncode == 2 and "client secret" in done.stderr
    assert not (tmp_path / "state").exists()


def test_state_and_code_replay_never_reach_the_provider_twice(
    oidc: OidcServer, tmp_path: Path
) -> None:
    """The library against the real provider: a callback delivered twice (state and code
    replayed) is refused before the provider; the provider sees one code exchange."""
    runtime = embedded_runtime(tmp_path / "state")
    try:
        flow = runtime.authorization_flow()
        redirect = "http://127.0.0.1:40001/callback"
        start = flow.start_new(
            Connection(
                id="crm",
                profile="generic",
                grant=GrantType.REFRESH_TOKEN,
                client_id=CONNECT_ID,
                scopes=SCOPES,
                token_url=oidc.token_url,
                params={"authorization_url": oidc.authorization_url},
            ),
            operator="local:test",
            redirect_uri=redirect,
        )
        callback = oidc.follow_authorization(start.url)
        params = [(k, v[0]) for k, v in parse_qs(urlsplit(callback).query).items()]

        async def deliver() -> object:
            async with runtime.token_endpoint() as endpoint:
                return await flow.complete(
                    endpoint,
                    params,
                    connection_id="crm",
                    operator="local:test",
                    client_secret=Secret(CONNECT_SECRET),
                )

        asyncio.run(deliver())
        with pytest.raises(InvalidAuthorizationState) as replay:
            asyncio.run(deliver())
        assert replay.value.reason == "unknown"
        assert oidc.stats()["token_requests_by_grant_type"] == {"authorization_code": 1}
        assert runtime.state.get("crm").state.status.value == "active"
        # The verifier was kept sealed: it never appears in the database file.
        database = (tmp_path / "state" / "tokenbroker.db").read_bytes()
        assert b"code_verifier" not in database
    finally:
        runtime.close()
