"""HTTP values shared by every wing: a request as the ports send it, an answer as they return
it, and header parsing."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

#: What an outbound answer may weigh unless the request says otherwise.
DEFAULT_MAX_RESPONSE_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class OutboundRequest:
    """One request the broker sends on someone's behalf (the issuer's relay), fully decided:
    the URL, headers and body are exactly what goes on the wire, credential included.

    ``headers`` and ``body`` may carry an injected credential, so they are left out of
    ``repr``: a request that ends up in a log or a traceback shows where it went, not what
    it carried. ``timeout_seconds`` bounds the whole exchange (connect to last byte);
    ``max_response_bytes`` the answer's decoded body.
    """

    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    body: bytes = field(default=b"", repr=False)
    timeout_seconds: float = 30.0
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes
    #: Header names lower-cased.
    headers: Mapping[str, str] = field(default_factory=dict)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds: delay-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
