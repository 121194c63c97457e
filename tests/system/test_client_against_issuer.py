"""The consumer client against the real issuer process, through a real outage: the issuer is
stopped (connections refused) and started again on the same port."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from joserfc.jwk import RSAKey

from tests.support.oidc import OidcServer, free_port, sign_rs256, signing_jwks
from tests.system.helpers import embedded_runtime, registry
from tests.system.processes import BIN, REPO
from tokenbroker.adapters.embedded import new_key_text
from tokenbroker.consumer import BrokerClient, BrokerUnavailable
from tokenbroker.kernel.model import Connection, Credential, GrantType
from tokenbroker.kernel.secret import Secret

pytestmark = pytest.mark.system

AUDIENCE = "https://issuer.tokenbroker.test"
WORKER = "crm-sync@tb-test.iam.gserviceaccount.com"
LIFETIME = 8  # seconds left on the connection's access token


class IssuerProcess:
    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env, self.port, self.log = env, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "functions-framework"), "--asgi", "--target=issue",
                 f"--source={REPO / 'functions' / 'issuer' / 'main.py'}", "--host=127.0.0.1",
                 f"--port={self.port}"],
                env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(self.url + "/healthz", timeout=1)
            except httpx.TransportError:
                assert time.monotonic() < deadline, self.log.read_text()[-2000:]
                time.sleep(0.1)
            else:
                return

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)


@pytest.fixture
def issuer(tmp_path: Path, oidc_server: OidcServer) -> Iterator[IssuerProcess]:
    key = new_key_text()
    state_dir = tmp_path / "state"
    runtime = embedded_runtime(state_dir, encryption_key=Secret(key))
    now = datetime.now(UTC)
    registry(runtime).register(
        Connection(
            id="crm", profile="generic", grant=GrantType.REFRESH_TOKEN, client_id="c",
            token_url=oidc_server.token_url,
        ),
        Credential(
            refresh_token=Secret("rt-never-used"), client_secret=Secret("s"),
            access_token=Secret("at-short-lived-Zq81Xv"), obtained_at=now,
            expires_at=now + timedelta(seconds=LIFETIME),
        ),
    )  # fmt: skip
    runtime.close()
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'version = 1\n[[grants]]\ncallers = ["{WORKER}"]\nconnections = ["crm"]\nscopes = ["*"]\n'
    )
    env = {
        "TOKENBROKER_STATE_DIR": str(state_dir),
        "TOKENBROKER_ENCRYPTION_KEY": key,
        "TOKENBROKER_POLICY_FILE": str(policy),
        "TOKENBROKER_ISSUER_AUDIENCE": AUDIENCE,
        "TOKENBROKER_ID_TOKEN_ISSUERS": oidc_server.issuer,
        "TOKENBROKER_ID_TOKEN_KEYS_URL": oidc_server.jwks_url,
    }
    process = IssuerProcess(env, free_port(), tmp_path / "issuer.out")
    process.start()
    # The token's LIFETIME counts from when the issuer is up: its start can take seconds on a
    # loaded machine, and it serves no token with under 5 s left.
    store_access_token(env, "at-short-lived-Zq81Xv", timedelta(seconds=LIFETIME))
    yield process
    process.stop()
    from tests.conftest import save_output

    save_output("client-against-issuer", process.log.read_bytes())


def store_access_token(env: dict[str, str], value: str, lifetime: timedelta) -> None:
    """Give the connection a new access token expiring ``lifetime`` from now, as a refresh
    would (the issuer reads the store on every request)."""
    runtime = embedded_runtime(
        Path(env["TOKENBROKER_STATE_DIR"]),
        encryption_key=Secret(env["TOKENBROKER_ENCRYPTION_KEY"]),
    )
    try:
        now = datetime.now(UTC)
        current = runtime.secrets.get("crm")
        runtime.secrets.put(
            "crm",
            current.credential.with_token(
                access_token=Secret(value), obtained_at=now, expires_at=now + lifetime
            ),
            expected_version=current.version,
        )
    finally:
        runtime.close()


def id_token(oidc: OidcServer) -> str:
    jwk = signing_jwks()["keys"][0]
    now = int(time.time())
    claims = {"iss": oidc.issuer, "aud": AUDIENCE, "sub": "w", "email": WORKER,
              "email_verified": True, "iat": now, "exp": now + 3600}  # fmt: skip
    return sign_rs256(claims, RSAKey.import_key(jwk).raw_value, kid=jwk["kid"])


def test_client_rides_out_an_issuer_outage_until_hard_expiry_and_recovers(
    issuer: IssuerProcess, oidc_server: OidcServer
) -> None:
    token = id_token(oidc_server)
    client = BrokerClient(
        issuer.url, audience=AUDIENCE, id_token_source=lambda _aud: token, min_ttl_seconds=0,
        expiry_margin_seconds=1, timeout=1, deadline_seconds=2, breaker_reset_seconds=1,
    )  # fmt: skip
    with client:
        first = client.token("crm")
        assert first.access_token == Secret("at-short-lived-Zq81Xv")
        issuer.stop()  # the broker is gone: connections are refused
        time.sleep(max(0.0, (first.refresh_after - datetime.now(UTC)).total_seconds()) + 0.2)
        # Past refresh_after, the client tries the broker, fails, and keeps the last good token.
        assert client.token("crm").access_token == first.access_token
        time.sleep(max(0.0, (first.expires_at - datetime.now(UTC)).total_seconds()))
        # Past its hard expiry, it refuses to hand out the token.
        with pytest.raises(BrokerUnavailable):
            client.token("crm")
        # The broker comes back; the connection gets a fresh token (here: store a new one).
        store_access_token(issuer.env, "at-after-outage-Pw42Lm", timedelta(hours=1))
        issuer.start()
        deadline = time.monotonic() + 10
        while True:  # the breaker lets a trial through after breaker_reset_seconds
            try:
                recovered = client.token("crm")
                break
            except BrokerUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.3)
        assert recovered.access_token == Secret("at-after-outage-Pw42Lm")
