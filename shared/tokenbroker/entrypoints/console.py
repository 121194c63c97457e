"""The ``tokenbroker`` command: the CLI when the broker's extra is installed, else a clear word.

A worker that installed only ``tokenbroker[client]`` has the package, and so the command, but
not the CLI's dependencies (click, aiohttp, cryptography): it gets one line saying what to
install and exit status 2, not a traceback.
"""

from __future__ import annotations

import sys

from tokenbroker.entrypoints.answers import EXIT_USAGE


def main() -> None:
    try:
        from tokenbroker.entrypoints.cli import main as cli  # noqa: PLC0415
    except ModuleNotFoundError as missing:
        print(
            f"error: the tokenbroker command needs the broker's dependencies ({missing.name} is "
            "not installed): pip install 'tokenbroker[broker]'",
            file=sys.stderr,
        )
        sys.exit(EXIT_USAGE)
    cli()
