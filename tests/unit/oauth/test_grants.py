"""Grant requests as they go on the wire (RFC 6749 §2.3.1, §4.4, §6; RFC 7523)."""

from __future__ import annotations

import asyncio
import base64
import json
import random
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwt
from joserfc.jwk import RSAKey

from tokenbroker.adapters.memory import MemoryEventBus, MemorySecretStore, MemoryStateStore
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import ConfigError, InvalidGrant
from tokenbroker.kernel.http import HttpResponse
from tokenbroker.kernel.log import capture_logs
from tokenbroker.kernel.model import ClientAuthMethod, Connection, Credential, GrantType
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.acquire import acquire
from tokenbroker.oauth.grants import (
    JWT_BEARER_GRANT,
    client_authentication,
    jwt_bearer_grant,
    refresh_grant,
)
from tokenbroker.oauth.profiles import load_profiles
from tokenbroker.ports import TokenEndpoint
from tokenbroker.refresh.registry import ConnectionRegistry
from tokenbroker.refresh.tick import Refresher

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


class Recorder:
    def __init__(self, body: Mapping[str, object]) -> None:
        self.body = body
        self.calls: list[tuple[str, dict[str, str], dict[str, str]]] = []

    async def post_form(
        self, url: str, form: Mapping[str, str], *, headers: Mapping[str, str]
    ) -> HttpResponse:
        self.calls.append((url, dict(form), dict(headers)))
        return HttpResponse(200, json.dumps(self.body).encode(), {})


def test_basic_auth_urlencodes_before_base64() -> None:
    headers, form = client_authentication(ClientAuthMethod.BASIC, "id:1", Secret("p%ss w:rd"))
    assert form == {}
    decoded = base64.b64decode(headers["Authorization"].removeprefix("Basic ")).decode()
    assert decoded == "id%3A1:p%25ss%20w%3Ard"


def test_post_auth_puts_credentials_in_body() -> None:
    headers, form = client_authentication(ClientAuthMethod.POST, "id", Secret("s"))
    assert headers == {}
    assert form == {"client_id": "id", "client_secret": "s"}


def test_auth_without_secret_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        client_authentication(ClientAuthMethod.BASIC, "id", None)


def _run(endpoint: TokenEndpoint, connection: Connection, credential: Credential) -> Credential:
    profile = load_profiles()[connection.profile]
    return asyncio.run(acquire(endpoint, connection, profile, credential, NOW))


def test_refresh_grant_on_zoho_uses_data_centre_and_post_auth() -> None:
    endpoint = Recorder(
        {"access_token": "new-at", "expires_in": 3600, "api_domain": "https://www.zohoapis.eu"}
    )
    connection = Connection(
        id="z",
        profile="zoho",
        grant=GrantType.REFRESH_TOKEN,
        client_id="1000.CID",
        params={"data_centre": "eu"},
    )
    result = _run(
        endpoint, connection, Credential(refresh_token=Secret("old-rt"), client_secret=Secret("cs"))
    )
    url, form, headers = endpoint.calls[0]
    assert url == "https://accounts.zoho.eu/oauth/v2/token"
    assert form == {
        "client_id": "1000.CID",
        "client_secret": "cs",
        "grant_type": "refresh_token",
        "refresh_token": "old-rt",
    }
    assert "Authorization" not in headers
    # Zoho does not rotate: the old refresh token is kept; api_domain is remembered.
    assert result.refresh_token == Secret("old-rt")
    assert result.access_token == Secret("new-at")
    assert result.expires_at == NOW + timedelta(hours=1)
    assert result.metadata["api_domain"] == "https://www.zohoapis.eu"


def test_client_credentials_sends_scope_and_resource() -> None:
    endpoint = Recorder({"access_token": "at", "token_type": "Bearer"})
    connection = Connection(
        id="c",
        profile="generic",
        grant=GrantType.CLIENT_CREDENTIALS,
        client_id="svc",
        scopes=("a", "b"),
        token_url="https://idp/token",
        params={"resource": "urn:api"},
    )
    result = _run(endpoint, connection, Credential(client_secret=Secret("s")))
    _, form, headers = endpoint.calls[0]
    assert form == {"grant_type": "client_credentials", "scope": "a b", "resource": "urn:api"}
    assert headers["Authorization"].startswith("Basic ")
    # No expires_in and an opaque token: the profile's default lifetime applies, which for
    # the generic profile (nothing documented) is a conservative 15 minutes.
    assert result.expires_at == NOW + timedelta(seconds=900)
    assert result.scope == ("a", "b")


def test_jwt_bearer_assertion_is_signed_for_the_token_endpoint() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    key_file = {
        "type": "service_account",
        "client_email": "sa@p.iam.gserviceaccount.com",
        "private_key": pem,
        "private_key_id": "kid-1",
    }
    endpoint = Recorder({"access_token": "ya29.x", "expires_in": 3599, "token_type": "Bearer"})
    connection = Connection(
        id="g",
        profile="google",
        grant=GrantType.JWT_BEARER,
        scopes=("https://www.googleapis.com/auth/drive",),
        params={"subject": "admin@example.com"},
    )
    _run(endpoint, connection, Credential(private_key=Secret(json.dumps(key_file))))
    url, form, headers = endpoint.calls[0]
    assert url == "https://oauth2.googleapis.com/token"
    assert form["grant_type"] == JWT_BEARER_GRANT
    assert "Authorization" not in headers
    public = RSAKey.import_key(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    token = jwt.decode(form["assertion"], public, algorithms=["RS256"])
    assert token.header["kid"] == "kid-1"
    claims = token.claims
    assert claims["iss"] == "sa@p.iam.gserviceaccount.com"
    assert claims["aud"] == url
    assert claims["sub"] == "admin@example.com"
    assert claims["scope"] == "https://www.googleapis.com/auth/drive"
    assert claims["exp"] - claims["iat"] == 3600
    assert claims["iat"] == int(NOW.timestamp())


@pytest.mark.parametrize(
    "key_text",
    ["not json", "[]", '{"client_email": "x"}', '{"client_email": "x", "private_key": "nope"}'],
)
def test_bad_service_account_keys_are_config_errors(key_text: str) -> None:
    connection = Connection(id="g", profile="google", grant=GrantType.JWT_BEARER, scopes=("s",))
    with pytest.raises(ConfigError) as caught:
        _run(Recorder({}), connection, Credential(private_key=Secret(key_text)))
    assert "service account key" in str(caught.value)


# --- redaction at the boundary: every secret the grant knows ------------------------------------

# Values no shape rule recognises: 32 hex digits (a UUID's hex) and a passphrase.
HEX_RT = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
HEX_AT = "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b"
PASSPHRASE = "correct horse battery staple"


class Echo:
    """A token endpoint that refuses the grant and echoes every form value it was sent (and
    the extra ``leak`` text) in ``error_description``, raw and URL-encoded."""

    def __init__(self, leak: str = "", status: int = 400) -> None:
        self.leak = leak
        self.status = status

    async def post_form(
        self, url: str, form: Mapping[str, str], *, headers: Mapping[str, str]
    ) -> HttpResponse:
        echoed = " ".join(f"{k}={v} {quote(v, safe='')}" for k, v in form.items())
        auth = headers.get("Authorization")
        description = f"rejected at {url} ({echoed}) {self.leak} auth={auth}"
        body = {"error": "invalid_grant", "error_description": description}
        return HttpResponse(self.status, json.dumps(body).encode(), {})


@pytest.mark.parametrize("auth_method", [ClientAuthMethod.POST, ClientAuthMethod.BASIC])
def test_a_refresh_grant_scrubs_what_it_sent_from_the_answer(auth_method: ClientAuthMethod) -> None:
    with pytest.raises(InvalidGrant) as caught:
        asyncio.run(
            refresh_grant(
                Echo(),
                "https://idp/token",
                refresh_token=Secret(HEX_RT),
                client_id="client",
                client_secret=Secret(PASSPHRASE),
                auth_method=auth_method,
            )
        )
    message = str(caught.value)
    assert "rejected" in message
    assert HEX_RT not in message
    assert PASSPHRASE not in message
    assert quote(PASSPHRASE, safe="") not in message


def test_acquire_also_scrubs_the_stored_access_token() -> None:
    connection = Connection(
        id="c",
        profile="generic",
        grant=GrantType.REFRESH_TOKEN,
        client_id="client",
        token_url="https://idp/token",
    )
    stored = Credential(
        access_token=Secret(HEX_AT), refresh_token=Secret(HEX_RT), client_secret=Secret("cs")
    )
    with pytest.raises(InvalidGrant) as caught:
        _run(Echo(leak=f"current token {HEX_AT}"), connection, stored)
    assert HEX_AT not in str(caught.value)
    assert HEX_RT not in str(caught.value)


def test_a_jwt_bearer_grant_scrubs_its_key_and_assertion() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    key_text = json.dumps({"client_email": "sa@p.iam.gserviceaccount.com", "private_key": pem})
    body_line = pem.splitlines()[5]
    with pytest.raises(InvalidGrant) as caught:
        asyncio.run(
            jwt_bearer_grant(
                Echo(leak=f"key {json.dumps(pem)} {key_text}"),
                "https://oauth2.googleapis.com/token",
                key_file=Secret(key_text),
                scopes=("s",),
            )
        )
    message = str(caught.value)
    assert body_line not in message
    assert body_line not in message.replace("\\n", "\n")


def test_a_refresh_token_echoed_by_the_provider_reaches_no_log_line_or_event() -> None:
    """The defect: a refresh token echoed in ``error_description`` was logged in clear at the
    default level. A 32-hex token, which no shape rule catches: only redaction by value."""
    secrets_store, state, events = MemorySecretStore(), MemoryStateStore(), MemoryEventBus()
    clock = FakeClock()
    profiles = load_profiles()
    registry = ConnectionRegistry(
        secrets=secrets_store, state=state, profiles=profiles, clock=clock
    )
    connection = Connection(
        id="c1",
        profile="generic",
        grant=GrantType.REFRESH_TOKEN,
        client_id="client",
        token_url="https://idp.test/token",
    )
    registry.register(
        connection, Credential(refresh_token=Secret(HEX_RT), client_secret=Secret(PASSPHRASE))
    )
    refresher = Refresher(
        secrets=secrets_store,
        state=state,
        events=events,
        profiles=profiles,
        clock=clock,
        rng=random.Random(7),
    )
    with capture_logs("debug") as logs:
        asyncio.run(refresher.tick(Echo()))
    lines = logs.getvalue()
    assert "invalid_grant" in lines  # the failure was logged...
    assert HEX_RT not in lines  # ...without the token
    assert PASSPHRASE not in lines
    published = json.dumps([e.to_json() for e in events.events])
    assert "needs_reauth" in published
    assert HEX_RT not in published
