"""A JWK set on 127.0.0.1 that can be made slow: the stand-in for Google's certs URL.

The issue-9 tests (a refetch for an unknown ``kid`` must not stall the event loop) need the keys
to come from a real HTTP server, over the verifier's own blocking fetch, and to take their time
answering: :class:`JwksServer` serves one JWK set on every GET, with ``Cache-Control: public,
max-age=3600`` as Google's does, and sleeps :attr:`JwksServer.delay` seconds before answering
each request after the first ``prompt`` ones. It counts the requests it received and the answers
it got to (past the delay).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


class JwksServer:
    """Serves ``jwks`` (``{"keys": [...]}``) from a daemon thread while its ``with`` block runs;
    :attr:`url` is its certs URL.

    ``delay`` (settable while serving) is how long every answer after the first ``prompt``
    requests waits; :attr:`requests` counts the requests received, :attr:`answered` those whose
    delay is over (counted just before the answer is written).
    """

    def __init__(self, jwks: Mapping[str, Any], *, delay: float = 0.0, prompt: int = 0) -> None:
        self.delay = delay
        self.prompt = prompt
        self.url = ""
        self._body = json.dumps(jwks).encode()
        self._lock = threading.Lock()
        self._requests = 0
        self._answered = 0
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def requests(self) -> int:
        with self._lock:
            return self._requests

    @property
    def answered(self) -> int:
        with self._lock:
            return self._answered

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self._requests += 1
            slow = self._requests > self.prompt
        if slow and self.delay:
            time.sleep(self.delay)
        with self._lock:
            self._answered += 1
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Cache-Control", "public, max-age=3600")
        handler.send_header("Content-Length", str(len(self._body)))
        handler.end_headers()
        handler.wfile.write(self._body)

    def __enter__(self) -> Self:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server._answer(self)

            def log_message(self, *_: Any) -> None:
                return

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/certs"
        return self

    def __exit__(self, *_: object) -> None:
        assert self._httpd is not None
        self._httpd.shutdown()
        self._httpd.server_close()
