"""Getting a fresh credential for a connection: pick the grant, run it, build the new version."""

from __future__ import annotations

from datetime import datetime, timedelta

from tokenbroker.kernel.errors import ConfigError
from tokenbroker.kernel.log import get_logger
from tokenbroker.kernel.model import Connection, Credential, GrantType
from tokenbroker.oauth.grants import client_credentials_grant, jwt_bearer_grant, refresh_grant
from tokenbroker.oauth.profiles import ProviderProfile
from tokenbroker.oauth.token_response import TokenResponse
from tokenbroker.ports import TokenEndpoint

_log = get_logger(component="acquire")

# Connection params that are sent as extra form fields with client_credentials.
_FORM_PARAMS = ("resource", "audience")


def check_material(connection: Connection, credential: Credential) -> None:
    """Refuse to register a connection whose stored material cannot work for its grant."""
    where = f"connection {connection.id!r}"
    if connection.grant is GrantType.REFRESH_TOKEN and credential.refresh_token is None:
        raise ConfigError(f"{where}: the refresh_token grant needs a refresh token")
    if connection.grant is GrantType.CLIENT_CREDENTIALS and (
        credential.client_secret is None or not connection.client_id
    ):
        raise ConfigError(f"{where}: client_credentials needs client_id and a client secret")
    if connection.grant is GrantType.JWT_BEARER and credential.private_key is None:
        raise ConfigError(f"{where}: jwt_bearer needs a service account key")
    if connection.grant is GrantType.STATIC and credential.client_secret is None:
        raise ConfigError(f"{where}: a static connection needs its secret (client secret / key)")


async def acquire(
    endpoint: TokenEndpoint,
    connection: Connection,
    profile: ProviderProfile,
    current: Credential,
    now: datetime,
) -> Credential:
    """Run the connection's grant and return the credential to store as the next version
    (:func:`request_token` then :func:`next_credential`)."""
    response = await request_token(endpoint, connection, profile, current, now)
    return next_credential(connection, current, response, now)


async def request_token(
    endpoint: TokenEndpoint,
    connection: Connection,
    profile: ProviderProfile,
    current: Credential,
    now: datetime,
) -> TokenResponse:
    """Run the connection's grant: the provider's answer, or the classified error.

    Apart from :func:`next_credential` so that a caller holding the answer still has it --
    and the refresh token in it, which a rotating provider has already swapped for the one
    sent -- when building the credential fails.
    """
    token_url = profile.token_url_for(connection)
    params = profile.resolve_params(connection.params)
    rules = profile.answer_rules
    # Every secret stored for the connection, scrubbed by value from the provider's text (the
    # grants add what they send themselves).
    known = (current.access_token, current.refresh_token, current.client_secret)
    response: TokenResponse
    if connection.grant is GrantType.REFRESH_TOKEN:
        if current.refresh_token is None:
            raise ConfigError(f"connection {connection.id!r}: no refresh token stored")
        response = await refresh_grant(
            endpoint,
            token_url,
            refresh_token=current.refresh_token,
            client_id=connection.client_id,
            client_secret=current.client_secret,
            auth_method=profile.auth_method_for(connection),
            rules=rules,
            now=now,
            known_secrets=known,
        )
    elif connection.grant is GrantType.CLIENT_CREDENTIALS:
        if current.client_secret is None or not connection.client_id:
            raise ConfigError(f"connection {connection.id!r}: client_id/secret missing")
        response = await client_credentials_grant(
            endpoint,
            token_url,
            client_id=connection.client_id,
            client_secret=current.client_secret,
            auth_method=profile.auth_method_for(connection),
            scopes=connection.scopes,
            extra={k: params[k] for k in _FORM_PARAMS if k in params},
            rules=rules,
            now=now,
            known_secrets=known,
        )
    elif connection.grant is GrantType.JWT_BEARER:
        if current.private_key is None:
            raise ConfigError(f"connection {connection.id!r}: no service account key stored")
        response = await jwt_bearer_grant(
            endpoint,
            token_url,
            key_file=current.private_key,
            scopes=connection.scopes,
            subject=params.get("subject"),
            issued_at=now.timestamp(),
            rules=rules,
            now=now,
            known_secrets=known,
        )
    else:
        raise ConfigError(
            f"connection {connection.id!r}: {connection.grant.value} is not refreshed"
        )
    return response


def next_credential(
    connection: Connection,
    current: Credential,
    response: TokenResponse,
    now: datetime,
) -> Credential:
    """The credential to store as the next version, from the provider's answer.

    The static material (client secret, key file) is carried forward. When a refresh response
    omits ``refresh_token`` the old one is kept (RFC 6749 §6: the server MAY issue a new one);
    when it includes one, the old one is dropped and never used again. The new version's
    expiry is the answer's bounded lifetime (``expires_in``, else a JWT's ``exp``, else the
    profile's default: :attr:`~tokenbroker.oauth.token_response.TokenResponse.lifetime_seconds`).
    """
    for warning in response.warnings:
        _log.warning(
            "token answer was odd but usable", connection_id=connection.id, warning=warning
        )
    lifetime = response.lifetime_seconds
    return current.with_token(
        access_token=response.access_token,
        refresh_token=response.refresh_token or current.refresh_token,
        token_type=response.token_type,
        scope=response.scope if response.scope is not None else connection.scopes,
        expires_at=now + timedelta(seconds=lifetime),
        obtained_at=now,
        metadata={**current.metadata, **response.extras},
    )
