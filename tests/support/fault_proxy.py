"""Fault-injecting proxies for the fault suite: an HTTP proxy in front of oidc-provider's token
endpoint and a TCP proxy in front of the stores' gRPC servers.

:class:`FaultProxy` forwards ``POST /token`` to the real provider and applies a scripted fault
per request, chosen in this order: a fault queued for the connection the refresh token belongs
to (:meth:`FaultProxy.script_for`), a fault from the global queue (:meth:`FaultProxy.script`),
the standing fault (:meth:`FaultProxy.every`).
A fault either answers without the provider seeing the request (nothing is consumed: the
refresh token presented stays good) or runs *after* forwarding (the provider has rotated the
refresh token; what the client gets is the fault). That difference is the whole point:

* ``timeout_before(s)``: nothing for ``s`` seconds, then the connection closes (not forwarded);
* ``timeout_after(s)``: forwarded, then nothing for ``s`` seconds and the connection closes;
* ``reset(after=)``: a TCP reset (SO_LINGER 0) instead of an answer;
* ``status(code, retry_after=, body=)``: 500/502/503/429..., not forwarded;
* ``malformed_json(after=)``, ``html_200(after=)``: an HTTP 200 that is no token response;
* ``error_200(error, with_tokens=)``: HTTP 200 with ``{"error": ...}``; ``with_tokens``: the
  provider's real answer (its rotated refresh token included) with the error added;
* ``rewrite(field, raw)`` / ``expires_in(raw)``: the real answer with one field replaced by
  raw JSON text (``Infinity``, ``1e15``, ``"soon"``) or removed (``None``);
* ``slow(s)``: the real answer ``s`` seconds late (past the lease, if long enough);
  ``slow_before(s)``: the request reaches the provider ``s`` seconds late;
* ``passthrough()``: no fault (takes a queue slot, to aim later faults).

``latency(s)`` is the provider's own processing time, added to every request (not a fault).

``capacity(in_flight, backlog)`` models an overloaded provider with a small accept queue: at
most ``in_flight`` requests reach it at once, ``backlog`` more wait, and the rest are reset.
A waiting request is still forwarded after its client gave up -- as a real server that
accepted the connection would -- so its rotated token is issued to nobody.

The :class:`Ledger` keeps every exchange and the lineage of every refresh token (which
connection it belongs to, which generation), so it can tell which presentations were
accepted, which answers with a rotated token never reached the client, and which requests
re-presented a token the provider had already consumed (RFC 9700 section 4.14.2: the provider
then revokes the grant -- oidc-provider does). Token values stay in memory; exchanges carry
only fingerprints, so nothing here can leak a token into a log.

:class:`TcpProxy` sits in front of a gRPC server (the Firestore and Pub/Sub emulators, the
Secret Manager test server) and can delay every chunk (a slow store), hold all traffic
(``blackhole``: a hung store), or reset every connection and refuse new ones (``down``: a
stopped store) without losing the store's data.

Both run on one background event loop (:func:`proxy_loop`); their control methods are called
from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter, deque
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

T = TypeVar("T")

#: How long the proxy waits for the provider (the client's own timeout is much shorter).
UPSTREAM_TIMEOUT = 300.0
_RAW = "\x00tokenbroker-raw\x00"


# ---------------------------------------------------------------------------------------------
# The background loop
# ---------------------------------------------------------------------------------------------


class ProxyLoop:
    """One asyncio loop in a daemon thread, shared by every proxy of the process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fault-proxies", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run ``coro`` on the loop and wait for its result from another thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


_LOOP: ProxyLoop | None = None
_LOOP_LOCK = threading.Lock()


def proxy_loop() -> ProxyLoop:
    global _LOOP  # noqa: PLW0603 - one loop thread per test process
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = ProxyLoop()
        return _LOOP


def fingerprint(value: str) -> str:
    """What the ledger shows of a token: never the value."""
    return hashlib.sha256(value.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------

#: Kinds whose effect comes after the provider processed the request.
_AFTER = frozenset({"timeout_after", "rewrite", "slow", "slow_before", "passthrough"})


@dataclass(frozen=True)
class Fault:
    """One scripted fault; build them with the functions below."""

    kind: str
    seconds: float = 0.0
    status: int = 200
    retry_after: str | None = None
    body: str | None = None
    #: ``rewrite``: the field and its raw JSON text (``None``: remove the field).
    field_name: str | None = None
    raw_value: str | None = None
    #: For reset/malformed_json/html_200/error_200: forward first (the provider rotates).
    after: bool = False

    @property
    def forwards(self) -> bool:
        return self.kind in _AFTER or self.after

    @property
    def label(self) -> str:
        """A short name for figures: ``status:503``, ``rewrite:expires_in=1e15``."""
        if self.kind == "status":
            suffix = f":{self.status}" + (f" retry-after={self.retry_after}" if self.retry_after
                                          is not None else "")  # fmt: skip
            return "status" + suffix
        if self.kind == "rewrite":
            value = "<removed>" if self.raw_value is None else self.raw_value
            return f"rewrite:{self.field_name}={value}"
        return self.kind + (":after" if self.after and self.kind not in _AFTER else "")


def timeout_before(seconds: float) -> Fault:
    """Hold the request ``seconds`` without forwarding it, then close the connection."""
    return Fault("timeout_before", seconds=seconds)


def timeout_after(seconds: float) -> Fault:
    """Forward (the provider rotates the refresh token), then hold the answer ``seconds`` and
    close the connection: the new token is issued and never arrives."""
    return Fault("timeout_after", seconds=seconds)


def reset(*, after: bool = False) -> Fault:
    """A TCP reset instead of an answer, before or after the provider saw the request."""
    return Fault("reset", after=after)


def status(code: int, *, retry_after: str | None = None, body: str | None = None) -> Fault:
    """An error status without forwarding (``body`` defaults to an RFC 6749 error object)."""
    return Fault("status", status=code, retry_after=retry_after, body=body)


def rate_limited(retry_after: str | None = None) -> Fault:
    """HTTP 429, with or without ``Retry-After`` (RFC 6585 section 4; RFC 9110 10.2.3)."""
    return status(429, retry_after=retry_after)


def malformed_json(*, after: bool = False) -> Fault:
    return Fault("malformed_json", after=after)


def html_200(*, after: bool = False) -> Fault:
    return Fault("html_200", after=after)


def error_200(error: str = "invalid_grant", *, with_tokens: bool = False) -> Fault:
    """HTTP 200 with an OAuth error body; ``with_tokens``: the provider's real answer (a
    rotated refresh token included) with ``error`` added."""
    return Fault("error_200", body=error, after=with_tokens)


def rewrite(field_name: str, raw_value: str | None) -> Fault:
    """Forward, then replace ``field_name`` in the JSON answer by ``raw_value`` written as is
    (``"Infinity"``, ``"1e15"``, ``'"3600"'``), or remove it (``None``)."""
    return Fault("rewrite", field_name=field_name, raw_value=raw_value)


def expires_in(raw_value: str | None) -> Fault:
    return rewrite("expires_in", raw_value)


def slow(seconds: float) -> Fault:
    """Forward at once, deliver the real answer ``seconds`` late (past the lease, if long)."""
    return Fault("slow", seconds=seconds)


def slow_before(seconds: float) -> Fault:
    return Fault("slow_before", seconds=seconds)


def passthrough() -> Fault:
    return Fault("passthrough")


def _error_body(code: int) -> str:
    error = "server_error" if code == 500 else "temporarily_unavailable"
    if code == 429:
        error = "slow_down"
    return json.dumps({"error": error, "error_description": "injected by the fault proxy"})


# ---------------------------------------------------------------------------------------------
# The ledger
# ---------------------------------------------------------------------------------------------


@dataclass
class Exchange:
    """One POST /token through the proxy."""

    seq: int
    started_at: float
    grant_type: str
    #: The connection the presented refresh token belongs to (``None``: not tracked).
    lineage: str | None
    #: Which token of that lineage was presented (0: the registered one).
    generation: int | None
    presented: str | None
    fault: str | None = None
    #: The presented token had been consumed already, or another request was presenting it at
    #: the same time: a replay the provider punishes.
    reuse: bool = False
    forwarded: bool = False
    upstream_status: int | None = None
    upstream_error: str | None = None
    #: The provider issued a new refresh token for this request.
    rotated: bool = False
    #: What the client got: an HTTP status, "dropped", "reset" or "refused".
    answer: str | None = None
    #: An answer reached the client; for a rotation, one that carried the new refresh token.
    delivered: bool = False
    answered_at: float | None = None
    #: The client had gone when the answer was ready (its timeout passed).
    client_gone: bool = False


class Ledger:
    """Every exchange, and the lineage of every refresh token seen or issued."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[str, int]] = {}
        self._latest: dict[str, tuple[str, int]] = {}
        self._consumed: set[str] = set()
        self._presenting: Counter[str] = Counter()
        self._delivered_at: dict[str, float] = {}
        self.exchanges: list[Exchange] = []

    def track(self, lineage: str, refresh_token: str) -> None:
        """Register a connection's first refresh token (generation 0)."""
        with self._lock:
            self._tokens[refresh_token] = (lineage, 0)
            self._latest[lineage] = (refresh_token, 0)

    def lineage_of(self, refresh_token: str | None) -> tuple[str, int] | None:
        if refresh_token is None:
            return None
        with self._lock:
            return self._tokens.get(refresh_token)

    def latest(self, lineage: str) -> tuple[str, int] | None:
        """The newest refresh token the provider issued for ``lineage`` (delivered or not)."""
        with self._lock:
            return self._latest.get(lineage)

    def delivered_at(self, refresh_token: str) -> float | None:
        """When the answer carrying ``refresh_token`` reached the client (wall clock)."""
        with self._lock:
            return self._delivered_at.get(refresh_token)

    def consumed(self, refresh_token: str) -> bool:
        with self._lock:
            return refresh_token in self._consumed

    def _open(self, grant_type: str, refresh_token: str | None) -> Exchange:
        with self._lock:
            lineage = self._tokens.get(refresh_token) if refresh_token else None
            exchange = Exchange(
                seq=len(self.exchanges) + 1,
                started_at=time.time(),
                grant_type=grant_type,
                lineage=lineage[0] if lineage else None,
                generation=lineage[1] if lineage else None,
                presented=fingerprint(refresh_token) if refresh_token else None,
                # Consumed already, or being presented by another request right now (the
                # provider serialises the two: one of them is a replay).
                reuse=bool(refresh_token)
                and (refresh_token in self._consumed or self._presenting[refresh_token] > 0),
            )
            self.exchanges.append(exchange)
            return exchange

    def _presented(self, refresh_token: str | None, delta: int) -> None:
        """A presentation of ``refresh_token`` reaches the provider (+1) or is answered (-1)."""
        if refresh_token:
            with self._lock:
                self._presenting[refresh_token] += delta
                if self._presenting[refresh_token] <= 0:
                    del self._presenting[refresh_token]

    def _upstream(
        self, exchange: Exchange, presented: str | None, status: int, body: Mapping[str, Any]
    ) -> str | None:
        """Book the provider's answer; returns the rotated refresh token, if any."""
        exchange.forwarded = True
        exchange.upstream_status = status
        error = body.get("error")
        exchange.upstream_error = str(error) if error else None
        new = body.get("refresh_token")
        if status != 200 or not isinstance(new, str) or not new:
            return None
        with self._lock:
            if presented is not None and new != presented:
                self._consumed.add(presented)
                exchange.rotated = True
                lineage = self._tokens.get(presented)
                if lineage is not None:
                    name, generation = lineage
                    self._tokens[new] = (name, generation + 1)
                    latest = self._latest.get(name)
                    if latest is None or latest[1] < generation + 1:
                        self._latest[name] = (new, generation + 1)
        return new

    def _delivered(self, exchange: Exchange, carried: str | None) -> None:
        exchange.delivered = carried is not None or not exchange.rotated
        if carried is not None:
            with self._lock:
                self._delivered_at[carried] = exchange.answered_at or time.time()

    def _undelivered(self, exchange: Exchange, carried: str | None) -> None:
        exchange.delivered = False
        exchange.answered_at = None
        if carried is not None:
            with self._lock:
                self._delivered_at.pop(carried, None)

    # -- figures -------------------------------------------------------------------------------

    def select(
        self, lineages: Iterable[str] | None = None, since: float | None = None
    ) -> list[Exchange]:
        wanted = None if lineages is None else set(lineages)
        with self._lock:
            return [
                e
                for e in self.exchanges
                if (wanted is None or e.lineage in wanted)
                and (since is None or e.started_at >= since)
            ]

    def story(self, lineage: str, origin: float = 0.0) -> list[str]:
        """All of ``lineage``'s exchanges, one line each (times in seconds from ``origin``), for
        a failure message: no token, only its fingerprint."""
        base = origin
        lines = []
        for e in self.select([lineage]):
            answered = "-" if e.answered_at is None else f"{e.answered_at - base:.3f}"
            lines.append(
                f"#{e.seq} at {e.started_at - base:.3f} gen {e.generation} {e.presented}"
                f" fault={e.fault} reuse={e.reuse} forwarded={e.forwarded}"
                f" upstream={e.upstream_status}/{e.upstream_error} rotated={e.rotated}"
                f" answer={e.answer} delivered={e.delivered} gone={e.client_gone}"
                f" answered_at={answered}"
            )
        return lines

    def summary(
        self, lineages: Iterable[str] | None = None, since: float | None = None
    ) -> dict[str, Any]:
        """Counts over the selected exchanges: ``presented`` (refresh tokens presented),
        ``accepted`` (the provider rotated), ``reuse`` (consumed tokens re-presented),
        ``invalid_grant`` (provider answers), ``undelivered_rotations`` (a new token was
        issued and the client never got it), ``faults``, ``refreshes_by_lineage``."""
        chosen = self.select(lineages, since)
        refreshes: Counter[str] = Counter(
            e.lineage for e in chosen if e.rotated and e.lineage is not None
        )
        return {
            "presented": sum(1 for e in chosen if e.presented is not None),
            "accepted": sum(1 for e in chosen if e.rotated),
            "reuse": sum(1 for e in chosen if e.reuse),
            "invalid_grant": sum(1 for e in chosen if e.upstream_error == "invalid_grant"),
            "undelivered_rotations": sum(1 for e in chosen if e.rotated and not e.delivered),
            "faults": sum(1 for e in chosen if e.fault is not None and e.fault != "passthrough"),
            "faults_by_kind": dict(Counter(e.fault for e in chosen if e.fault is not None)),
            "refreshes_by_lineage": dict(refreshes),
        }


# ---------------------------------------------------------------------------------------------
# The HTTP fault proxy
# ---------------------------------------------------------------------------------------------


class FaultProxy:
    """``POST /token`` -> the provider, with scripted faults and a ledger.

    ``start()`` binds a free port of 127.0.0.1; :attr:`token_url` is what refreshers use.
    """

    def __init__(self, upstream_token_url: str, *, ledger: Ledger | None = None) -> None:
        self.upstream = upstream_token_url
        self.ledger = ledger or Ledger()
        self.port = 0
        self._lock = threading.Lock()
        self._queue: deque[Fault] = deque()
        self._by_lineage: dict[str, deque[Fault]] = {}
        self._every: Fault | None = None
        self._latency = 0.0
        self._in_flight_limit: int | None = None
        self._backlog = 0
        self._waiting = 0
        self._slots: asyncio.Semaphore | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._loop = proxy_loop()

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._loop.call(self._start())
        return self

    async def _start(self) -> None:
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_post("/token", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        self.port = server.sockets[0].getsockname()[1]
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=UPSTREAM_TIMEOUT),
        )

    def stop(self) -> None:
        self._loop.call(self._stop())

    async def _stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # -- the script ----------------------------------------------------------------------------

    def script(self, faults: Iterable[Fault]) -> None:
        """Queue faults for the next requests, whoever sends them."""
        with self._lock:
            self._queue.extend(faults)

    def script_for(self, lineage: str, faults: Iterable[Fault]) -> None:
        """Queue faults for the next requests presenting ``lineage``'s refresh tokens."""
        with self._lock:
            self._by_lineage.setdefault(lineage, deque()).extend(faults)

    def every(self, fault: Fault | None) -> None:
        """A fault for every request nothing else is scripted for (``None``: stop)."""
        with self._lock:
            self._every = fault

    def latency(self, seconds: float) -> None:
        """The provider's own processing time, added before forwarding every request (not a
        fault: it keeps requests on the wire long enough for a kill to catch some there)."""
        self._latency = seconds

    def capacity(self, in_flight: int | None, backlog: int = 0) -> None:
        """At most ``in_flight`` requests at the provider, ``backlog`` waiting, the rest reset
        (``None``: unlimited)."""

        async def apply() -> None:
            self._in_flight_limit = in_flight
            self._backlog = backlog
            self._slots = asyncio.Semaphore(in_flight) if in_flight else None

        self._loop.call(apply())

    def clear(self) -> None:
        """No faults, no limits (the ledger is kept)."""
        with self._lock:
            self._queue.clear()
            self._by_lineage.clear()
            self._every = None
        self._latency = 0.0
        self.capacity(None)

    def pending(self) -> int:
        with self._lock:
            return len(self._queue) + sum(len(q) for q in self._by_lineage.values())

    def _choose(self, lineage: str | None) -> Fault | None:
        with self._lock:
            queue = self._by_lineage.get(lineage) if lineage else None
            if queue:
                return queue.popleft()
            if self._queue:
                return self._queue.popleft()
            return self._every

    # -- the handler ---------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        form = urllib.parse.parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
        presented = form.get("refresh_token", [None])[0]
        grant_type = form.get("grant_type", ["(none)"])[0] or "(none)"
        exchange = self.ledger._open(grant_type, presented)
        fault = self._choose(exchange.lineage)
        if fault is not None:
            exchange.fault = fault.label
        if self._slots is not None and self._in_flight_limit is not None:
            if self._slots.locked() and self._waiting >= self._backlog:
                exchange.fault = exchange.fault or "overload:refused"
                return self._reset(request, exchange, "refused")
            self._waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self._waiting -= 1
            try:
                return await self._serve(request, raw, presented, exchange, fault)
            finally:
                self._slots.release()
        return await self._serve(request, raw, presented, exchange, fault)

    async def _serve(  # noqa: PLR0911 - one branch per fault kind reads best
        self,
        request: web.Request,
        raw: bytes,
        presented: str | None,
        exchange: Exchange,
        fault: Fault | None,
    ) -> web.StreamResponse:
        if fault is not None and not fault.forwards:
            return await self._local(request, exchange, fault)
        if fault is not None and fault.kind == "slow_before":
            await asyncio.sleep(fault.seconds)
        self.ledger._presented(presented, +1)
        try:
            if self._latency > 0:
                await asyncio.sleep(self._latency)
            status_code, headers, body = await self._forward(request, raw)
            parsed = _json_object(body)
            new_token = self.ledger._upstream(exchange, presented, status_code, parsed)
        finally:
            self.ledger._presented(presented, -1)
        if fault is None or fault.kind in {"passthrough", "slow_before"}:
            return await self._answer(
                request, exchange, status_code, headers, body, carried=new_token
            )
        if fault.kind == "slow":
            await asyncio.sleep(fault.seconds)
            return await self._answer(
                request, exchange, status_code, headers, body, carried=new_token
            )
        if fault.kind == "timeout_after":
            await asyncio.sleep(fault.seconds)
            return self._drop(request, exchange, "dropped")
        if fault.kind == "reset":
            return self._reset(request, exchange, "reset")
        if fault.kind == "rewrite":
            text = _rewrite(parsed, fault.field_name or "", fault.raw_value) if parsed else body
            kept = None if fault.field_name == "refresh_token" else new_token
            return await self._answer(request, exchange, status_code, headers, text, carried=kept)
        if fault.kind == "error_200" and parsed:
            text = json.dumps({**parsed, "error": fault.body or "server_error"})
            return await self._answer(
                request, exchange, 200, headers, text.encode(), carried=new_token
            )
        return await self._local(request, exchange, fault)

    async def _local(
        self, request: web.Request, exchange: Exchange, fault: Fault
    ) -> web.StreamResponse:
        """Answer from the proxy (for ``after`` faults: instead of the provider's answer)."""
        if fault.kind == "timeout_before":
            await asyncio.sleep(fault.seconds)
            return self._drop(request, exchange, "dropped")
        if fault.kind == "reset":
            return self._reset(request, exchange, "reset")
        headers: dict[str, str] = {"Content-Type": "application/json", "Cache-Control": "no-store"}
        code = 200
        if fault.kind == "status":
            code = fault.status
            text = fault.body if fault.body is not None else _error_body(code)
            if fault.retry_after is not None:
                headers["Retry-After"] = fault.retry_after
        elif fault.kind == "malformed_json":
            text = '{"access_token": "x", "token_type": "Bearer", "expires_in": 36'
        elif fault.kind == "html_200":
            headers["Content-Type"] = "text/html; charset=utf-8"
            text = "<html><body><h1>Service temporarily unavailable</h1></body></html>"
        elif fault.kind == "error_200":
            text = json.dumps({"error": fault.body or "invalid_grant"})
        else:
            raise ValueError(f"unknown fault kind {fault.kind!r}")
        return await self._answer(request, exchange, code, headers, text.encode())

    async def _forward(self, request: web.Request, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        assert self._session is not None
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in {"authorization", "content-type", "accept", "user-agent", "dpop"}
        }
        try:
            async with self._session.post(self.upstream, data=raw, headers=headers) as upstream:
                body = await upstream.read()
                kept = {
                    k: v
                    for k, v in upstream.headers.items()
                    if k.lower() in {"content-type", "cache-control", "pragma", "retry-after",
                                     "www-authenticate"}
                }  # fmt: skip
                return upstream.status, kept, body
        except (aiohttp.ClientError, TimeoutError) as error:
            text = json.dumps({"error": "temporarily_unavailable", "error_description": str(error)})
            return 502, {"Content-Type": "application/json"}, text.encode()

    async def _answer(
        self,
        request: web.Request,
        exchange: Exchange,
        code: int,
        headers: Mapping[str, str],
        body: bytes,
        *,
        carried: str | None = None,
    ) -> web.StreamResponse:
        """Write the answer; ``carried``: the rotated refresh token it contains, if any."""
        exchange.answer = str(code)
        transport = request.transport
        if transport is None or transport.is_closing():
            exchange.client_gone = True
            return web.Response(status=code, body=body, headers=headers)
        response = web.Response(status=code, body=body, headers=headers)
        # Booked before the bytes leave, so whoever reads the answer finds the ledger current.
        exchange.answered_at = time.time()
        self.ledger._delivered(exchange, carried)
        try:
            await response.prepare(request)
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            exchange.client_gone = True
            self.ledger._undelivered(exchange, carried)
        return response

    def _drop(self, request: web.Request, exchange: Exchange, how: str) -> web.StreamResponse:
        exchange.answer = how
        transport = request.transport
        if transport is None:
            exchange.client_gone = True
        else:
            transport.close()
        return web.Response(status=204)

    def _reset(self, request: web.Request, exchange: Exchange, how: str) -> web.StreamResponse:
        exchange.answer = how
        transport = request.transport
        if transport is None:
            exchange.client_gone = True
            return web.Response(status=204)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        return web.Response(status=204)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _rewrite(parsed: Mapping[str, Any], name: str, raw_value: str | None) -> bytes:
    """The answer with ``name`` replaced by ``raw_value`` verbatim (JSON or not), or removed."""
    changed = dict(parsed)
    if raw_value is None:
        changed.pop(name, None)
        return json.dumps(changed).encode()
    changed[name] = _RAW
    return json.dumps(changed).replace(json.dumps(_RAW), raw_value).encode()


# ---------------------------------------------------------------------------------------------
# The TCP proxy (in front of gRPC stores)
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Pipe:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    upstream_writer: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class TcpProxy:
    """127.0.0.1:<port> -> ``upstream`` ("host:port"), with a mode that can change any time:

    * ``pass``: bytes flow;
    * ``delay`` (``seconds``): every chunk waits ``seconds`` in each direction (a slow store);
    * ``blackhole``: connections stay open, nothing flows either way (a hung store);
    * ``down``: every connection is reset and new ones are reset on accept (a stopped one).

    :attr:`address` ("127.0.0.1:port") is what the clients under test are given.
    """

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.port = 0
        self.mode = "pass"
        self.seconds = 0.0
        self.stats: Counter[str] = Counter()
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._pipes: set[_Pipe] = set()
        self._loop = proxy_loop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self._loop.call(self._start())
        return self

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        self._loop.call(self._stop())

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for pipe in list(self._pipes):
            _abort(pipe.writer)
            if pipe.upstream_writer is not None:
                _abort(pipe.upstream_writer)

    def set_mode(self, mode: str, seconds: float = 0.0) -> None:
        if mode not in {"pass", "delay", "blackhole", "down"}:
            raise ValueError(mode)

        async def apply() -> None:
            self.mode, self.seconds = mode, seconds
            assert self._flowing is not None
            if mode == "blackhole":
                self._flowing.clear()
            else:
                self._flowing.set()
            if mode == "down":
                for pipe in list(self._pipes):
                    _abort(pipe.writer)
                    if pipe.upstream_writer is not None:
                        _abort(pipe.upstream_writer)

        self._loop.call(apply())

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats["accepted"] += 1
        if self.mode == "down":
            self.stats["refused"] += 1
            _abort(writer)
            return
        pipe = _Pipe(reader, writer)
        self._pipes.add(pipe)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._pipes.discard(pipe)
            _abort(writer)
            return
        pipe.upstream_writer = up_writer
        pipe.tasks = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        try:
            await asyncio.wait(pipe.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipe.tasks:
                task.cancel()
            _abort(writer)
            _abort(up_writer)
            self._pipes.discard(pipe)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                await self._flowing.wait()
                if self.mode == "delay" and self.seconds > 0:
                    await asyncio.sleep(self.seconds)
                    await self._flowing.wait()
                if self.mode == "down":
                    return
                writer.write(chunk)
                await writer.drain()


def _abort(writer: asyncio.StreamWriter) -> None:
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


__all__ = [
    "Exchange",
    "Fault",
    "FaultProxy",
    "Ledger",
    "TcpProxy",
    "error_200",
    "expires_in",
    "fingerprint",
    "html_200",
    "malformed_json",
    "passthrough",
    "proxy_loop",
    "rate_limited",
    "reset",
    "rewrite",
    "slow",
    "slow_before",
    "status",
    "timeout_after",
    "timeout_before",
]
