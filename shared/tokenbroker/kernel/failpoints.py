"""Failpoints: named places where a test can make the process die as a crash would.

The fault suite kills refreshers at each step boundary of a refresh (after the lease, after the
intent, after the answer, after the secret write, after the state commit, after publishing) and
counts what a crash there loses. A signal sent from outside lands anywhere; a failpoint lands
exactly at the boundary, as FoundationDB's and TiKV's fail points do.

Disarmed (the default, and always in production: nothing arms them unless the operator sets
``TOKENBROKER_FAILPOINTS``) a failpoint is one dictionary lookup. Armed, ``name`` or
``name:N`` (die at the N-th pass, counting from 1), comma-separated, the process sends itself
SIGKILL: no ``finally``, no ``atexit``, no flush -- what a power cut or an OOM kill does.
"""

from __future__ import annotations

import os
import signal
import threading

_armed: dict[str, int] = {}
_lock = threading.Lock()


def arm(spec: str | None) -> None:
    """Arm the failpoints ``spec`` names (``"answer.received:3,secret.written"``); ``None`` or
    ``""`` disarms all. Raises ValueError for a malformed spec."""
    parsed = check(spec)
    with _lock:
        _armed.clear()
        _armed.update(parsed)


def check(spec: str | None) -> dict[str, int]:
    """``spec`` parsed to {name: pass}; ValueError when malformed."""
    parsed: dict[str, int] = {}
    for raw in (spec or "").split(","):
        item = raw.strip()
        if not item:
            continue
        name, _, count = item.partition(":")
        if not name or (count and (not count.isdigit() or int(count) < 1)):
            raise ValueError(f"failpoint {item!r}: expected NAME or NAME:N with N >= 1")
        parsed[name] = int(count) if count else 1
    return parsed


def failpoint(name: str) -> None:
    """Die here if ``name`` is armed and this is its N-th pass."""
    if not _armed:
        return
    with _lock:
        left = _armed.get(name)
        if left is None:
            return
        left -= 1
        _armed[name] = left
    if left == 0:
        os.kill(os.getpid(), signal.SIGKILL)
