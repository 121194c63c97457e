"""Test helpers for the library's log lines: which way a line goes, and reading the lines.

pytest attaches its own log capture to every logger that does not propagate -- ours, since
``configure_logging`` turns propagation off -- so in a test every line becomes a record, as
when an application listens. :func:`only_ours` takes pytest's handlers off ``tokenbroker`` for a
block: lines then go straight to our sink, as in production (the hot path).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from tokenbroker.kernel import log as kernel_log

TRACE_KEYS = frozenset(
    {
        "logging.googleapis.com/trace",
        "logging.googleapis.com/spanId",
        "logging.googleapis.com/trace_sampled",
    }
)

Route = Callable[[], AbstractContextManager[None]]


class Records(logging.Handler):
    """An application's own handler: keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def only_ours() -> Iterator[None]:
    """Our handler alone on ``tokenbroker`` for the block (see the module docstring)."""
    root = logging.getLogger(kernel_log.ROOT_LOGGER)
    others = [h for h in root.handlers if not isinstance(h, kernel_log._SinkHandler)]
    for handler in others:
        root.removeHandler(handler)
    try:
        yield
    finally:
        for handler in others:
            root.addHandler(handler)


@contextmanager
def with_records() -> Iterator[None]:
    """Someone else listening on ``tokenbroker`` for the block: every line is a record."""
    handler = Records()
    root = logging.getLogger(kernel_log.ROOT_LOGGER)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


ROUTES: dict[str, Route] = {"direct": only_ours, "records": with_records}


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def trace_fields(line: dict[str, Any]) -> dict[str, Any]:
    return {key: line[key] for key in TRACE_KEYS if key in line}
