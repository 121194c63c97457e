"""A latency-injecting TCP proxy, in a process of its own: cloud-like round trips for local
emulators.

``python bench/latency_proxy.py --one-way-ms 15 HOST:PORT [HOST:PORT ...]`` listens on one
loopback port per upstream and prints ``READY addr1 addr2 ...`` (same order) on stdout. Every
chunk read from either side is written to the other ``--one-way-ms`` after it arrived: each
RPC round trip gains twice that, and -- unlike a proxy that sleeps in its copy loop -- nothing
else is slowed: chunks are scheduled on arrival (``loop.call_at``), so HTTP/2 streams stay
multiplexed, throughput is not capped, and order is kept (same delay, FIFO timers).

Its own process, so its CPU is not counted as the client's (``bench/refresh_throughput.py``
reports client CPU per refresh).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys


def _deliver(writer: asyncio.StreamWriter, chunk: bytes) -> None:
    if not writer.is_closing():
        writer.write(chunk)


def _deliver_eof(writer: asyncio.StreamWriter) -> None:
    if not writer.is_closing():
        writer.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ConnectionError, OSError):
        while chunk := await reader.read(262144):
            loop.call_at(loop.time() + delay, _deliver, writer, chunk)
    loop.call_at(loop.time() + delay, _deliver_eof, writer)


def _handler(upstream: tuple[str, int], delay: float):  # type: ignore[no-untyped-def]
    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pump(reader, up_writer, delay), _pump(up_reader, writer, delay))

    return accept


async def serve(upstreams: list[str], one_way_ms: float) -> None:
    delay = one_way_ms / 1000
    servers = []
    for upstream in upstreams:
        host, _, port = upstream.rpartition(":")
        server = await asyncio.start_server(
            _handler((host or "127.0.0.1", int(port)), delay), "127.0.0.1", 0, backlog=4096
        )
        servers.append(server)
    addresses = [f"127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in servers]
    print("READY", *addresses, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one-way-ms", type=float, required=True)
    parser.add_argument("upstreams", nargs="+", metavar="HOST:PORT")
    args = parser.parse_args(argv)
    if args.one_way_ms < 0:
        parser.error("--one-way-ms must be >= 0")
    asyncio.run(serve(args.upstreams, args.one_way_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
