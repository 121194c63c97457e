"""The refresher against a real OAuth server (oidc-provider) that rotates refresh tokens and
revokes the whole grant when a consumed refresh token is presented again."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.support.oidc import (
    CC_BASIC_ID,
    CC_BASIC_SECRET,
    CC_POST_ID,
    CC_POST_SECRET,
    RT_BASIC_ID,
    RT_BASIC_SECRET,
    RT_POST_ID,
    RT_POST_SECRET,
    OidcServer,
    jwt_claims,
    make_service_account,
)
from tests.system.helpers import add_refresh_connection, embedded_runtime, outbox, registry, tick
from tokenbroker.entrypoints.compose import Runtime
from tokenbroker.kernel.model import (
    ClientAuthMethod,
    Connection,
    ConnectionStatus,
    Credential,
    EventType,
    GrantType,
)
from tokenbroker.kernel.secret import Secret

pytestmark = pytest.mark.system


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    rt = embedded_runtime(tmp_path / "state")
    yield rt
    rt.close()


@pytest.mark.parametrize(
    ("client_id", "secret", "method"),
    [
        (RT_BASIC_ID, RT_BASIC_SECRET, ClientAuthMethod.BASIC),
        (RT_POST_ID, RT_POST_SECRET, ClientAuthMethod.POST),
    ],
)
def test_refresh_with_rotation_stores_new_token_and_never_reuses_old(
    runtime: Runtime, oidc: OidcServer, client_id: str, secret: str, method: ClientAuthMethod
) -> None:
    original = add_refresh_connection(
        runtime, oidc, "crm", client_id=client_id, client_secret=secret, auth_method=method
    )
    oidc.reset_stats()

    first = tick(runtime)
    assert first.refreshed == 1, first.to_json()
    stored = runtime.secrets.get("crm")
    assert stored.version == 2
    assert stored.credential.refresh_token is not None
    rotated = stored.credential.refresh_token.reveal()
    assert rotated != original
    assert stored.credential.access_token is not None

    # Three more forced refreshes: each must present the newest token. Presenting a consumed
    # one would make oidc-provider answer invalid_grant and revoke the grant.
    for _ in range(3):
        assert tick(runtime, connection_ids=["crm"]).refreshed == 1
    stats = oidc.stats()
    assert stats["invalid_grant"] == 0
    assert stats["token_requests_by_grant_type"] == {"refresh_token": 4}
    final = runtime.secrets.get("crm")
    assert final.version == 5
    # The grant is alive: the newest refresh token introspects as active.
    assert final.credential.refresh_token is not None
    assert oidc.introspect(final.credential.refresh_token.reveal(), client_id, secret)["active"]

    record = runtime.state.get("crm")
    assert record.state.status is ConnectionStatus.ACTIVE
    assert record.state.next_refresh_at is not None
    assert record.state.expires_at is not None
    assert record.state.next_refresh_at < record.state.expires_at
    assert [e.type for e in outbox(runtime)] == [EventType.ROTATED] * 4


@pytest.mark.parametrize(
    ("client_id", "secret", "method"),
    [
        (CC_BASIC_ID, CC_BASIC_SECRET, ClientAuthMethod.BASIC),
        (CC_POST_ID, CC_POST_SECRET, ClientAuthMethod.POST),
    ],
)
def test_client_credentials(
    runtime: Runtime, oidc: OidcServer, client_id: str, secret: str, method: ClientAuthMethod
) -> None:
    registry(runtime).register(
        Connection(
            id="svc",
            profile="generic",
            grant=GrantType.CLIENT_CREDENTIALS,
            client_id=client_id,
            scopes=("api:read",),
            token_url=oidc.token_url,
            auth_method=method,
            params={"resource": "urn:tokenbroker:api"},
        ),
        Credential(client_secret=Secret(secret)),
    )
    before = datetime.now(UTC)
    summary = tick(runtime)
    assert summary.refreshed == 1, summary.to_json()
    credential = runtime.secrets.get("svc").credential
    assert credential.access_token is not None
    claims = jwt_claims(credential.access_token.reveal())
    assert claims["client_id"] == client_id
    assert claims["aud"] == "urn:tokenbroker:api"
    assert credential.expires_at is not None
    assert abs((credential.expires_at - before).total_seconds() - 300) < 10
    assert credential.refresh_token is None


def _register_service_account(
    runtime: Runtime, oidc: OidcServer, cid: str, key_json: object
) -> None:
    registry(runtime).register(
        Connection(
            id=cid,
            profile="google",
            grant=GrantType.JWT_BEARER,
            scopes=("api:read",),
            token_url=oidc.token_url,
        ),
        Credential(private_key=Secret(json.dumps(key_json))),
    )


def test_jwt_bearer_service_account(runtime: Runtime, oidc: OidcServer) -> None:
    key_json = oidc.add_service_account("worker@tokenbroker-test.iam.gserviceaccount.com")
    _register_service_account(runtime, oidc, "google-sa", key_json)
    summary = tick(runtime)
    assert summary.refreshed == 1, summary.to_json()
    credential = runtime.secrets.get("google-sa").credential
    assert credential.access_token is not None
    assert credential.expires_at is not None
    # The stored key is carried forward for the next assertion.
    assert credential.private_key == Secret(json.dumps(key_json))
    assert tick(runtime, connection_ids=["google-sa"]).refreshed == 1


def test_jwt_bearer_with_unknown_key_needs_reauth(runtime: Runtime, oidc: OidcServer) -> None:
    key_json, _ = make_service_account("stranger@example.iam.gserviceaccount.com")
    _register_service_account(runtime, oidc, "sa-unknown", key_json)
    summary = tick(runtime)
    assert summary.needs_reauth == 1
    assert runtime.state.get("sa-unknown").state.last_error == "invalid_grant"


def test_revoked_grant_becomes_needs_reauth_with_one_event_and_no_retries(
    runtime: Runtime, oidc: OidcServer
) -> None:
    original = add_refresh_connection(
        runtime,
        oidc,
        "revoked",
        client_id=RT_BASIC_ID,
        client_secret=RT_BASIC_SECRET,
        auth_method=ClientAuthMethod.BASIC,
    )
    oidc.revoke(original)
    oidc.reset_stats()

    summary = tick(runtime)
    assert summary.needs_reauth == 1
    assert summary.retries == 0
    assert oidc.stats()["token_requests"] == 1  # no retries
    record = runtime.state.get("revoked")
    assert record.state.status is ConnectionStatus.NEEDS_REAUTH
    assert record.state.last_error == "invalid_grant"
    assert record.state.consecutive_failures == 1
    events = outbox(runtime)
    assert [e.type for e in events] == [EventType.NEEDS_REAUTH]
    assert events[0].error_code == "invalid_grant"
    assert events[0].failure_class == "permanent"
    # The good-until-now credential is not overwritten, and later ticks leave it alone.
    assert runtime.secrets.get("revoked").version == 1
    assert tick(runtime).due == 0
    assert oidc.stats()["token_requests"] == 1


def test_5xx_are_retried_with_backoff_and_a_timeout_after_sending_is_not(
    runtime: Runtime, oidc: OidcServer
) -> None:
    """A 503 or 500 answered the request: nothing was consumed, retry. A timeout once the
    request was sent may hide an answer that rotated the token (issue 8): never retried with
    the same token inside the tick."""
    add_refresh_connection(
        runtime,
        oidc,
        "flaky",
        client_id=RT_BASIC_ID,
        client_secret=RT_BASIC_SECRET,
        auth_method=ClientAuthMethod.BASIC,
    )
    oidc.reset_stats()
    oidc.set_faults(
        [
            {"kind": "status", "status": 503, "retry_after": "1"},
            {"kind": "status", "status": 500},
            {"kind": "hang", "seconds": 4},  # longer than the 2 s client timeout
            {"kind": "status", "status": 500},  # never reached: not retried after the hang
        ]
    )
    started = time.monotonic()
    summary = tick(runtime)
    elapsed = time.monotonic() - started
    assert summary.failed["transient"] == 1, summary.to_json()
    assert summary.retries == 2
    assert summary.unknown_outcome == 1
    assert elapsed >= 1 + 2  # Retry-After honoured, then the timeout
    stats = oidc.stats()
    assert stats["token_requests"] == 3
    assert stats["faults_served"] == 3
    oidc.set_faults([])
    record = runtime.state.get("flaky")
    assert record.state.status is ConnectionStatus.ACTIVE
    assert record.state.consecutive_failures == 1
    assert record.state.last_error == "transport_error"
    assert record.state.next_refresh_at is not None
    assert record.state.next_refresh_at > datetime.now(UTC) + timedelta(seconds=10)
    assert runtime.secrets.get("flaky").version == 1
    events = outbox(runtime)
    assert [e.type for e in events] == [EventType.REFRESH_FAILED]
    assert events[0].failure_class == "transient"

    # The faults never reached oidc-provider, so the stored refresh token is still good.
    recovered = tick(runtime, connection_ids=["flaky"])
    assert recovered.refreshed == 1
    assert recovered.recovered == 1
    assert [e.type for e in outbox(runtime)][-2:] == [EventType.ROTATED, EventType.RECOVERED]
    assert runtime.state.get("flaky").state.consecutive_failures == 0


@pytest.mark.parametrize(
    ("fault", "expected_status", "expected_error"),
    [
        (
            {"kind": "error_200", "body": {"error": "invalid_grant"}},
            ConnectionStatus.NEEDS_REAUTH,
            "invalid_grant",
        ),
        ({"kind": "malformed_200"}, ConnectionStatus.ACTIVE, "malformed_response"),
    ],
)
def test_200_with_error_or_garbage_is_never_stored(
    tmp_path: Path,
    oidc: OidcServer,
    fault: dict[str, object],
    expected_status: ConnectionStatus,
    expected_error: str,
) -> None:
    runtime = embedded_runtime(tmp_path / "state", retry_attempts=1)
    try:
        add_refresh_connection(
            runtime,
            oidc,
            "odd",
            client_id=RT_BASIC_ID,
            client_secret=RT_BASIC_SECRET,
            auth_method=ClientAuthMethod.BASIC,
        )
        before = runtime.secrets.get("odd")
        oidc.set_faults([fault])
        summary = tick(runtime)
        assert summary.refreshed == 0
        after = runtime.secrets.get("odd")
        assert after.version == before.version == 1
        assert after.credential == before.credential
        record = runtime.state.get("odd")
        assert record.state.status is expected_status
        assert record.state.last_error == expected_error
    finally:
        runtime.close()
