"""What the local gRPC test servers of Google APIs share: serving, clients, standalone mode.

:mod:`tests.support.monitoring_server` and :mod:`tests.support.secretmanager_server` each model
one API's rules; the gRPC plumbing around those rules is the same for both and lives here, in
:class:`GrpcTestServer`. A server answers unary methods of one service with generic handlers (no
generated servicer code: the message classes come from the official client package), on an
insecure port of 127.0.0.1, from a thread pool. The clients it hands out are closed with it.

Standalone mode (``python -m tests.support.<server> --port P``): :func:`standalone_parser`
gives the options both share, and :func:`announce_and_wait` prints the ``READY ...`` line a
parent process reads once SIGINT and SIGTERM are handled, then blocks until one arrives.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent import futures
from typing import Any, ClassVar, NamedTuple, Self, TypeVar

import grpc

_Opened = TypeVar("_Opened")


class UnaryMethod(NamedTuple):
    """One unary method of the service: what answers it and how its messages go on the wire."""

    behaviour: Callable[[Any, Any], Any]  # (request, grpc.ServicerContext) -> response
    request_deserializer: Callable[[bytes], Any]
    response_serializer: Callable[[Any], bytes]


class GrpcTestServer:
    """A gRPC server for one service on 127.0.0.1; ``start()`` binds ``port`` (0: a free one)
    and sets :attr:`address` (``host:port``).

    Subclasses set :attr:`service` (``google.monitoring.v3.MetricService``) and implement
    :meth:`_methods`; methods they do not list answer UNIMPLEMENTED, as gRPC does for any
    unknown method.
    """

    service: ClassVar[str]

    def __init__(self, *, port: int = 0, max_workers: int = 16) -> None:
        self.address = ""
        self._port = port
        self._max_workers = max_workers
        self._server: Any = None
        self._closers: list[Callable[[], None]] = []

    def _methods(self) -> Mapping[str, UnaryMethod]:
        """The methods served, by name (``CreateTimeSeries``)."""
        raise NotImplementedError

    def start(self) -> Self:
        if self._server is not None:
            return self
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                method.behaviour,
                request_deserializer=method.request_deserializer,
                response_serializer=method.response_serializer,
            )
            for name, method in self._methods().items()
        }
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self._max_workers))
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(self.service, handlers),)
        )
        port = server.add_insecure_port(f"127.0.0.1:{self._port}")
        if not port:
            raise OSError(f"could not bind 127.0.0.1:{self._port}")
        server.start()
        self._server = server
        self.address = f"127.0.0.1:{port}"
        return self

    def _connect(
        self, open_: Callable[[str], _Opened], close: Callable[[_Opened], None]
    ) -> _Opened:
        """``open_(address)`` (a channel, a client) for a caller; :meth:`stop` calls ``close``
        on it."""
        if not self.address:
            raise RuntimeError("start the server first")
        opened = open_(self.address)
        self._closers.append(lambda: close(opened))
        return opened

    def stop(self) -> None:
        for close in self._closers:
            close()
        self._closers.clear()
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def standalone_parser(description: str) -> argparse.ArgumentParser:
    """The options every standalone test server takes: ``--port`` and ``--max-workers``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument(
        "--max-workers", type=int, default=16, help="gRPC handler threads (default 16)"
    )
    return parser


def announce_and_wait(ready: str) -> None:
    """Handle SIGINT and SIGTERM, print ``ready`` (the ``READY host:port ...`` line the parent
    waits for) and block until one of the signals arrives."""
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    sys.stdout.write(ready + "\n")
    sys.stdout.flush()
    done.wait()
