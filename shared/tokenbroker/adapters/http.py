"""The token-endpoint adapter on aiohttp.

aiohttp is the fastest asyncio HTTP client measured on this kind of machine (about 4,100
token calls/s at 256 in flight against a 50 ms endpoint, vs ~135/s for httpx 0.28's pool);
one session with a bounded connection pool serves a whole tick.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

from tokenbroker.kernel.errors import TransportError
from tokenbroker.kernel.http import HttpResponse

MAX_RESPONSE_BYTES = 1 << 20  # a token response is a few KB; refuse to buffer more than 1 MiB


class AiohttpTokenEndpoint:
    """Use as ``async with AiohttpTokenEndpoint() as endpoint:`` inside a running loop."""

    def __init__(self, *, timeout: float = 10.0, max_connections: int = 256) -> None:
        self.timeout = timeout
        self.max_connections = max_connections
        self._session: Any = None

    async def __aenter__(self) -> AiohttpTokenEndpoint:
        import aiohttp  # noqa: PLC0415 - heavy; only the refresh path needs it

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers={"User-Agent": "tokenbroker"},
            raise_for_status=False,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post_form(
        self, url: str, form: Mapping[str, str], *, headers: Mapping[str, str]
    ) -> HttpResponse:
        import aiohttp  # noqa: PLC0415

        if self._session is None:
            raise RuntimeError("AiohttpTokenEndpoint used outside 'async with'")
        try:
            # Encode the form ourselves: aiohttp's FormData path builds a multipart writer (with
            # a uuid4 boundary) per request and costs ~25% of a tick's CPU.
            body = urlencode(form).encode()
            send_headers = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
            async with self._session.post(
                url, data=body, headers=send_headers, allow_redirects=False
            ) as response:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > MAX_RESPONSE_BYTES:
                        raise TransportError(
                            "token endpoint response exceeds 1 MiB", status=response.status
                        )
                    chunks.append(chunk)
                return HttpResponse(
                    status=response.status,
                    body=b"".join(chunks),
                    headers={k.lower(): v for k, v in response.headers.items()},
                )
        except TimeoutError:
            raise TransportError(f"token endpoint timed out after {self.timeout}s") from None
        except aiohttp.ClientError as exc:
            raise TransportError(f"token endpoint unreachable: {type(exc).__name__}") from None
        except asyncio.CancelledError:
            raise
