"""The token-endpoint port: how protocol code sends a form POST and gets an answer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes
    #: Header names lower-cased.
    headers: Mapping[str, str] = field(default_factory=dict)


class TokenEndpoint(Protocol):
    """Sends ``application/x-www-form-urlencoded`` POSTs to token endpoints.

    Implementations raise :class:`~tokenbroker.errors.TransportError` when no HTTP answer came
    (timeout, refused, reset) and return every HTTP answer, whatever its status, unchanged.
    They never follow redirects.
    """

    async def post_form(
        self, url: str, form: Mapping[str, str], *, headers: Mapping[str, str]
    ) -> HttpResponse: ...
