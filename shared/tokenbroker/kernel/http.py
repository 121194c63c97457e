"""HTTP values shared by every wing: a request as the ports send it, an answer as they return
it, and header parsing."""

from __future__ import annotations

import re
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


#: The longest wait a ``Retry-After`` may impose: one hour. A longer (but plausible) request is
#: capped, so a provider's maintenance notice cannot park a connection past its access token.
MAX_RETRY_AFTER_SECONDS = 3600.0
#: Waits beyond a day are not believed at all: a far-future date or a 20-digit delay is a
#: broken header, and the caller's own backoff applies instead.
PLAUSIBLE_RETRY_AFTER_SECONDS = 86400
# delay-seconds = 1*DIGIT (RFC 9110 §10.2.3), ASCII digits only; more than 6 digits is beyond
# PLAUSIBLE_RETRY_AFTER_SECONDS anyway, so int() never sees a huge string.
_DELAY_SECONDS = re.compile(r"[0-9]{1,6}")
# An HTTP-date is printable ASCII (RFC 9110 §5.6.7); anything else is not one.
_HTTP_DATE_CHARS = re.compile(r"[\x20-\x7e]{1,64}")


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds to wait, or ``None`` when there is no believable value.

    RFC 9110 §10.2.3: either delay-seconds (``1*DIGIT``) or an HTTP-date (§5.6.7, including
    the obsolete RFC 850 and asctime forms recipients must accept). A date in the past means
    0. Waits above :data:`MAX_RETRY_AFTER_SECONDS` are capped; waits beyond
    :data:`PLAUSIBLE_RETRY_AFTER_SECONDS`, negative, fractional or non-ASCII numbers, and
    anything unparseable are ignored (``None``). Never raises: the header is provider input.
    """
    if not value:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        return _bounded(float(int(value)))
    if value.isdigit() or not _HTTP_DATE_CHARS.fullmatch(value):
        return None  # too many digits to be plausible, or not an HTTP-date's characters
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    reference = now or datetime.now(UTC)
    if reference.tzinfo is None:
        reference = reference.replace(tzinfo=UTC)
    try:
        seconds = (when - reference).total_seconds()
    except OverflowError:
        return None
    return _bounded(max(0.0, seconds))


def _bounded(seconds: float) -> float | None:
    if seconds > PLAUSIBLE_RETRY_AFTER_SECONDS:
        return None
    return min(seconds, MAX_RETRY_AFTER_SECONDS)
