"""The issuer's ``POST /token`` contract (docs/issuer.openapi.yaml) as values, without I/O:
what a request carries, and what an answer means.

An answer is a :class:`Reply` (the broker said something) or a :class:`NoReply` (it did not:
a timeout or a failed connection). :func:`read_answer` turns either into a
:class:`~tokenbroker.consumer.token.BrokerToken` or the typed error it stands for; that is the
client's whole error classification (docs/client.md, *Errors*).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from tokenbroker.consumer.errors import (
    BrokerAccessDenied,
    BrokerBadRequest,
    BrokerInvalidToken,
    BrokerNeedsReauth,
    BrokerRequestError,
    BrokerUnavailable,
    Unavailability,
)
from tokenbroker.consumer.token import BrokerToken, TokenKey
from tokenbroker.kernel.clock import parse_iso
from tokenbroker.kernel.errors import ConfigError, TokenBrokerError
from tokenbroker.kernel.http import parse_retry_after
from tokenbroker.kernel.redact import scrub
from tokenbroker.kernel.secret import Secret

MAX_RESPONSE_BYTES = 64 * 1024  # a token answer is well under 10 KB
USER_AGENT = "tokenbroker-client"
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


def check_base_url(base_url: str) -> str:
    """``https://...``, or ``http://`` to a loopback address only: the request carries the
    caller's ID token, a bearer credential (RFC 6750 §5.3: always TLS)."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"base_url must be an http(s) URL, got {base_url!r}")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ConfigError("base_url must use https (http is allowed for loopback hosts only)")
    if parts.query or parts.fragment:
        raise ConfigError("base_url must not have a query or fragment")
    return base_url.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- the request ----------------------------------------------------------------------------


def request_body(key: TokenKey, min_ttl_seconds: int) -> bytes:
    """The JSON body; no ``scopes`` means "what the policy grants me for this connection"."""
    payload: dict[str, Any] = {"connection": key.connection}
    if key.scopes:
        payload["scopes"] = list(key.scopes)
    payload["min_ttl_seconds"] = min_ttl_seconds
    return json.dumps(payload).encode()


#: Cloud Run's invoker header: checked instead of ``Authorization`` when present
#: (https://cloud.google.com/run/docs/authenticating/service-to-service#acquire-token).
SERVERLESS_AUTHORIZATION = "X-Serverless-Authorization"


def request_headers(id_token: str, *, serverless_authorization: bool = True) -> dict[str, str]:
    """The caller's ID token as a bearer credential (RFC 6750 §2.1).

    With ``serverless_authorization`` the same token also goes in
    ``X-Serverless-Authorization``: Cloud Run's IAM front end then checks (and strips the
    signature of) that copy and leaves ``Authorization`` signed, so one request works with the
    issuer in either identity mode (docs/issuer.md, *Caller identity*): ``platform`` reads the
    checked copy, ``verify`` verifies the signed one. The header goes to the broker's URL only
    (no redirect is followed), never further.
    """
    headers = {
        "Authorization": f"Bearer {id_token}",
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": USER_AGENT,
    }
    if serverless_authorization:
        headers[SERVERLESS_AUTHORIZATION] = f"Bearer {id_token}"
    return headers


# --- the answer -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What the broker answered. ``oversized``: the body passed :data:`MAX_RESPONSE_BYTES`
    and was not read to its end (``body`` holds what was)."""

    status: int
    body: bytes
    retry_after: str | None = None
    oversized: bool = False


@dataclass(frozen=True)
class NoReply:
    """No answer: the exchange timed out, or failed before an answer (refused, reset, DNS).
    ``detail`` names the failure (an exception class name), never a value."""

    timed_out: bool
    detail: str = ""


class ReplyBody:
    """Collects an answer's body as the transport hands it over, and says when to stop
    reading: a proxy's page or a runaway stream must not fill the worker's memory."""

    def __init__(self, status: int, retry_after: str | None) -> None:
        self._status = status
        self._retry_after = retry_after
        self._data = bytearray()

    def take(self, chunk: bytes) -> bool:
        """Add ``chunk``; ``False`` once the body is too large: read no further."""
        self._data += chunk
        return len(self._data) <= MAX_RESPONSE_BYTES

    def reply(self) -> Reply:
        oversized = len(self._data) > MAX_RESPONSE_BYTES
        return Reply(self._status, bytes(self._data), self._retry_after, oversized)


def read_answer(
    answer: Reply | NoReply, key: TokenKey, *, received: datetime, timeout: float
) -> BrokerToken:
    """The answer to a request for ``key`` as a token, or the typed error it stands for.
    ``received`` is when it arrived, in this process's clock; ``timeout`` the attempt's."""
    if isinstance(answer, NoReply):
        if answer.timed_out:
            raise BrokerUnavailable(
                f"broker timed out after {timeout:.1f}s", reason=Unavailability.TIMEOUT
            )
        raise BrokerUnavailable(
            f"broker unreachable: {answer.detail}", reason=Unavailability.UNREACHABLE
        )
    if answer.oversized:
        raise _malformed("answer larger than 64 KiB", answer.status)
    if answer.status == 200:
        return decode_token(answer.body, key, received)
    raise error_for(answer, received)


def error_for(reply: Reply, now: datetime) -> TokenBrokerError:
    """An error answer as an exception (RFC 6749 §5.2 body, RFC 6750 §3.1 for 401).

    Unavailability (retryable): the contract's JSON ``503 temporarily_unavailable`` (one
    credential cannot be served now), 429, other 5xx and 408. Anything else is a refusal.
    """
    status = reply.status
    data = _json_object(reply.body) or {}
    error = data.get("error") if isinstance(data.get("error"), str) else None
    raw_description = data.get("error_description")
    description = scrub(raw_description)[:300] if isinstance(raw_description, str) else ""
    retry_after = parse_retry_after(reply.retry_after, now)
    said = f"{error}: {description}" if error else f"HTTP {status}"
    if status == 503 and error == "temporarily_unavailable":
        return BrokerUnavailable(
            f"broker: {said}",
            reason=Unavailability.TEMPORARILY_UNAVAILABLE,
            status=status,
            retry_after=retry_after,
        )
    if status == 429:
        return BrokerUnavailable(
            f"broker rate limit: {said}",
            reason=Unavailability.RATE_LIMITED,
            status=status,
            retry_after=retry_after,
        )
    if status >= 500 or status == 408:
        return BrokerUnavailable(
            f"broker failed: {said}",
            reason=Unavailability.SERVER_ERROR,
            status=status,
            retry_after=retry_after,
        )
    refusal: type[BrokerRequestError] = {
        400: BrokerBadRequest,
        401: BrokerInvalidToken,
        403: BrokerAccessDenied,
        409: BrokerNeedsReauth,
    }.get(status, BrokerRequestError)
    return refusal(
        f"broker refused (HTTP {status}) {said}",
        status=status,
        error=error or ("unexpected_status" if refusal is BrokerRequestError else refusal.code),
        description=description,
    )


def decode_token(body: bytes, key: TokenKey, received: datetime) -> BrokerToken:
    """A 200 answer as a :class:`BrokerToken`; anything unusable is a retryable
    ``malformed_response`` (most often a proxy or maintenance page), never cached."""
    data = _json_object(body)
    if data is None:
        raise _malformed("not a JSON object")
    access_token = data.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise _malformed("no access_token")
    token_type = data.get("token_type", "Bearer")
    if not isinstance(token_type, str) or not token_type:
        raise _malformed("bad token_type")
    if token_type.lower() == "bearer":
        token_type = "Bearer"  # noqa: S105 - RFC 6750 §4: case-insensitive on the wire
    if data.get("connection", key.connection) != key.connection:
        raise _malformed("the token is for another connection")
    expires_at, refresh_after = token_times(data, received)
    scope = data.get("scope")
    return BrokerToken(
        access_token=Secret(access_token),
        token_type=token_type,
        expires_at=expires_at,
        refresh_after=refresh_after,
        scope=tuple(scope.split()) if isinstance(scope, str) else key.scopes,
        connection=key.connection,
    )


def token_times(data: Mapping[str, Any], received: datetime) -> tuple[datetime, datetime]:
    """``(expires_at, refresh_after)`` in this process's clock.

    ``expires_in`` is relative (RFC 6749 §5.1), ``expires_at`` absolute. If the broker's clock
    runs ahead of ours, ``received + expires_in`` is the earlier of the two and is kept, and
    ``refresh_after`` moves back by the same amount: a token is never believed to live longer
    than either figure says.
    """
    stated_at, stated_in = data.get("expires_at"), data.get("expires_in")
    try:
        stated = parse_iso(stated_at) if isinstance(stated_at, str) else None
        relative = (
            received + timedelta(seconds=stated_in)
            if isinstance(stated_in, int | float) and not isinstance(stated_in, bool)
            else None
        )
        expiries = [t for t in (stated, relative) if t is not None]
        if not expiries:
            raise _malformed("no expires_at or expires_in")
        expires_at = min(expiries)
        hint = data.get("refresh_after")
        if isinstance(hint, str):
            refresh_after = parse_iso(hint) - ((stated or expires_at) - expires_at)
        else:
            refresh_after = received + (expires_at - received) / 2
    except (ValueError, OverflowError):
        raise _malformed("unreadable expires_at, expires_in or refresh_after") from None
    if expires_at <= received:
        raise _malformed("the token has already expired")
    return expires_at, min(refresh_after, expires_at)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _malformed(detail: str, status: int = 200) -> BrokerUnavailable:
    return BrokerUnavailable(
        f"the broker's answer is not a token response: {detail}",
        reason=Unavailability.MALFORMED,
        status=status,
    )
