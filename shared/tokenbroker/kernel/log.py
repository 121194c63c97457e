"""One structured logger: JSON lines in the shape Cloud Logging reads, redacted on the way out.

Cloud Logging turns a JSON line on stdout/stderr into a structured entry, taking ``severity``,
``message`` and ``time`` from it (https://cloud.google.com/logging/docs/structured-logging).
Every value passes the redaction step: :class:`~tokenbroker.kernel.secret.Secret` values print as
fingerprints, fields with credential-ish names are dropped to ``[REDACTED]``, and token-shaped
substrings anywhere (messages, exception text) are replaced.

Written on the standard library rather than structlog: the interface is the same small subset
(``bind`` and one method per level, keyword fields), and importing structlog costs a cold
start 30-150 ms (it loads ``rich`` when installed), which every function instance would pay.

Configuration happens once, by the entry point (from its settings: ``TOKENBROKER_LOG_LEVEL``,
``TOKENBROKER_LOG_FILE``), through :func:`configure_logging`; a library used without it logs at
``info`` on stderr. Never at import, and never from the environment here: the kernel reads no
process state. :func:`capture_logs` is the test helper (as ``structlog.testing.capture_logs``).
"""

from __future__ import annotations

import atexit
import io
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from tokenbroker.kernel.redact import REDACTED, is_sensitive_key, scrub
from tokenbroker.kernel.secret import Secret

#: Level names, lowest first.
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


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


#: Routine lines (:meth:`LineTemplate.emit`: the issuer's audit of a success, one per request)
#: wait at most this long, or for this many more, before they are written together: one
#: write system call per batch instead of one per request. Anything else is written at once,
#: after what is waiting.
BATCH_SECONDS = 0.05
BATCH_LINES = 64


class _Sink:
    """Writes whole lines to one or more streams under a lock (threads share it).

    Routine lines (``soon=True``) to a stream backed by a file descriptor are batched
    (:data:`BATCH_SECONDS`, :data:`BATCH_LINES`) by a daemon thread, and written out at
    once before any other line, on :func:`flush`, on reconfiguration and at exit: a process
    killed outright loses at most the last :data:`BATCH_SECONDS` of them. In-memory streams
    (tests) get every line at once."""

    def __init__(self, level: int, streams: list[IO[str]], owned: list[IO[str]]) -> None:
        self.level = level
        self._streams = streams
        self._owned = owned  # files this sink opened and must close
        self._lock = threading.Lock()
        self._batched = all(_has_fd(stream) for stream in streams)
        self._pending: list[str] = []
        self._due = 0.0
        self._wake = threading.Condition(self._lock)
        self._flusher: threading.Thread | None = None
        self._closed = False

    def close(self) -> None:
        with self._lock:
            self._write_pending()
            self._closed = True
            self._wake.notify_all()
            for stream in self._owned:
                stream.close()

    def flush(self) -> None:
        with self._lock:
            self._write_pending()

    def write(self, line: str, *, soon: bool = False) -> None:
        """Never raises: a destination that cannot take the line (a full disk, a closed pipe)
        drops it, and the others still get it. Logging must never fail the work it reports
        on -- a refresh holding the provider's new refresh token least of all."""
        with self._lock:
            if soon and self._batched and not self._closed:
                self._pending.append(line)
                if len(self._pending) == 1:
                    self._due = time.monotonic() + BATCH_SECONDS
                    self._start_flusher()
                    self._wake.notify()
                if len(self._pending) >= BATCH_LINES:
                    self._write_pending()
                return
            self._write_pending()
            self._write(line + "\n")

    def _write_pending(self) -> None:
        if self._pending:
            text = "\n".join(self._pending) + "\n"
            self._pending.clear()
            self._write(text)

    def _write(self, text: str) -> None:
        for stream in self._streams:
            if stream.closed:  # replaced by a reconfiguration while this line was built
                continue
            with suppress(OSError, ValueError):  # ValueError: closed meanwhile
                stream.write(text)
                stream.flush()

    def _start_flusher(self) -> None:
        if self._flusher is None:
            self._flusher = threading.Thread(
                target=self._flush_when_due, name="tokenbroker-log", daemon=True
            )
            self._flusher.start()

    def _flush_when_due(self) -> None:
        with self._lock:
            while not self._closed:
                if not self._pending:
                    self._wake.wait()
                    continue
                left = self._due - time.monotonic()
                if left > 0:
                    self._wake.wait(left)
                    continue
                self._write_pending()


def _has_fd(stream: IO[str]) -> bool:
    try:
        stream.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return True


def flush() -> None:
    """Write out the routine lines waiting to be batched (the entry points' shutdown hooks;
    also run at exit)."""
    sink = _sink
    if sink is not None:
        sink.flush()


_sink: _Sink | None = None
_config_lock = threading.Lock()
atexit.register(flush)


def _after_fork_in_child() -> None:
    """A forked child (a gunicorn worker) has the parent's sink but not its flusher thread,
    and maybe a lock held by a thread that no longer exists: start both afresh."""
    sink = _sink
    if sink is not None:
        sink._lock = threading.Lock()
        sink._wake = threading.Condition(sink._lock)
        sink._flusher = None


os.register_at_fork(after_in_child=_after_fork_in_child)


class Logger:
    """A bound logger: ``log.info("message", field=value)``; ``log.bind(**fields)``."""

    __slots__ = ("_fields",)

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self._fields = dict(fields)

    def bind(self, **fields: Any) -> Logger:
        return Logger({**self._fields, **fields})

    def _emit(self, level: str, message: str, fields: Mapping[str, Any], exc: bool) -> None:
        sink = _sink or _configure_default()
        if _LEVELS[level] < sink.level:
            return
        entry: dict[str, Any] = {
            key: redact_value(value, key) for key, value in {**self._fields, **fields}.items()
        }
        if exc and sys.exc_info()[0] is not None:
            entry["exception"] = scrub("".join(traceback.format_exception(*sys.exc_info())))
        entry["time"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        entry["severity"] = level.upper()
        entry["message"] = scrub(message)
        sink.write(json.dumps(entry, default=str))

    def template(
        self, level: str, message: str, *, numbers: tuple[str, ...] = (), **fields: Any
    ) -> LineTemplate:
        """A line whose fields are fixed but for a few numbers, rendered (and redacted) once
        here: :meth:`LineTemplate.emit` adds the numbers and the time. For lines a hot path
        writes on every request with the same text (the issuer's audit of a cache hit).
        ``numbers`` names the numbers :meth:`LineTemplate.emit_values` takes, in order."""
        entry: dict[str, Any] = {
            key: redact_value(value, key) for key, value in {**self._fields, **fields}.items()
        }
        entry["severity"] = level.upper()
        entry["message"] = scrub(message)
        head = json.dumps(entry, default=str)
        return LineTemplate(_LEVELS[level], head[:-1], numbers)

    def debug(self, message: str, **fields: Any) -> None:
        self._emit("debug", message, fields, exc=False)

    def info(self, message: str, **fields: Any) -> None:
        self._emit("info", message, fields, exc=False)

    def warning(self, message: str, **fields: Any) -> None:
        self._emit("warning", message, fields, exc=False)

    def error(self, message: str, **fields: Any) -> None:
        self._emit("error", message, fields, exc=False)

    def exception(self, message: str, **fields: Any) -> None:
        """An error with the current exception's traceback (scrubbed) in ``exception``."""
        self._emit("error", message, fields, exc=True)


_second: list[Any] = [-1, ""]


def _stamp() -> str:
    """Now as Cloud Logging's ``time`` (RFC 3339, UTC, microseconds), the part up to the
    second formatted once per second."""
    now = time.time()
    second = int(now)
    if second != _second[0]:
        prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second[:] = [second, prefix]
    return f"{_second[1]}.{int((now - second) * 1_000_000):06d}Z"


class LineTemplate:
    """A pre-rendered line (:meth:`Logger.template`): ``emit`` appends numeric fields and the
    time. Only numbers (or ``None``) go in, so nothing added needs redacting or escaping."""

    __slots__ = ("_head", "_level", "_names")

    def __init__(self, level: int, head: str, numbers: tuple[str, ...] = ()) -> None:
        self._level = level
        self._head = head
        self._names = tuple(f', "{json.dumps(name)[1:-1]}": ' for name in numbers)

    def emit_values(self, *values: float | None) -> None:
        """:meth:`emit` with the numbers the template was made for (``numbers=``), in order:
        the hot path's form, without a mapping to build."""
        sink = _sink or _configure_default()
        if self._level < sink.level:
            return
        names = self._names
        if len(values) != len(names):
            raise TypeError(f"LineTemplate.emit_values: {len(names)} numbers, not {len(values)}")
        parts = [self._head]
        for name, value in zip(names, values, strict=True):
            kind = type(value)
            if kind is int or kind is float:
                parts += (name, repr(value))
            elif value is None:
                parts += (name, "null")
            else:  # a bool, or anything else: not a number this line can hold
                raise TypeError(f"LineTemplate.emit_values: {name.strip(', :')} must be a number")
        parts.append(f', "time": "{_stamp()}"}}')
        sink.write("".join(parts), soon=True)

    def emit(self, **numbers: float | None) -> None:
        sink = _sink or _configure_default()
        if self._level < sink.level:
            return
        parts = [self._head]
        for key, value in numbers.items():
            if value is None:
                parts.append(f', "{key}": null')
            elif type(value) is int or type(value) is float:
                parts.append(f', "{key}": {value!r}')
            else:  # a bool, or anything else: not a number this line can hold
                raise TypeError(f"LineTemplate.emit: {key} must be a number")
        parts.append(f', "time": "{_stamp()}"}}')
        sink.write("".join(parts), soon=True)


def configure_logging(
    level: str = "info",
    *,
    stream: IO[str] | None = None,
    log_file: Path | str | None = None,
) -> None:
    """Set up the one logger: lines at ``level`` and above to ``stream`` (stderr), and also
    appended to ``log_file`` when one is given. Raises ValueError for an unknown level."""
    global _sink  # noqa: PLW0603 - process-wide logging configuration
    threshold = level_threshold(level)
    streams: list[IO[str]] = [stream or sys.stderr]
    owned: list[IO[str]] = []
    if log_file:
        owned.append(open(log_file, "a", encoding="utf-8"))  # noqa: SIM115 - closed on reconfigure
    with _config_lock:
        previous = _sink
        _sink = _Sink(threshold, streams + owned, owned)
    if previous is not None:
        previous.close()


def level_threshold(level: str) -> int:
    """The numeric threshold of a level name (case-insensitive). ValueError when unknown."""
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r} (one of: {', '.join(_LEVELS)})") from None


@contextmanager
def capture_logs(level: str = "debug") -> Iterator[io.StringIO]:
    """Everything logged inside the block, as JSON lines in a string buffer; the configuration
    in force before is restored afterwards (its files stay open)."""
    global _sink  # noqa: PLW0603 - process-wide logging configuration
    stream = io.StringIO()
    with _config_lock:
        previous = _sink
        _sink = _Sink(level_threshold(level), [stream], [])
    try:
        yield stream
    finally:
        with _config_lock:
            _sink = previous


def _configure_default() -> _Sink:
    with _config_lock:
        configured = _sink
    if configured is None:
        configure_logging()
    assert _sink is not None  # noqa: S101 - set just above
    return _sink


def get_logger(**bound: Any) -> Logger:
    """The library's logger (``info`` on stderr until an entry point configures it)."""
    return Logger(bound)
