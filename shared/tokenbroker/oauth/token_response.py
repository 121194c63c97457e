"""Turning a token endpoint's HTTP answer into a token or a classified error.

RFC 6749 §5.1 (successful response) and §5.2 (error response); RFC 6585 §4 and RFC 9110
§10.2.3 for 429/503 with ``Retry-After``. Raw HTTP bodies become exceptions here, at the
boundary, and nowhere else (cf. google-auth ``_client._handle_error_response``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenbroker.kernel.errors import (
    OAUTH_ERRORS,
    InvalidClient,
    MalformedResponse,
    ProviderError,
    ProviderServerError,
    TemporarilyUnavailable,
    UnknownProviderError,
)
from tokenbroker.kernel.http import HttpResponse, parse_retry_after
from tokenbroker.kernel.redact import scrub
from tokenbroker.kernel.secret import Secret

# Non-secret fields of a token response worth keeping (Zoho's api_domain, Google's id fields).
_KEPT_EXTRAS = ("api_domain", "instance_url", "resource")


@dataclass(frozen=True)
class TokenResponse:
    access_token: Secret
    token_type: str
    expires_in: int | None = None
    refresh_token: Secret | None = None
    scope: tuple[str, ...] | None = None
    extras: Mapping[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"TokenResponse(token_type={self.token_type!r}, expires_in={self.expires_in}, "
            f"rotated={self.refresh_token is not None}, scope={self.scope})"
        )


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _error_from_body(
    data: Mapping[str, Any],
    status: int,
    retry_after: float | None,
    aliases: Mapping[str, str],
) -> ProviderError:
    raw_code = str(data.get("error"))
    code = aliases.get(raw_code, raw_code)
    description = data.get("error_description")
    detail = f": {scrub(str(description))[:200]}" if description else ""
    cls = OAUTH_ERRORS.get(code)
    if cls is None:
        return UnknownProviderError(
            f"token endpoint answered error {scrub(raw_code)[:64]!r} (HTTP {status}){detail}",
            status=status,
            retry_after=retry_after,
        )
    return cls(
        f"token endpoint answered {code} (HTTP {status}){detail}",
        status=status,
        retry_after=retry_after,
    )


def parse_token_response(
    response: HttpResponse, *, error_aliases: Mapping[str, str] | None = None
) -> TokenResponse:
    """A usable :class:`TokenResponse`, or the :class:`ProviderError` that describes why not."""
    aliases = error_aliases or {}
    status = response.status
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    data = _json_object(response.body)

    if 200 <= status < 300:
        if data is None:
            raise MalformedResponse(
                f"token endpoint answered HTTP {status} without a JSON object", status=status
            )
        if data.get("error"):
            # Some providers (Zoho) report failures with HTTP 200. Never store these.
            raise _error_from_body(data, status, retry_after, aliases)
        return _token_from_body(data, status)

    if data is not None and data.get("error"):
        error = _error_from_body(data, status, retry_after, aliases)
        if (status >= 500 or status == 429) and not error.retryable:
            # Whatever code it carries, a 5xx/429 is the server's trouble, not the grant's.
            transient = TemporarilyUnavailable if status in (429, 503) else ProviderServerError
            raise transient(error.message, status=status, retry_after=retry_after)
        raise error
    if status in (429, 503):
        raise TemporarilyUnavailable(
            f"token endpoint answered HTTP {status}", status=status, retry_after=retry_after
        )
    if status >= 500 or status == 408:
        raise ProviderServerError(
            f"token endpoint answered HTTP {status}", status=status, retry_after=retry_after
        )
    if status == 401:
        raise InvalidClient("token endpoint answered HTTP 401 without an error body", status=401)
    raise UnknownProviderError(
        f"token endpoint answered HTTP {status} without an OAuth error body", status=status
    )


def _token_from_body(data: Mapping[str, Any], status: int) -> TokenResponse:
    access_token = data.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise MalformedResponse(
            f"token endpoint answered HTTP {status} without an access_token", status=status
        )
    token_type = data.get("token_type") or "Bearer"
    if not isinstance(token_type, str):
        raise MalformedResponse("token_type is not a string", status=status)
    expires_in_raw = data.get("expires_in")
    expires_in: int | None = None
    if expires_in_raw is not None:
        try:
            expires_in = int(expires_in_raw)
        except (TypeError, ValueError):
            raise MalformedResponse("expires_in is not a number", status=status) from None
        if expires_in <= 0:
            raise MalformedResponse("expires_in is not positive", status=status)
    refresh_token = data.get("refresh_token")
    if refresh_token is not None and (not isinstance(refresh_token, str) or not refresh_token):
        raise MalformedResponse("refresh_token is not a non-empty string", status=status)
    scope_raw = data.get("scope")
    scope = tuple(scope_raw.split()) if isinstance(scope_raw, str) else None
    extras = {k: str(data[k]) for k in _KEPT_EXTRAS if isinstance(data.get(k), str)}
    return TokenResponse(
        access_token=Secret(access_token),
        token_type=token_type,
        expires_in=expires_in,
        refresh_token=Secret(refresh_token) if refresh_token else None,
        scope=scope,
        extras=extras,
    )
