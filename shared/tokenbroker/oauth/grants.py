"""The grants tokenbroker performs, one function each, by RFC.

Each takes the transport first and returns a :class:`TokenResponse` or raises a classified
:class:`~tokenbroker.kernel.errors.ProviderError`. None of them retries: retrying is the caller's
decision, made from ``error.retryable`` (and, for a rotating refresh token, ``error.ambiguous``).

``rules`` are the provider profile's
:attr:`~tokenbroker.oauth.profiles.ProviderProfile.answer_rules` (``error_aliases`` alone is the
older shorthand); ``now`` is the caller's clock, for the lifetime of a JWT access token whose
answer states none. ``known_secrets`` are the connection's other secrets (the stored access
token, say): together with everything the grant itself sends (refresh token, client secret,
key, assertion) they are scrubbed by value from whatever text the provider answers with.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

from tokenbroker.kernel.errors import ConfigError
from tokenbroker.kernel.model import ClientAuthMethod
from tokenbroker.kernel.redact import is_sensitive_key
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.token_response import AnswerRules, TokenResponse, parse_token_response
from tokenbroker.ports import TokenEndpoint

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"  # RFC 7523 §2.1
ASSERTION_LIFETIME = 3600  # Google accepts at most one hour (and so do most servers).


def client_authentication(
    method: ClientAuthMethod, client_id: str | None, client_secret: Secret | None
) -> tuple[dict[str, str], dict[str, str]]:
    """Headers and form fields that authenticate the client (RFC 6749 §2.3.1).

    For HTTP Basic, id and secret are form-urlencoded before base64 as §2.3.1 requires; many
    servers break on secrets with ``:`` or ``%`` otherwise.
    """
    if method is ClientAuthMethod.NONE:
        return {}, ({"client_id": client_id} if client_id else {})
    if not client_id or client_secret is None:
        raise ConfigError(f"{method.value} needs a client_id and a client_secret")
    if method is ClientAuthMethod.BASIC:
        pair = f"{quote(client_id, safe='')}:{quote(client_secret.reveal(), safe='')}"
        token = base64.b64encode(pair.encode()).decode()
        return {"Authorization": f"Basic {token}"}, {}
    return {}, {"client_id": client_id, "client_secret": client_secret.reveal()}


def sent_secrets(form: Mapping[str, str], headers: Mapping[str, str]) -> list[str]:
    """The credential material a request carries (the form's tokens, secrets and assertions,
    the Authorization header): scrubbed from whatever the provider answers with."""
    return [v for k, v in (*form.items(), *headers.items()) if is_sensitive_key(k) and v]


async def token_request(
    endpoint: TokenEndpoint,
    token_url: str,
    form: dict[str, str],
    headers: Mapping[str, str],
    *,
    error_aliases: Mapping[str, str] | None,
    rules: AnswerRules | None,
    now: datetime | None,
    known_secrets: Iterable[Secret | None],
) -> TokenResponse:
    """POST a grant's form to the token endpoint and read the answer (shared by every grant,
    the device-code grant of :mod:`tokenbroker.oauth.device` too)."""
    # Whatever credential material was sent is known too: the form's tokens, secrets and
    # assertions, and the Authorization header.
    sent = sent_secrets(form, headers)
    response = await endpoint.post_form(
        token_url, form, headers={"Accept": "application/json", **headers}
    )
    return parse_token_response(
        response,
        error_aliases=error_aliases,
        rules=rules,
        known_secrets=[*known_secrets, *map(Secret, sent)],
        now=now,
    )


async def refresh_grant(
    endpoint: TokenEndpoint,
    token_url: str,
    *,
    refresh_token: Secret,
    client_id: str | None,
    client_secret: Secret | None,
    auth_method: ClientAuthMethod,
    scopes: Sequence[str] = (),
    extra: Mapping[str, str] | None = None,
    error_aliases: Mapping[str, str] | None = None,
    rules: AnswerRules | None = None,
    now: datetime | None = None,
    known_secrets: Iterable[Secret | None] = (),
) -> TokenResponse:
    """RFC 6749 §6. ``scopes``, when given, must be a subset of the original grant's."""
    grant = {"grant_type": "refresh_token", "refresh_token": refresh_token.reveal()}
    headers, form = grant_form(
        auth_method, client_id, client_secret, grant, scopes=scopes, extra=extra
    )
    return await token_request(
        endpoint,
        token_url,
        form,
        headers,
        error_aliases=error_aliases,
        rules=rules,
        now=now,
        known_secrets=[refresh_token, client_secret, *known_secrets],
    )


async def authorization_code_grant(
    endpoint: TokenEndpoint,
    token_url: str,
    *,
    code: Secret,
    redirect_uri: str,
    code_verifier: Secret,
    client_id: str | None,
    client_secret: Secret | None,
    auth_method: ClientAuthMethod,
    error_aliases: Mapping[str, str] | None = None,
    rules: AnswerRules | None = None,
    now: datetime | None = None,
    known_secrets: Iterable[Secret | None] = (),
) -> TokenResponse:
    """RFC 6749 §4.1.3 with PKCE (RFC 7636 §4.5): the code, the ``redirect_uri`` it was
    asked with, and the ``code_verifier``. Sent once: a code is single-use (§4.1.2), and a
    provider that sees it twice revokes what it issued for it (§10.5), so nothing retries."""
    grant = {
        "grant_type": "authorization_code",
        "code": code.reveal(),
        "redirect_uri": redirect_uri,
        "code_verifier": code_verifier.reveal(),
    }
    headers, form = grant_form(auth_method, client_id, client_secret, grant, scopes=(), extra=None)
    return await token_request(
        endpoint,
        token_url,
        form,
        headers,
        error_aliases=error_aliases,
        rules=rules,
        now=now,
        known_secrets=[code, code_verifier, client_secret, *known_secrets],
    )


async def client_credentials_grant(
    endpoint: TokenEndpoint,
    token_url: str,
    *,
    client_id: str,
    client_secret: Secret,
    auth_method: ClientAuthMethod,
    scopes: Sequence[str] = (),
    extra: Mapping[str, str] | None = None,
    error_aliases: Mapping[str, str] | None = None,
    rules: AnswerRules | None = None,
    now: datetime | None = None,
    known_secrets: Iterable[Secret | None] = (),
) -> TokenResponse:
    """RFC 6749 §4.4. ``extra`` carries e.g. an RFC 8707 ``resource``."""
    grant = {"grant_type": "client_credentials"}
    headers, form = grant_form(
        auth_method, client_id, client_secret, grant, scopes=scopes, extra=extra
    )
    return await token_request(
        endpoint,
        token_url,
        form,
        headers,
        error_aliases=error_aliases,
        rules=rules,
        now=now,
        known_secrets=[client_secret, *known_secrets],
    )


def grant_form(
    auth_method: ClientAuthMethod,
    client_id: str | None,
    client_secret: Secret | None,
    grant: Mapping[str, str],
    *,
    scopes: Sequence[str],
    extra: Mapping[str, str] | None,
) -> tuple[dict[str, str], dict[str, str]]:
    """Headers and form of a client-authenticated grant: the client's credentials (RFC 6749
    §2.3.1), the grant's own fields, ``scope`` when asked, then any extra parameters."""
    headers, form = client_authentication(auth_method, client_id, client_secret)
    form.update(grant)
    if scopes:
        form["scope"] = " ".join(scopes)
    form.update(extra or {})
    return headers, form


def service_account_info(key_file: Secret) -> dict[str, Any]:
    """Parse and check a Google service-account key file (JSON)."""
    try:
        info = json.loads(key_file.reveal())
    except ValueError:
        raise ConfigError("service account key: not valid JSON") from None
    if not isinstance(info, dict):
        raise ConfigError("service account key: expected a JSON object")
    for name in ("client_email", "private_key"):
        if not isinstance(info.get(name), str) or not info[name]:
            raise ConfigError(f"service account key: field {name!r} is missing")
    return info


def jwt_bearer_assertion(
    info: Mapping[str, Any],
    *,
    audience: str,
    scopes: Sequence[str],
    subject: str | None = None,
    issued_at: float | None = None,
) -> str:
    """A signed RS256 assertion for Google's service-account flow (RFC 7523 §3).

    ``iss`` is the service account, ``aud`` the token endpoint it is sent to, ``scope`` the
    space-separated scopes, ``sub`` the user for domain-wide delegation.
    See https://developers.google.com/identity/protocols/oauth2/service-account#authorizingrequests
    """
    from joserfc import jwt  # noqa: PLC0415 - kept off the cold-start path
    from joserfc.jwk import RSAKey  # noqa: PLC0415

    now = int(issued_at if issued_at is not None else time.time())
    claims: dict[str, Any] = {
        "iss": info["client_email"],
        "aud": audience,
        "scope": " ".join(scopes),
        "iat": now,
        "exp": now + ASSERTION_LIFETIME,
    }
    if subject:
        claims["sub"] = subject
    header: dict[str, Any] = {"alg": "RS256", "typ": "JWT"}
    if info.get("private_key_id"):
        header["kid"] = info["private_key_id"]
    try:
        key = RSAKey.import_key(info["private_key"])
    except (ValueError, TypeError):
        raise ConfigError("service account key: private_key is not an RSA PEM key") from None
    return jwt.encode(header, claims, key)


async def jwt_bearer_grant(
    endpoint: TokenEndpoint,
    token_url: str,
    *,
    key_file: Secret,
    scopes: Sequence[str],
    subject: str | None = None,
    issued_at: float | None = None,
    error_aliases: Mapping[str, str] | None = None,
    rules: AnswerRules | None = None,
    now: datetime | None = None,
    known_secrets: Iterable[Secret | None] = (),
) -> TokenResponse:
    """RFC 7523 §2.1: exchange a self-signed assertion for an access token. No client auth."""
    info = service_account_info(key_file)
    assertion = jwt_bearer_assertion(
        info, audience=token_url, scopes=scopes, subject=subject, issued_at=issued_at
    )
    form = {"grant_type": JWT_BEARER_GRANT, "assertion": assertion}
    return await token_request(
        endpoint,
        token_url,
        form,
        {},
        error_aliases=error_aliases,
        rules=rules,
        now=now,
        known_secrets=[key_file, Secret(info["private_key"]), *known_secrets],
    )
