"""A strict, rotating OAuth token endpoint for benchmarks, run as its own process.

Run it apart from the benchmark (``python bench/token_endpoint_server.py --latency-ms 50``) so
it does not share the benchmark's event loop or GIL. It binds 127.0.0.1 on a free port and
prints one line ``READY <port>`` on stdout once it accepts connections.

``POST /token`` implements the refresh_token grant (RFC 6749 §6) with rotation on every use:

* the client authenticates with ``client_secret_basic`` or ``client_secret_post``
  (``bench-client`` / ``bench-secret``), else ``401 invalid_client``;
* refresh tokens look like ``rt-<key>-<generation>``. Any key is accepted the first time at
  generation 0; after that only the newest generation is. The answer to a good one, after the
  simulated latency, is a new access token and the next-generation refresh token;
* presenting a consumed (older) refresh token is treated like oidc-provider does: ``400
  invalid_grant``, and the whole grant is revoked, so its newest token dies too. A racing or
  crash-unsafe refresher therefore shows up as ``invalid_grant`` in ``GET /stats``.

The latency is an ``asyncio.sleep`` before the token is checked and rotated, so concurrent
requests overlap as they would against a real provider. ``GET /stats`` returns the counters
(``refreshed`` and ``invalid_grant`` per key namespace: the part of the key before ``_``) and the
process CPU time, so the benchmark can tell whether this server was the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from urllib.parse import unquote

from aiohttp import web

CLIENT_ID = "bench-client"
CLIENT_SECRET = "bench-secret"  # noqa: S105 - a benchmark fixture, not a credential
_TOKEN_RE = re.compile(r"^rt-(?P<key>[A-Za-z0-9_]+)-(?P<gen>\d+)$")


class Provider:
    def __init__(self, latency: float, lifetime: int) -> None:
        self.latency = latency
        self.lifetime = lifetime
        #: Newest generation per key; absent means generation 0 is current.
        self.generation: dict[str, int] = {}
        self.revoked: set[str] = set()
        self.counters: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.started = time.monotonic()

    def _error(self, code: str, status: int) -> web.Response:
        self.counters[code] += 1
        body = json.dumps({"error": code, "error_description": f"bench: {code}"})
        return web.Response(
            status=status,
            body=body.encode(),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    def _client(self, request: web.Request, form: dict[str, str]) -> tuple[str, str]:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                raw = base64.b64decode(auth[6:], validate=True).decode()
            except ValueError:
                return "", ""
            client_id, _, secret = raw.partition(":")
            return unquote(client_id), unquote(secret)
        return form.get("client_id", ""), form.get("client_secret", "")

    async def token(self, request: web.Request) -> web.Response:
        self.counters["requests"] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            form = {k: str(v) for k, v in (await request.post()).items()}
            if self.latency:
                await asyncio.sleep(self.latency)
            return self._answer(request, form)
        finally:
            self.in_flight -= 1

    def _answer(self, request: web.Request, form: dict[str, str]) -> web.Response:
        # No await from here on: check-and-rotate is atomic on this event loop.
        client_id, secret = self._client(request, form)
        if client_id != CLIENT_ID or secret != CLIENT_SECRET:
            return self._error("invalid_client", 401)
        if form.get("grant_type") != "refresh_token":
            return self._error("unsupported_grant_type", 400)
        match = _TOKEN_RE.match(form.get("refresh_token", ""))
        if match is None:
            return self._error("invalid_grant", 400)
        key, presented = match["key"], int(match["gen"])
        namespace = key.partition("_")[0]
        current = self.generation.get(key, 0)
        if key in self.revoked or presented != current:
            if presented < current:
                self.revoked.add(key)  # re-use of a consumed token: revoke the whole grant
                self.counters["reuse_detected"] += 1
            self.counters[f"invalid_grant:{namespace}"] += 1
            return self._error("invalid_grant", 400)
        self.generation[key] = current + 1
        self.counters[f"refreshed:{namespace}"] += 1
        body = {
            "access_token": f"at-{key}-{current + 1}-{os.urandom(6).hex()}",
            "token_type": "Bearer",
            "expires_in": self.lifetime,
            "refresh_token": f"rt-{key}-{current + 1}",
        }
        return web.Response(
            body=json.dumps(body).encode(),
            content_type="application/json",
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
        )

    async def stats(self, _: web.Request) -> web.Response:
        cpu = os.times()
        body = {
            "counters": dict(self.counters),
            "max_in_flight": self.max_in_flight,
            "cpu_seconds": cpu.user + cpu.system,
            "uptime_seconds": time.monotonic() - self.started,
            "latency_seconds": self.latency,
        }
        return web.json_response(body)

    async def reset_peak(self, _: web.Request) -> web.Response:
        self.max_in_flight = self.in_flight
        return web.json_response({"ok": True})


async def serve(host: str, port: int, latency: float, lifetime: int) -> None:
    provider = Provider(latency, lifetime)
    app = web.Application()
    app.router.add_post("/token", provider.token)
    app.router.add_get("/stats", provider.stats)
    app.router.add_post("/stats/reset-peak", provider.reset_peak)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"READY {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (default)")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--lifetime", type=int, default=3600, help="expires_in, seconds")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.latency_ms / 1000, args.lifetime))
    return 0


if __name__ == "__main__":
    sys.exit(main())
