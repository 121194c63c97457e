"""``tokenbroker authorize --device`` (RFC 8628) against the real oidc-provider: the operator's
terminal shows a verification URI and a user code, the account holder answers through
oidc-provider's own device pages (confirm, login, consent), the CLI polls and stores; then a
normal refresh. Denial, expiry, ``slow_down`` and the recovery of a needs_reauth connection."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.oidc import CONNECT_ID, CONNECT_SECRET, OidcServer
from tests.system.helpers import embedded_runtime
from tests.system.processes import BIN
from tests.system.test_authorize_oidc import SCOPES, Authorizing, Operator

pytestmark = pytest.mark.system

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
PROMPT = re.compile(r"open (\S+) on any device and enter the code (\S+)")


@pytest.fixture
def operator(tmp_path: Path) -> Operator:
    return Operator(tmp_path / "state")


@pytest.fixture
def device(oidc: OidcServer) -> Iterator[OidcServer]:
    """The provider's device figures back to the suite's (1 s interval, 10 min codes)."""
    try:
        yield oidc
    finally:
        oidc.set_device(interval=1, ttl=600)


class Waiting(Authorizing):
    """A running ``tokenbroker authorize --device``: its prompt, then its outcome."""

    def __init__(self, operator: Operator, *args: str) -> None:
        proc = subprocess.Popen(
            [str(BIN / "tokenbroker"), "--json", "authorize", "--device", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=operator.env,
        )
        super().__init__(operator, proc, "--device " + " ".join(args))

    def prompt(self) -> tuple[str, str]:
        """The verification URI and the user code the operator is shown."""
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.stderr_head.append(line)
            found = PROMPT.search(line)
            if found:
                return found.group(1), found.group(2)
        self.proc.kill()
        out, err = self.proc.communicate()
        raise AssertionError(f"no device prompt: {''.join(self.stderr_head)}{err}{out}")


def new_connection_args(oidc: OidcServer, cid: str, *, timeout: int = 60) -> list[str]:
    return [
        cid,
        "--client-id", CONNECT_ID,
        "--client-secret-env", "S",
        "--token-url", oidc.token_url,
        "--param", f"device_authorization_url={oidc.device_authorization_url}",
        *(arg for scope in SCOPES for arg in ("--scope", scope)),
        "--timeout", str(timeout),
    ]  # fmt: skip


def test_a_new_account_connects_from_a_terminal_and_then_refreshes(
    device: OidcServer, operator: Operator
) -> None:
    waiting = Waiting(operator, *new_connection_args(device, "crm"))
    uri, user_code = waiting.prompt()
    assert uri == f"{device.issuer}/device"
    time.sleep(1.5)  # the CLI polls meanwhile: authorization_pending, at the 1 s interval
    page = device.answer_device(user_code)
    assert page.status_code == 200 and "Sign-in Success" in page.text
    done = waiting.finish()
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["state"]["status"] == "active"
    assert result["authorized"]["new"] is True
    assert result["authorized"]["event"] == "connection.connected"
    assert result["authorized"]["granted_scopes"] == list(SCOPES)
    stats = device.stats()
    assert stats["device_authorizations"] == 1
    polls = stats["token_requests_by_grant_type"][DEVICE_GRANT]
    assert polls >= 2  # at least one pending answer, then the tokens
    assert user_code not in done.stdout  # shown once, on the terminal's prompt only
    assert sum(user_code in line for line in done.stderr.splitlines()) == 1

    refreshed = operator.run("--json", "refresh", "crm")
    assert refreshed.returncode == 0, refreshed.stderr
    assert json.loads(refreshed.stdout)["refreshed"] == 1
    assert device.stats()["refresh_token_reuse"] == 0
    events = json.loads(operator.run("--json", "events", "--connection", "crm").stdout)
    assert [e["type"] for e in events][:2] == ["connection.connected", "credential.rotated"]


def test_denied_on_the_providers_page_exits_1_and_stores_nothing(
    device: OidcServer, operator: Operator
) -> None:
    waiting = Waiting(operator, *new_connection_args(device, "crm"))
    _, user_code = waiting.prompt()
    device.answer_device(user_code, deny=True)
    done = waiting.finish()
    assert done.returncode == 1
    assert "access_denied" in done.stderr and "nothing was stored" in done.stderr
    assert "allow access" in done.stderr  # the next step
    assert operator.run("show", "crm").returncode == 1


def test_a_device_code_that_expires_unanswered_exits_1(
    device: OidcServer, operator: Operator
) -> None:
    device.set_device(ttl=3)
    waiting = Waiting(operator, *new_connection_args(device, "crm"))
    waiting.prompt()
    done = waiting.finish()
    assert done.returncode == 1
    assert "no answer" in done.stderr or "expired_token" in done.stderr
    assert "nothing was stored" in done.stderr
    assert operator.run("show", "crm").returncode == 1


def test_a_needs_reauth_connection_recovers_with_slow_down_honoured(
    device: OidcServer, operator: Operator, tmp_path: Path
) -> None:
    waiting = Waiting(operator, *new_connection_args(device, "crm"))
    _, user_code = waiting.prompt()
    device.answer_device(user_code)
    assert waiting.finish().returncode == 0

    runtime = embedded_runtime(tmp_path / "state")
    try:
        refresh_token = runtime.secrets.get("crm").credential.refresh_token
        assert refresh_token is not None
        device.revoke(refresh_token.reveal(), CONNECT_ID, CONNECT_SECRET)
    finally:
        runtime.close()
    assert operator.run("refresh", "crm").returncode == 1
    assert json.loads(operator.run("--json", "show", "crm").stdout)["state"]["status"] == (
        "needs_reauth"
    )

    # The provider asks the poller to slow down once: it must wait 1 + 5 s before the next.
    device.set_faults([{"kind": "status", "status": 400, "body": {"error": "slow_down"}}])
    device.reset_stats()
    waiting = Waiting(operator, "crm", "--timeout", "60")
    _, user_code = waiting.prompt()
    started = time.monotonic()
    device.answer_device(user_code)
    done = waiting.finish()
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started >= 5  # the slowed interval was kept
    result = json.loads(done.stdout)
    assert result["authorized"]["event"] == "connection.recovered"
    assert result["state"]["consecutive_failures"] == 0
    assert device.stats()["token_requests_by_grant_type"][DEVICE_GRANT] == 2
    events = json.loads(operator.run("--json", "events", "--connection", "crm").stdout)
    assert events[-1]["type"] == "connection.recovered"
    assert operator.run("refresh", "crm").returncode == 0


def test_a_profile_without_a_device_endpoint_is_exit_2_before_anything_starts(
    device: OidcServer, operator: Operator
) -> None:
    args = new_connection_args(device, "crm")
    i = args.index("--param")
    del args[i : i + 2]
    result = operator.run("authorize", "--device", *args)
    assert result.returncode == 2
    assert "device_authorization_url" in result.stderr
    assert device.stats()["device_authorizations"] == 0
    zoho = operator.run(
        "authorize", "--device", "z", "--profile", "zoho", "--client-id", "c",
        "--client-secret-env", "S", "--scope", "ZohoCRM.modules.ALL",
    )  # fmt: skip
    assert zoho.returncode == 2 and "RFC 8628" in zoho.stderr
