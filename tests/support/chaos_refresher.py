"""A refresher process for the fault suite, for what the CLI cannot be told.

``python -m tests.support.chaos_refresher [--clock-offset S] [--lease-ttl S] [--ticks N]
[--interval S] [CONNECTION_ID ...]`` builds the runtime exactly as an entry point does
(``start_logging`` -- which arms ``TOKENBROKER_FAILPOINTS`` --, then ``build_runtime`` from
the environment) and runs ``--ticks`` ticks, printing each summary as one JSON line.

* ``--clock-offset``: the process's clock runs this many seconds ahead (or behind, negative)
  of the host's. The library has no clock setting; ``build_runtime(clock=...)`` is the hook,
  so this is a refresher on a host whose clock is wrong, everything else unchanged.
* ``--lease-ttl``: the refresher's lease below the settings' 60-second floor (the suite's
  stale-holder scenarios wait for leases to run out; the tick keeps its own safety margin).

Exit code 0 when every tick's summary was ok, 1 otherwise (a library error prints
``{"error": code}`` for its tick); an unexpected exception ends the process with its
traceback, as it would end ``tokenbroker refresh``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime, timedelta

from tokenbroker.entrypoints.compose import build_runtime, start_logging
from tokenbroker.entrypoints.settings import Settings
from tokenbroker.kernel.errors import TokenBrokerError


class OffsetClock:
    """The system clock, shifted: a host whose wall clock is ``offset`` seconds off."""

    def __init__(self, offset: float) -> None:
        self.offset = timedelta(seconds=offset)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def monotonic(self) -> float:
        return time.monotonic()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("connections", nargs="*")
    parser.add_argument("--clock-offset", type=float, default=0.0)
    parser.add_argument("--lease-ttl", type=float, default=None)
    parser.add_argument("--ticks", type=int, default=1)
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args(argv)

    start_logging(default_level="warning")
    runtime = build_runtime(Settings.from_env(), clock=OffsetClock(args.clock_offset))
    overrides = {} if args.lease_ttl is None else {"lease_ttl": timedelta(seconds=args.lease_ttl)}
    ok = True
    try:
        for index in range(args.ticks):
            if index:
                time.sleep(args.interval)
            try:
                summary = asyncio.run(
                    runtime.tick(
                        connection_ids=args.connections or None,
                        refresher=runtime.refresher(**overrides),
                    )
                )
            except TokenBrokerError as error:  # an answer, as the CLI gives one: no traceback
                sys.stdout.write(json.dumps({"error": error.code}) + "\n")
                sys.stdout.flush()
                ok = False
                continue
            ok = ok and summary.ok
            sys.stdout.write(json.dumps(summary.to_json()) + "\n")
            sys.stdout.flush()
    finally:
        runtime.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
