"""The ``tokenbroker`` command as an operator runs it, against the real OAuth server."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import save_output
from tests.support.oidc import CC_POST_ID, CC_POST_SECRET, RT_BASIC_ID, RT_BASIC_SECRET, OidcServer
from tests.system.processes import BIN

pytestmark = pytest.mark.system


class Cli:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.env = {**os.environ, "TOKENBROKER_STATE_DIR": str(state_dir)}
        self.env.pop("TOKENBROKER_ENCRYPTION_KEY", None)
        self.outputs: list[str] = []

    def __call__(
        self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(BIN / "tokenbroker"), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            timeout=60,
            check=False,
        )
        self.outputs += [result.stdout, result.stderr]
        save_output("cli", " ".join(args), result.stdout, result.stderr)
        return result

    def add_refresh_connection(
        self, oidc: OidcServer, cid: str, *flags: str, revoke: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Consent once, then ``tokenbroker add`` with secrets passed by environment name."""
        tokens = oidc.obtain_refresh_token(RT_BASIC_ID, RT_BASIC_SECRET)
        if revoke:
            oidc.revoke(tokens["refresh_token"])
        return self(
            "--json", "add", cid, *flags, "--grant", "refresh_token", "--client-id", RT_BASIC_ID,
            "--client-secret-env", "S", "--refresh-token-env", "R", "--token-url", oidc.token_url,
            env={"S": RT_BASIC_SECRET, "R": tokens["refresh_token"]},
        )  # fmt: skip


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "state")


def test_connection_lifecycle(cli: Cli, oidc: OidcServer, tmp_path: Path) -> None:
    tokens = oidc.obtain_refresh_token(RT_BASIC_ID, RT_BASIC_SECRET)
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(RT_BASIC_SECRET + "\n")
    added = cli(
        "--json",
        "add",
        "crm",
        "--grant",
        "refresh_token",
        "--client-id",
        RT_BASIC_ID,
        "--client-secret-file",
        str(secret_file),
        "--refresh-token-file",
        "-",
        "--token-url",
        oidc.token_url,
        stdin=tokens["refresh_token"],
    )
    assert added.returncode == 0, added.stderr
    body = json.loads(added.stdout)
    assert body["state"]["status"] == "active"
    assert body["state"]["current_version"] == 2  # registered, then refreshed once
    assert body["refresh"]["refreshed"] == 1

    cli_env = {"CC_SECRET": CC_POST_SECRET}
    added_cc = cli(
        "add",
        "svc",
        "--grant",
        "client_credentials",
        "--client-id",
        CC_POST_ID,
        "--client-secret-env",
        "CC_SECRET",
        "--auth-method",
        "client_secret_post",
        "--token-url",
        oidc.token_url,
        "--scope",
        "api:read",
        "--param",
        "resource=urn:tokenbroker:api",
        env=cli_env,
    )
    assert added_cc.returncode == 0, added_cc.stderr
    assert "status          active" in added_cc.stdout

    status = cli("status")
    assert status.returncode == 0
    lines = status.stdout.splitlines()
    assert lines[0].startswith("outage budget: ")
    assert "2 active, 0 at_risk, 0 needs_reauth, 0 disabled; 0 failing" in lines[0]
    assert lines[1].split() == [
        "CONNECTION",
        "STATUS",
        "EXPIRES",
        "IN",
        "LAST",
        "REFRESH",
        "FAILURES",
        "LAST",
        "ERROR",
    ]
    assert sorted(line.split()[0] for line in lines[2:]) == ["crm", "svc"]
    assert all("active" in line for line in lines[2:])

    status_json = json.loads(cli("--json", "status").stdout)
    assert sorted(s["connection"] for s in status_json["connections"]) == ["crm", "svc"]
    assert all(s["consecutive_failures"] == 0 for s in status_json["connections"])
    assert status_json["fleet"]["outage_budget_seconds"] > 0

    refreshed = cli("--json", "refresh", "--all")
    assert refreshed.returncode == 0, refreshed.stderr
    assert json.loads(refreshed.stdout)["refreshed"] == 2
    due = json.loads(cli("--json", "refresh").stdout)
    assert due["due"] == 0

    events = json.loads(cli("--json", "events").stdout)
    assert [e["type"] for e in events] == ["credential.rotated"] * 4
    for event in events:
        assert set(event) >= {
            "connection_id",
            "type",
            "version",
            "expires_at",
            "occurred_at",
            "idempotency_key",
        }

    shown = cli("show", "crm")
    assert shown.returncode == 0
    assert "version         3" in shown.stdout

    assert cli("remove", "svc", "--yes").returncode == 0
    assert [r["connection"]["id"] for r in json.loads(cli("--json", "list").stdout)] == ["crm"]

    # Nothing the CLI printed contains any secret the broker holds or was issued.
    issued = oidc.ledger_tokens() | {tokens["refresh_token"], RT_BASIC_SECRET, CC_POST_SECRET}
    printed = "\n".join(cli.outputs)
    leaked = [t for t in issued if t and t in printed]
    assert leaked == []


def test_exit_codes_and_errors(cli: Cli, oidc: OidcServer, tmp_path: Path) -> None:
    # Bad usage: 2.
    assert cli("add").returncode == 2
    assert cli("refresh", "a", "--all").returncode == 2
    # A secret on the command line is not an option at all.
    assert cli("add", "x", "--grant", "refresh_token", "--refresh-token", "abc").returncode == 2
    # Malformed configuration names the variable: 2.
    bad = cli("status", env={"TOKENBROKER_TICK_LIMIT": "lots"})
    assert bad.returncode == 2
    assert "TOKENBROKER_TICK_LIMIT" in bad.stderr
    # A malformed profile field names the field: 2.
    profiles = tmp_path / "profiles.toml"
    profiles.write_text('[acme]\ngrants = ["refresh_token"]\ntoken_uri = "https://x"\n')
    bad_profile = cli("profiles", env={"TOKENBROKER_PROFILES_FILE": str(profiles)})
    assert bad_profile.returncode == 2
    assert "acme.token_uri" in bad_profile.stderr
    # No state yet: every command but add says so (2) and creates nothing.
    no_state = cli("show", "nope")
    assert no_state.returncode == 2
    assert "no tokenbroker state" in no_state.stderr
    assert not cli.state_dir.exists()
    # Invalid connection material: 2.
    no_token = cli(
        "add", "x", "--grant", "refresh_token", "--client-id", "c", "--token-url", oidc.token_url
    )
    assert no_token.returncode == 2
    assert "needs a refresh token" in no_token.stderr
    assert not cli.state_dir.exists()
    # A revoked refresh token: the first refresh fails permanently, exit 1, and the connection
    # is removed again (nothing registered, so the corrected add can simply be run again).
    revoked = cli.add_refresh_connection(oidc, "dead", revoke=True)
    assert revoked.returncode == 1
    assert "Traceback" not in revoked.stderr
    assert "nothing was registered" in revoked.stderr
    body = json.loads(revoked.stdout)
    assert body["state"]["status"] == "needs_reauth"
    assert body["registered"] is False
    assert json.loads(cli("--json", "list").stdout) == []
    assert cli.add_refresh_connection(oidc, "dead").returncode == 0
    # Unknown connection: 1, a one-line error, no traceback.
    missing = cli("show", "nope")
    assert missing.returncode == 1
    assert missing.stderr.startswith("error:")
    assert "Traceback" not in missing.stderr


def test_wrong_encryption_key_is_refused(cli: Cli, oidc: OidcServer) -> None:
    # add creates the state and its key file
    assert cli.add_refresh_connection(oidc, "crm", "--no-refresh").returncode == 0
    from tokenbroker.adapters.embedded import new_key_text

    refused = cli("status", env={"TOKENBROKER_ENCRYPTION_KEY": new_key_text()})
    assert refused.returncode == 2
    assert "does not decrypt" in refused.stderr


def test_serve_runs_the_loop_and_the_http_endpoints(cli: Cli, oidc: OidcServer) -> None:
    import signal
    import time

    import httpx

    from tests.support.oidc import free_port

    added = cli.add_refresh_connection(oidc, "crm", "--no-refresh")
    assert added.returncode == 0, added.stderr
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "tokenbroker"), "serve", "--port", str(port), "--interval", "1"],
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                health = httpx.get(url + "/healthz", timeout=1)
                assert (health.status_code, health.json()["status"]) == (200, "ok")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "serve did not start"
                time.sleep(0.2)
        # The scheduled loop refreshes the due connection by itself.
        while httpx.get(url + "/connections").json()[0]["current_version"] != 2:
            assert time.monotonic() < deadline, "the loop did not refresh"
            time.sleep(0.2)
        forced = httpx.post(url + "/refresh", timeout=30).json()
        assert forced["due"] == 0  # nothing due: the loop already did it
        connections = httpx.get(url + "/connections").json()
        assert connections[0]["id"] == "crm"
        assert connections[0]["status"] == "active"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        save_output("serve", out, err)
    assert proc.returncode == 0


def test_reauth_brings_a_needs_reauth_connection_back(cli: Cli, oidc: OidcServer) -> None:
    assert cli.add_refresh_connection(oidc, "crm", "--no-refresh", revoke=True).returncode == 0
    dead = cli("refresh", "crm")  # the grant was revoked: needs_reauth
    assert dead.returncode == 1
    assert cli("--json", "show", "crm").stdout.count('"needs_reauth"') == 1
    fresh = oidc.obtain_refresh_token(RT_BASIC_ID, RT_BASIC_SECRET)
    assert cli("reauth", "crm").returncode == 2  # nothing new given
    revived = cli(
        "--json", "reauth", "crm", "--refresh-token-file", "-", stdin=fresh["refresh_token"]
    )
    assert revived.returncode == 0, revived.stderr
    body = json.loads(revived.stdout)
    assert body["state"]["status"] == "active"
    assert body["state"]["consecutive_failures"] == 0
    types = [e["type"] for e in json.loads(cli("--json", "events").stdout)]
    assert types == ["connection.needs_reauth", "credential.rotated", "connection.recovered"]
    assert fresh["refresh_token"] not in "\n".join(cli.outputs)


def test_serve_healthz_turns_503_while_its_loop_is_stuck_on_the_store(
    cli: Cli, oidc: OidcServer
) -> None:
    """A real ``serve`` whose embedded store is write-locked by another process (as a backup
    tool or a stuck refresher would): the loop cannot tick, the process stays up, and
    ``/healthz`` says so within three intervals, with the age of the last success; once the
    lock is gone the loop catches up and the probe is green again."""
    import signal
    import sqlite3
    import time

    import httpx

    from tests.support.oidc import free_port

    assert cli.add_refresh_connection(oidc, "crm", "--no-refresh").returncode == 0
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "tokenbroker"), "serve", "--port", str(port), "--interval", "1"],
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/healthz"

    def health() -> httpx.Response | None:
        try:
            return httpx.get(url, timeout=2)
        except httpx.TransportError:
            return None

    def wait_for(
        check: Callable[[httpx.Response], bool], seconds: float, what: str
    ) -> httpx.Response:
        deadline = time.monotonic() + seconds
        while True:
            answer = health()
            if answer is not None and check(answer):
                return answer
            assert proc.poll() is None, "serve exited"
            assert time.monotonic() < deadline, f"{what}: {answer and answer.text}"
            time.sleep(0.2)

    lock = sqlite3.connect(cli.state_dir / "tokenbroker.db", timeout=30, isolation_level=None)
    try:
        ok = wait_for(lambda a: a.status_code == 200 and a.json()["ticks"] >= 1, 30, "healthy")
        assert ok.json()["last_error"] is None
        lock.execute("BEGIN EXCLUSIVE")  # every write transaction of the loop now waits
        stale = wait_for(
            lambda a: a.status_code == 503 and (a.json()["tick_running_seconds"] or 0) > 0,
            15,
            "stale while locked",
        )  # the tick hangs on the lock: running, not dead
        body = stale.json()
        assert body["status"] == "stale"
        assert body["last_success_age_seconds"] > body["max_age_seconds"] == 3.0
        lock.execute("ROLLBACK")
        wait_for(lambda a: a.status_code == 200, 30, "healthy again")
    finally:
        lock.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=40)
        save_output("serve-stuck", out, err)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err


def test_inactive_connections_are_never_refreshed_from_the_cli(cli: Cli, oidc: OidcServer) -> None:
    """Status is law (issue 8): ``refresh --all`` re-enabled disabled connections and re-sent
    the dead tokens of needs_reauth ones. Now neither is leased by any path: named, the
    command says why and exits 1; with --all they are skipped and reported."""
    assert cli.add_refresh_connection(oidc, "off").returncode == 0
    # Registered without a first refresh, its grant revoked: the first refresh kills it.
    assert cli.add_refresh_connection(oidc, "dead", "--no-refresh", revoke=True).returncode == 0
    assert cli("refresh", "dead").returncode == 1
    assert cli.add_refresh_connection(oidc, "on").returncode == 0
    assert cli("disable", "off").returncode == 0
    named = cli("refresh", "off", "dead")
    assert named.returncode == 1
    assert "off (disabled)" in named.stdout and "dead (needs_reauth)" in named.stdout
    everything = cli("--json", "refresh", "--all")
    assert everything.returncode == 0, everything.stderr
    body = json.loads(everything.stdout)
    assert body["refreshed"] == 1
    assert body["inactive"] == {"dead": "needs_reauth", "off": "disabled"}
    states = {s["connection"]: s for s in json.loads(cli("--json", "status").stdout)["connections"]}
    assert states["off"]["status"] == "disabled" and states["off"]["current_version"] == 2
    assert states["dead"]["status"] == "needs_reauth"
    assert states["dead"]["consecutive_failures"] == 1  # its dead token was sent once
    types = [e["type"] for e in json.loads(cli("--json", "events", "--connection", "dead").stdout)]
    assert types == ["connection.needs_reauth"]
