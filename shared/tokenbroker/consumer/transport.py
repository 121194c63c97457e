"""What the two shells share about httpx (https://www.python-httpx.org/): the client's fixed
options and how a failed exchange reads to the core.

httpx is imported only when a client is built or a request fails, never at import: the
subscriber and the error types must stay importable without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

from tokenbroker.consumer.wire import NoReply

if TYPE_CHECKING:
    import httpx


class HttpOptions(TypedDict):
    follow_redirects: bool
    timeout: float


def http_options(timeout: float) -> HttpOptions:
    """Redirects are not followed: the request carries a bearer credential (RFC 6750 §5.3),
    and a ``/token`` that moved is a misconfiguration to see, not to chase."""
    return {"follow_redirects": False, "timeout": timeout}


def no_reply(error: httpx.TransportError) -> NoReply:
    """httpx's transport failures (``TimeoutException`` is one) as the core's ``NoReply``."""
    import httpx  # noqa: PLC0415 - loaded already: a request was just made

    return NoReply(timed_out=isinstance(error, httpx.TimeoutException), detail=type(error).__name__)
