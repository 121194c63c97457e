"""Grant requests as they go on the wire (RFC 6749 §2.3.1, §4.4, §6; RFC 7523)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwt
from joserfc.jwk import RSAKey

from tokenbroker.kernel.errors import ConfigError
from tokenbroker.kernel.http import HttpResponse
from tokenbroker.kernel.model import ClientAuthMethod, Connection, Credential, GrantType
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.acquire import acquire
from tokenbroker.oauth.grants import JWT_BEARER_GRANT, client_authentication
from tokenbroker.oauth.profiles import load_profiles

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


def _run(endpoint: Recorder, connection: Connection, credential: Credential) -> Credential:
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
