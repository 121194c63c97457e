"""One structured logger: JSON lines in the shape Cloud Logging reads, redacted on the way out.

Cloud Logging turns a JSON line on stdout/stderr into a structured entry, taking ``severity``,
``message`` and ``time`` from it (https://cloud.google.com/logging/docs/structured-logging).
Every value passes the redaction processor: :class:`~tokenbroker.secret.Secret` values print as
fingerprints, fields with credential-ish names are dropped to ``[REDACTED]``, and token-shaped
substrings anywhere (messages, exception text) are replaced.

Configuration happens on first use or by :func:`configure_logging`, never at import.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import IO, Any

import structlog

from tokenbroker.redact import REDACTED, is_sensitive_key, scrub
from tokenbroker.secret import Secret

ENV_LOG_LEVEL = "TOKENBROKER_LOG_LEVEL"
ENV_LOG_FILE = "TOKENBROKER_LOG_FILE"
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_SEVERITY = {"warn": "WARNING", "exception": "ERROR"}

_configured = False
_config_lock = threading.Lock()


def redact_value(value: Any, key: str | None = None) -> Any:
    """``value`` made safe to log. ``key`` is the field name it is logged under, if any."""
    if isinstance(value, Secret):
        return repr(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if key is not None and is_sensitive_key(key):
        return REDACTED
    if isinstance(value, Mapping):
        return {str(k): redact_value(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact_value(v) for v in value]
    return scrub(value if isinstance(value, str) else str(value))


def _redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return {
        key: redact_value(value, None if key == "event" else key)
        for key, value in event_dict.items()
    }


def _dumps(obj: Any, **_: Any) -> str:
    return json.dumps(obj, default=str)


def _severity(
    _: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event_dict["severity"] = _SEVERITY.get(method, method.upper())
    return event_dict


class _LineWriter:
    """Writes whole lines to one or more streams under a lock (threads share it)."""

    def __init__(self, streams: list[IO[str]]) -> None:
        self._streams = streams
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            for stream in self._streams:
                stream.write(message + "\n")
                stream.flush()

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def configure_logging(
    level: str | None = None,
    *,
    stream: IO[str] | None = None,
    log_file: Path | str | None = None,
) -> None:
    """Set up the one logger. ``level`` and ``log_file`` default to the environment
    (``TOKENBROKER_LOG_LEVEL``, ``TOKENBROKER_LOG_FILE``); output goes to stderr."""
    global _configured  # noqa: PLW0603 - process-wide logging configuration
    level_name = (level or os.environ.get(ENV_LOG_LEVEL) or "info").lower()
    if level_name not in _LEVELS:
        level_name = "info"
    streams: list[IO[str]] = [stream or sys.stderr]
    path = log_file or os.environ.get(ENV_LOG_FILE)
    if path:
        streams.append(open(path, "a", encoding="utf-8"))  # noqa: SIM115 - lives for the process
    writer = _LineWriter(streams)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
            _severity,
            structlog.processors.format_exc_info,
            _redact,
            structlog.processors.EventRenamer("message"),
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level_name]),
        logger_factory=lambda *_: writer,
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(**bound: Any) -> Any:
    """The library's logger (configured from the environment on first use)."""
    if not _configured:
        with _config_lock:
            if not _configured:
                configure_logging()
    return structlog.get_logger("tokenbroker").bind(**bound)
