"""The authorization-code flow's protocol parts (RFC 6749 §4.1 with PKCE, RFC 7636), no I/O.

* :func:`new_code_verifier` / :func:`code_challenge`: PKCE S256 (RFC 7636 §4.1-4.2). The
  verifier is 32 random octets, base64url: 43 characters of the unreserved set, the length
  §4.1 recommends ("a 32-octet sequence ... base64url-encoded to produce a 43-octet URL
  safe string").
* :func:`new_state`: the ``state`` (RFC 6749 §10.12): 256 random bits. It is looked up by
  :func:`state_key` (its SHA-256), so a store never holds the value a callback presents.
* :func:`authorization_request_url`: the authorization request (§4.1.1) with the connection's
  scopes and the profile's extras.
* :func:`parse_callback`: the authorization response (§4.1.2) or its error (§4.1.2.1), checked
  for duplicated parameters (§3.1: "Request and response parameters MUST NOT be included more
  than once").
* :func:`granted_scopes` / :func:`missing_scopes`: what the provider granted (§5.1: a token
  answer without ``scope`` grants what was asked, §3.3).
* :func:`account_location`: the callback parameters that say where the account lives (Zoho's
  ``accounts-server``), accepted only when the profile knows the host (RFC 9700 §4.4, mix-up).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tokenbroker.kernel.errors import (
    OAUTH_ERRORS,
    ConfigError,
    InvalidAuthorizationState,
    ProviderError,
    UnknownProviderError,
)
from tokenbroker.kernel.model import Connection
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.profiles import ProviderProfile

#: RFC 7636 §4.1: 43 to 128 characters.
VERIFIER_BYTES = 32
#: RFC 6749 §10.10 asks for at most 2^-128 odds of guessing; RFC 9700 §4.7.1 the same for
#: ``state``. 32 bytes is 2^-256.
STATE_BYTES = 32
#: Query parameters the flow itself sets; a profile or connection may not override them.
_FLOW_PARAMS = frozenset(
    {
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "code_challenge",
        "code_challenge_method",
    }
)
#: Error codes of the authorization response (RFC 6749 §4.1.2.1) beyond the token endpoint's.
_AUTHORIZATION_ERRORS = frozenset(
    {
        "invalid_request",
        "unauthorized_client",
        "access_denied",
        "unsupported_response_type",
        "invalid_scope",
        "server_error",
        "temporarily_unavailable",
    }
)
#: Bounds on what a callback may carry: codes are short (Google's ~70 characters, Zoho's
#: ~70); an error description is a sentence.
MAX_CALLBACK_VALUE = 4096


def new_code_verifier() -> Secret:
    """A fresh PKCE code verifier (RFC 7636 §4.1)."""
    return Secret(_b64url(secrets.token_bytes(VERIFIER_BYTES)))


def code_challenge(verifier: Secret) -> str:
    """``BASE64URL-ENCODE(SHA256(ASCII(code_verifier)))`` (RFC 7636 §4.2, S256)."""
    return _b64url(hashlib.sha256(verifier.reveal().encode("ascii")).digest())


def new_state() -> Secret:
    """A fresh ``state`` value: random, unguessable, single use."""
    return Secret(secrets.token_urlsafe(STATE_BYTES))


def state_key(state: Secret) -> str:
    """What a session is stored under: the state's SHA-256, never the state itself."""
    return hashlib.sha256(state.reveal().encode()).hexdigest()


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def check_endpoint_url(url: str, what: str) -> str:
    """An endpoint the operator's browser or the broker is sent to: https (RFC 6749 §3.1
    "MUST require the use of TLS"), http only to a loopback host; no fragment (§3.1); no
    user info."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise ConfigError(f"{what}: not a valid URL") from None
    if parts.scheme not in ("https", "http") or not host:
        raise ConfigError(f"{what}: must be an https URL with a host")
    if parts.scheme == "http" and not is_loopback(host):
        raise ConfigError(f"{what}: must use https (http only to a loopback address)")
    if parts.fragment or url.endswith("#"):
        raise ConfigError(f"{what}: must not have a fragment (RFC 6749 §3.1)")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{what}: must not carry user info")
    return url


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def authorization_request_url(
    profile: ProviderProfile,
    connection: Connection,
    *,
    redirect_uri: str,
    state: Secret,
    challenge: str,
) -> str:
    """The URL the account holder's browser opens (RFC 6749 §4.1.1, RFC 7636 §4.3).

    The endpoint's own query is kept (§3.1: "MUST be retained when adding additional query
    parameters"); the profile's ``authorize_params`` are added, and may not replace what the
    flow sets (``state``, ``code_challenge``, ...).
    """
    if not connection.client_id:
        raise ConfigError(f"connection {connection.id!r}: the flow needs a client_id")
    endpoint = check_endpoint_url(
        profile.authorization_url_for(connection),
        f"connection {connection.id!r}: authorization_url",
    )
    clash = sorted(set(profile.authorize_params) & _FLOW_PARAMS)
    if clash:
        raise ConfigError(
            f"profile {profile.name!r}: authorize_params may not set {', '.join(clash)}"
        )
    query: dict[str, str] = {
        "response_type": "code",
        "client_id": connection.client_id,
        "redirect_uri": redirect_uri,
    }
    if connection.scopes:
        query["scope"] = " ".join(connection.scopes)
    query.update(state=state.reveal(), code_challenge=challenge, code_challenge_method="S256")
    query.update(profile.authorize_params)
    parts = urlsplit(endpoint)
    own = parse_qsl(parts.query, keep_blank_values=True)
    taken = {k for k, _ in own} & set(query)
    if taken:
        raise ConfigError(
            f"connection {connection.id!r}: authorization_url already sets "
            f"{', '.join(sorted(taken))}"
        )
    return urlunsplit(parts._replace(query=urlencode([*own, *query.items()])))


@dataclass(frozen=True)
class AuthorizationResponse:
    """A successful callback (RFC 6749 §4.1.2): the code, the state, any other parameters
    (Zoho's ``accounts-server``, RFC 9207's ``iss``)."""

    code: Secret
    state: Secret
    extras: Mapping[str, str]


@dataclass(frozen=True)
class AuthorizationError:
    """A callback carrying the provider's refusal (RFC 6749 §4.1.2.1)."""

    state: Secret
    error: ProviderError


def parse_callback(params: Sequence[tuple[str, str]]) -> AuthorizationResponse | AuthorizationError:
    """The callback's query, as received (every pair, so duplicates are seen).

    A callback without ``state`` is refused as ``malformed``: it cannot be tied to a request
    this broker made, so nothing of it is believed (not even an error)."""
    seen: dict[str, str] = {}
    for name, value in params:
        if name in seen:
            raise InvalidAuthorizationState(
                f"the callback repeats the parameter {name!r} (RFC 6749 §3.1); refused",
                reason="malformed",
            )
        if len(value) > MAX_CALLBACK_VALUE:
            raise InvalidAuthorizationState(
                f"the callback's {name!r} is too long; refused", reason="malformed"
            )
        seen[name] = value
    state = seen.pop("state", "")
    if not state:
        raise InvalidAuthorizationState(
            "the callback has no state: it does not answer a request of this broker",
            reason="malformed",
        )
    if "error" in seen:
        return AuthorizationError(Secret(state), provider_error(seen))
    code = seen.pop("code", "")
    if not code:
        raise InvalidAuthorizationState(
            "the callback has neither a code nor an error", reason="malformed"
        )
    return AuthorizationResponse(Secret(code), Secret(state), seen)


def provider_error(params: Mapping[str, str]) -> ProviderError:
    """The provider's refusal as the classified error its code names (RFC 6749 §4.1.2.1).
    The description is the provider's text, shown printable and bounded."""
    code = params.get("error", "")
    description = "".join(c for c in params.get("error_description", "") if c.isprintable())[:300]
    what = {
        "access_denied": "the account holder (or the provider) denied the request",
        "invalid_scope": "the provider refused the requested scopes",
        "unauthorized_client": "the client may not use the authorization-code flow",
        "unsupported_response_type": "the provider does not support response_type=code",
        "invalid_request": "the provider found the authorization request invalid",
        "server_error": "the provider failed",
        "temporarily_unavailable": "the provider is temporarily unavailable",
    }.get(code, "the provider refused the request")
    message = f"{what} ({code or 'no error code'}" + (f": {description})" if description else ")")
    cls = OAUTH_ERRORS.get(code) if code in _AUTHORIZATION_ERRORS else None
    if cls is None:
        return UnknownProviderError(message)
    return cls(message)


def granted_scopes(asked: Sequence[str], answered: Sequence[str] | None) -> tuple[str, ...]:
    """What was granted: the answer's ``scope``, or what was asked when it has none (RFC
    6749 §5.1: "OPTIONAL, if identical to the scope requested")."""
    return tuple(answered) if answered is not None else tuple(asked)


def missing_scopes(asked: Sequence[str], granted: Sequence[str]) -> tuple[str, ...]:
    """Declared scopes the grant lacks, in the declared order."""
    held = set(granted)
    return tuple(s for s in asked if s not in held)


def account_location(
    profile: ProviderProfile, connection: Connection, extras: Mapping[str, str]
) -> dict[str, str]:
    """The params the callback sets (Zoho: ``data_centre`` from ``accounts-server``).

    The value must be ``https://HOST`` for a HOST the param lists: a callback naming any other
    server is refused, since the code exchange (with the client secret) would go there."""
    found: dict[str, str] = {}
    for callback, param in profile.callback_params.items():
        value = extras.get(callback)
        if value is None:
            continue
        spec = profile.params[param]
        values = spec.values or {}
        parts = urlsplit(value)
        key = next((k for k, host in values.items() if host == parts.hostname), None)
        if parts.scheme != "https" or key is None or parts.path not in ("", "/"):
            raise InvalidAuthorizationState(
                f"connection {connection.id!r}: the callback's {callback} is not a server the "
                f"profile {profile.name!r} knows; refused (the code is not sent anywhere)",
                reason="malformed",
            )
        found[param] = key
    return found
