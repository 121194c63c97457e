"""One structured logger: Cloud Logging's JSON lines through the standard ``logging`` module,
redacted on the way out, each carrying the trace of the request it was written for.

**The line.** Cloud Logging turns a JSON object on stdout/stderr into a structured entry and
takes some fields out of the payload into the entry itself
(https://cloud.google.com/logging/docs/structured-logging, *Special JSON fields*): ``severity``,
``message``, ``time``, ``logging.googleapis.com/labels`` (a map of strings: ``component`` on
every line, and ``function``, the function's name from ``K_SERVICE``, when the entry point
passes it), and, on every line written while a request with a trace header is served
(:mod:`tokenbroker.kernel.trace`), ``logging.googleapis.com/trace``
(``projects/PROJECT_ID/traces/TRACE_ID``), ``logging.googleapis.com/spanId`` (16 hex digits) and
``logging.googleapis.com/trace_sampled`` -- which is what nests a function's lines under its
request in the Logs Explorer (https://cloud.google.com/trace/docs/trace-log-integration). The
trace's name needs the project (``TOKENBROKER_GCP_PROJECT`` or ``GOOGLE_CLOUD_PROJECT``, which
the entry point passes on): without one, lines carry no trace fields. A line of
:meth:`Logger.exception` carries the traceback in ``exception``, one of the three fields
(``stack_trace``, ``exception``, ``message``) Error Reporting reads a stack trace from; with a
stack trace there no ``@type`` is needed
(https://cloud.google.com/error-reporting/docs/formatting-error-messages). Lines without one
(expected failures, logged with their error code) are deliberately not error events.

**Redaction.** Every value passes it: :class:`~tokenbroker.kernel.secret.Secret` values print
as fingerprints, fields with credential-ish names become ``[REDACTED]``, and token-shaped
substrings anywhere (messages, exception text) are replaced. It happens when the record is
made, so whatever sees the record -- this module's handler or one of the application's -- sees
redacted values only (``record.exc_info`` stays ``None``; the scrubbed traceback is in
``record.exc_text``, where :class:`logging.Formatter` looks for it).

**The standard logging module.** Our loggers are ``logging.getLogger("tokenbroker.<component>")``
(``get_logger(component="issuer")`` writes through ``tokenbroker.issuer``), children of
``tokenbroker``; their levels, filters, handlers and ``disabled`` work as for any logger. A
record has the line's fields as attributes: ``record.fields`` (the payload fields, redacted),
``record.labels`` and ``record.trace`` (a :class:`~tokenbroker.kernel.trace.TraceContext` or
``None``); :class:`CloudLoggingFormatter` renders any record -- ours or another library's -- as
the line. :func:`configure_logging` (the entry points, from their settings) installs one
handler on ``tokenbroker``, with that formatter, writing to the batching sink (below), sets that
logger's level, and by default ``propagate = False``, so that a root handler does not print
every line a second time. To have the lines reach the root logger's handlers as well, pass
``propagate=True`` (or set ``logging.getLogger("tokenbroker").propagate = True``).

**The fast path.** Building a :class:`logging.LogRecord` costs more than the rest of writing a
line, and the issuer writes one audit line per request (:class:`LineTemplate`, a line rendered
once per decision shape). So when nobody but our own handler would see a line -- the usual case,
checked per line from the loggers' state (:meth:`_Config.direct`): no handler or filter on the
component's logger, ours alone on ``tokenbroker``, no filter on it, our formatter, no
propagation -- the line is rendered straight to the sink, exactly as that handler would have
rendered the record; otherwise a record is made and handed to ``logging``. The level check is
``logging``'s own (``Logger.isEnabledFor``) either way.

**Why not structlog.** Its interface is the one kept here (``bind``, one method per level,
keyword fields, ``capture_logs``), but it would bring neither the redaction, nor the Cloud
Logging fields, nor the pre-rendered hot-path line, which would all be ours anyway -- as
processors and a bypass -- and it costs every cold start its import (~6 ms in the deployed
dependency set, more with ``rich`` installed) and the kernel (which the consumer client ships
alone) its first dependency. The standard library's ``logging`` is already imported by then
(asyncio, the functions framework and gunicorn import it), so integrating with it costs nothing.

**The sink.** Whole lines to stderr (and a file, when configured) under a lock, so lines written
from threads never interleave; routine lines (:class:`LineTemplate`) batched into one write
(:data:`BATCH_SECONDS`, :data:`BATCH_LINES`), flushed before any other line, at exit and
on reconfiguration; restarted in a forked child; never raising on a broken stream.

Configuration happens once, by the entry point (from its settings: ``TOKENBROKER_LOG_LEVEL``,
``TOKENBROKER_LOG_FILE``, the project and ``K_SERVICE``), through :func:`configure_logging`; a
library used without it logs at ``info`` on stderr -- unless the application has put handlers
on the ``tokenbroker`` logger itself, which are then left to do the logging. Never at import,
and never from the environment here: the kernel reads no process state. :func:`capture_logs` is
the test helper (as ``structlog.testing.capture_logs``).
"""

from __future__ import annotations

import atexit
import io
import json
import logging
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

from tokenbroker.kernel import trace as _trace
from tokenbroker.kernel.redact import REDACTED, is_sensitive_key, scrub
from tokenbroker.kernel.secret import Secret
from tokenbroker.kernel.trace import TraceContext

#: The parent of every logger of the library: ``tokenbroker.<component>``.
ROOT_LOGGER = "tokenbroker"
#: Level names, lowest first (the standard library's numbers).
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
#: Cloud Logging's severities (``LogSeverity``) for the standard levels; others round down.
_SEVERITIES = ((50, "CRITICAL"), (40, "ERROR"), (30, "WARNING"), (20, "INFO"), (10, "DEBUG"))
_SEVERITY = dict(_SEVERITIES)

LABELS = "logging.googleapis.com/labels"
TRACE = "logging.googleapis.com/trace"
SPAN_ID = "logging.googleapis.com/spanId"
TRACE_SAMPLED = "logging.googleapis.com/trace_sampled"

_ROOT = logging.getLogger(ROOT_LOGGER)  # a logger object only: nothing is configured here
_current_trace = _trace.current


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


def severity(levelno: int) -> str:
    """Cloud Logging's severity for a ``logging`` level number (a custom level rounds down)."""
    known = _SEVERITY.get(levelno)
    if known is not None:
        return known
    for number, name in _SEVERITIES:
        if levelno >= number:
            return name
    return "DEFAULT"


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

    def __init__(self, streams: list[IO[str]], owned: list[IO[str]]) -> None:
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
                pending = self._pending
                pending.append(line)
                waiting = len(pending)
                if waiting == 1:
                    self._due = time.monotonic() + BATCH_SECONDS
                    self._start_flusher()
                    self._wake.notify()
                if waiting >= BATCH_LINES:
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


_memo: tuple[int, str, int] = (-1, "", 0)
_time_ns = time.time_ns


def _stamp(now: float | None = None) -> str:
    """Now (or the POSIX time ``now``) as Cloud Logging's ``time``: RFC 3339, UTC, microseconds,
    the part up to the second formatted once per second (in integers: this is on the hot path).
    """
    global _memo  # noqa: PLW0603 - a one-entry memo, replaced whole (threads share it)
    micros = _time_ns() // 1000 if now is None else int(now * 1_000_000)
    memo = _memo
    if memo[0] != micros // 1_000_000:
        second = micros // 1_000_000
        prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        memo = _memo = (second, prefix, second * 1_000_000 - 1_000_000)
    # micros - (second - 1) s is 1_000_000 to 1_999_999: its last six digits, zero-padded.
    return memo[1] + str(micros - memo[2])[1:] + "Z"


def _trace_fields(context: TraceContext, project: str | None) -> dict[str, Any]:
    """The line's trace fields; none without a project, which the trace's name needs."""
    if not project:
        return {}
    fields: dict[str, Any] = {TRACE: f"projects/{project}/traces/{context.trace_id}"}
    if context.span_id is not None:
        fields[SPAN_ID] = context.span_id
    if context.sampled is not None:
        fields[TRACE_SAMPLED] = context.sampled
    return fields


def _trace_fragment(context: TraceContext, project: str | None) -> str:
    """``, "logging.googleapis.com/trace": ...`` for a line being rendered by hand, kept on the
    context: a request's lines render it once."""
    rendered = context.rendered
    if rendered is not None and rendered[0] == project:
        return rendered[1]
    fields = _trace_fields(context, project)
    fragment = ", " + json.dumps(fields)[1:-1] if fields else ""
    context.rendered = (project, fragment)
    return fragment


def _component_of(name: str) -> str:
    """The ``component`` label of a record without a ``component`` field: its logger's name
    below ``tokenbroker``, or the whole name."""
    prefix, dot, rest = name.partition(".")
    return rest if dot and prefix == ROOT_LOGGER and rest else name


class CloudLoggingFormatter(logging.Formatter):
    """A record as one line of Cloud Logging's structured JSON (see the module docstring).

    Any record: a record of ours has its fields redacted already (``record.fields``); the
    message and the exception text of every record are scrubbed here. ``project`` names the
    trace (``projects/PROJECT/traces/ID``); ``labels`` go on every line beside ``component``."""

    def __init__(
        self, *, project: str | None = None, labels: Mapping[str, str] | None = None
    ) -> None:
        super().__init__()
        self.project = project or None
        self.labels = {str(key): str(value) for key, value in (labels or {}).items()}

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if not isinstance(fields, Mapping):
            fields = {}
        text = record.exc_text
        if not text and record.exc_info:
            text = self.formatException(record.exc_info)
        if record.stack_info:
            text = f"{text}\n{record.stack_info}" if text else record.stack_info
        context = getattr(record, "trace", _current_trace())
        entry = self.compose(
            fields,
            record.levelno,
            scrub(record.getMessage()),
            created=record.created,
            context=context if isinstance(context, TraceContext) else None,
            exception=scrub(text) if text else None,
            component=_label(fields, record.name),
        )
        return json.dumps(entry, default=str)

    def label_map(self, component: str) -> dict[str, str]:
        return {"component": component, **self.labels}

    def compose(
        self,
        fields: Mapping[str, Any],
        levelno: int,
        message: str,
        *,
        created: float,
        context: TraceContext | None,
        exception: str | None,
        component: str,
    ) -> dict[str, Any]:
        """The line's object from values already redacted."""
        entry = dict(fields)
        entry["severity"] = severity(levelno)
        entry["message"] = message
        entry[LABELS] = self.label_map(component)
        entry["time"] = _stamp(created)
        if context is not None:
            entry.update(_trace_fields(context, self.project))
        if exception is not None:
            entry["exception"] = exception
        return entry


def _label(fields: Mapping[str, Any], name: str) -> str:
    component = fields.get("component")
    if component is None:
        return _component_of(name)
    return component if isinstance(component, str) else str(component)


class _SinkHandler(logging.Handler):
    """The default configuration's one handler: each record as the formatter's line, to the
    batching sink (routine lines batched).

    ``plain`` says whether it is as configured -- its own formatter, no level, no filter --
    so that a line may skip the record; its setters keep it (one attribute to read on the
    hot path instead of three)."""

    def __init__(self, sink: _Sink, formatter: CloudLoggingFormatter) -> None:
        self._own = formatter
        self._level = logging.NOTSET
        self._formatter: logging.Formatter | None = None
        self._filters = _Filters(self)
        self.plain = False
        super().__init__()
        self.sink = sink
        self.setFormatter(formatter)

    def _settle(self) -> None:
        self.plain = (
            self._formatter is self._own and self._level == logging.NOTSET and not self._filters
        )

    @property
    def level(self) -> int:
        return self._level

    @level.setter
    def level(self, value: int) -> None:
        self._level = value
        self._settle()

    @property
    def formatter(self) -> logging.Formatter | None:
        return self._formatter

    @formatter.setter
    def formatter(self, value: logging.Formatter | None) -> None:
        self._formatter = value
        self._settle()

    @property
    def filters(self) -> list[Any]:
        return self._filters

    @filters.setter
    def filters(self, value: list[Any]) -> None:
        self._filters = _Filters(self, value)
        self._settle()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - the logging convention: report, never raise
            self.handleError(record)
            return
        self.sink.write(line, soon=getattr(record, "routine", False) is True)

    def flush(self) -> None:
        self.sink.flush()


class _Filters(list[Any]):
    """A handler's filters that tell it when they change (``_SinkHandler.plain``)."""

    __slots__ = ("_owner",)

    def __init__(self, owner: _SinkHandler, items: list[Any] | None = None) -> None:
        super().__init__(items or ())
        self._owner = owner


def _telling(name: str) -> Any:
    change = getattr(list, name)

    def changed(self: _Filters, *args: Any) -> Any:
        try:
            return change(self, *args)
        finally:
            self._owner._settle()

    changed.__name__ = name
    return changed


for _name in (
    "append", "extend", "insert", "remove", "pop", "clear", "__setitem__", "__delitem__",
    "__iadd__", "__imul__",
):  # fmt: skip
    setattr(_Filters, _name, _telling(_name))


class _Config:
    """What :func:`configure_logging` (or :func:`capture_logs`) put in place. ``handler`` is
    ``None`` when the application handles the ``tokenbroker`` logger itself."""

    __slots__ = ("alone", "formatter", "handler", "sink")

    def __init__(
        self,
        sink: _Sink | None,
        handler: _SinkHandler | None,
        formatter: CloudLoggingFormatter,
    ) -> None:
        self.sink = sink
        self.handler = handler
        self.formatter = formatter
        #: The ``tokenbroker`` logger's handlers when nobody else listens.
        self.alone: list[logging.Handler] = [handler] if handler is not None else []

    def direct(self, logger: logging.Logger) -> _Sink | None:
        """Our sink, when a line through ``logger`` (at a level it is enabled for) would reach
        our handler alone, and nothing would change it on the way: then it may be written
        without a record."""
        handler = self.handler
        if handler is None:
            return None
        if logger is not _ROOT and (logger.handlers or logger.filters or not logger.propagate):
            return None
        root = _ROOT
        if (
            root.handlers == self.alone
            and not root.filters
            and not root.propagate
            and handler.plain
        ):
            return self.sink
        return None


_config: _Config | None = None
_config_lock = threading.Lock()


def flush() -> None:
    """Write out the routine lines waiting to be batched (the entry points' shutdown hooks;
    also run at exit)."""
    config = _config
    if config is not None and config.sink is not None:
        config.sink.flush()


atexit.register(flush)


def _after_fork_in_child() -> None:
    """A forked child (a gunicorn worker) has the parent's sink but not its flusher thread,
    and maybe a lock held by a thread that no longer exists: start both afresh. The lines the
    parent had waiting are the parent's to write: the child drops its copy (else they would
    be written twice). (``logging`` renews its handlers' own locks itself.)"""
    config = _config
    sink = config.sink if config is not None else None
    if sink is not None:
        sink._lock = threading.Lock()
        sink._wake = threading.Condition(sink._lock)
        sink._flusher = None
        sink._pending = []


os.register_at_fork(after_in_child=_after_fork_in_child)


def _logger_for(component: Any) -> logging.Logger:
    """``tokenbroker.<component>`` (one level down, whatever the name), or ``tokenbroker``."""
    if component is None or component == "":
        return _ROOT
    return logging.getLogger(f"{ROOT_LOGGER}.{str(component).replace('.', '_')}")


def _dispatch(
    logger: logging.Logger,
    level: int,
    message: str,
    *,
    fields: dict[str, Any],
    context: TraceContext | None,
    exception: str | None,
    config: _Config,
    routine: bool = False,
) -> None:
    """A record of values already redacted, handed to ``logging`` (someone else listens)."""
    try:
        caller = sys._getframe(3)  # the caller of Logger.info / LineTemplate.emit_values
        where: tuple[str, int, str | None] = (
            caller.f_code.co_filename,
            caller.f_lineno,
            caller.f_code.co_name,
        )
    except ValueError:  # pragma: no cover - called from the top of a stack
        where = ("(unknown file)", 0, None)
    record = logger.makeRecord(logger.name, level, where[0], where[1], message, (), None, where[2])
    record.exc_text = exception
    record.__dict__.update(
        fields=fields,
        labels=config.formatter.label_map(_label(fields, logger.name)),
        trace=context,
        routine=routine,
    )
    logger.handle(record)


class Logger:
    """A bound logger: ``log.info("message", field=value)``; ``log.bind(**fields)``. Writes
    through the standard logger :attr:`logger` (``tokenbroker.<component>``)."""

    __slots__ = ("_fields", "_logger")

    def __init__(self, fields: Mapping[str, Any], logger: logging.Logger | None = None) -> None:
        self._fields = dict(fields)
        self._logger = logger if logger is not None else _logger_for(self._fields.get("component"))

    @property
    def logger(self) -> logging.Logger:
        """The standard library's logger this one writes through."""
        return self._logger

    def bind(self, **fields: Any) -> Logger:
        same = "component" not in fields or fields["component"] == self._fields.get("component")
        return Logger({**self._fields, **fields}, self._logger if same else None)

    def _emit(self, level: int, message: str, fields: Mapping[str, Any], exc: bool) -> None:
        config = _config or _configure_default()
        logger = self._logger
        if not logger.isEnabledFor(level):
            return
        entry: dict[str, Any] = {
            key: redact_value(value, key) for key, value in {**self._fields, **fields}.items()
        }
        exception = None
        if exc and sys.exc_info()[0] is not None:
            exception = scrub("".join(traceback.format_exception(*sys.exc_info())))
        text = scrub(message)
        context = _current_trace()
        sink = config.direct(logger)
        if sink is None:
            _dispatch(
                logger, level, text, fields=entry, context=context, exception=exception,
                config=config,
            )  # fmt: skip
            return
        line = config.formatter.compose(
            entry, level, text, created=time.time(), context=context, exception=exception,
            component=_label(entry, logger.name),
        )  # fmt: skip
        sink.write(json.dumps(line, default=str))

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
        return LineTemplate(self._logger, _LEVELS[level], entry, scrub(message), numbers)

    def debug(self, message: str, **fields: Any) -> None:
        self._emit(10, message, fields, exc=False)

    def info(self, message: str, **fields: Any) -> None:
        self._emit(20, message, fields, exc=False)

    def warning(self, message: str, **fields: Any) -> None:
        self._emit(30, message, fields, exc=False)

    def error(self, message: str, **fields: Any) -> None:
        self._emit(40, message, fields, exc=False)

    def exception(self, message: str, **fields: Any) -> None:
        """An error with the current exception's traceback (scrubbed) in ``exception``."""
        self._emit(40, message, fields, exc=True)


class LineTemplate:
    """A pre-rendered line (:meth:`Logger.template`): ``emit`` appends numeric fields, the
    time and the request's trace (validated hex). Only numbers (or ``None``) go in, so nothing
    added needs redacting or escaping. Rendered again when the configuration changes."""

    __slots__ = ("_fields", "_level", "_logger", "_message", "_names", "_numbers", "_rendered")

    def __init__(
        self,
        logger: logging.Logger,
        level: int,
        fields: dict[str, Any],
        message: str,
        numbers: tuple[str, ...] = (),
    ) -> None:
        self._logger = logger
        self._level = level
        self._fields = fields
        self._message = message
        self._numbers = numbers
        self._names = tuple(f', "{json.dumps(name)[1:-1]}": ' for name in numbers)
        self._rendered: tuple[_Config | None, str] = (None, "")

    def _head(self, config: _Config) -> str:
        """The line up to its numbers (the fields, severity, message and labels)."""
        entry = dict(self._fields)
        entry["severity"] = severity(self._level)
        entry["message"] = self._message
        entry[LABELS] = config.formatter.label_map(_label(self._fields, self._logger.name))
        head = json.dumps(entry, default=str)[:-1]
        self._rendered = (config, head)
        return head

    def emit_values(self, *values: float | None) -> None:
        """:meth:`emit` with the numbers the template was made for (``numbers=``), in order:
        the hot path's form, without a mapping to build."""
        config = _config or _configure_default()
        logger = self._logger
        if not logger.isEnabledFor(self._level):
            return
        names = self._names
        if len(values) != len(names):
            raise TypeError(f"LineTemplate.emit_values: {len(names)} numbers, not {len(values)}")
        rendered = self._rendered
        parts = [rendered[1] if rendered[0] is config else self._head(config)]
        for name, value in zip(names, values, strict=True):
            kind = type(value)
            if kind is int or kind is float:
                parts += (name, repr(value))
            elif value is None:
                parts += (name, "null")
            else:  # a bool, or anything else: not a number this line can hold
                raise TypeError(f"LineTemplate.emit_values: {name.strip(', :')} must be a number")
        context = _current_trace()
        # _Config.direct, inlined (the call costs as much as the checks).
        handler, root = config.handler, _ROOT
        if (
            handler is None
            or (logger is not root and (logger.handlers or logger.filters or not logger.propagate))
            or root.handlers != config.alone
            or root.filters
            or root.propagate
            or not handler.plain
        ):
            self._dispatch(dict(zip(self._numbers, values, strict=True)), context, config)
            return
        if context is None:
            parts.append(f', "time": "{_stamp()}"}}')
        else:
            fields = context.rendered  # the request's trace fields, rendered by its first line
            project = config.formatter.project
            if fields is None or fields[0] != project:
                fields = (project, _trace_fragment(context, project))
            parts.append(f', "time": "{_stamp()}"{fields[1]}}}')
        handler.sink.write("".join(parts), soon=True)

    def emit(self, **numbers: float | None) -> None:
        config = _config or _configure_default()
        logger = self._logger
        if not logger.isEnabledFor(self._level):
            return
        rendered = self._rendered
        parts = [rendered[1] if rendered[0] is config else self._head(config)]
        for key, value in numbers.items():
            if value is None:
                parts.append(f", {json.dumps(key)}: null")
            elif type(value) is int or type(value) is float:
                parts.append(f", {json.dumps(key)}: {value!r}")
            else:  # a bool, or anything else: not a number this line can hold
                raise TypeError(f"LineTemplate.emit: {key} must be a number")
        context = _current_trace()
        sink = config.direct(logger)
        if sink is None:
            self._dispatch(numbers, context, config)
            return
        fragment = "" if context is None else _trace_fragment(context, config.formatter.project)
        parts.append(f', "time": "{_stamp()}"{fragment}}}')
        sink.write("".join(parts), soon=True)

    def _dispatch(
        self, numbers: Mapping[str, float | None], context: TraceContext | None, config: _Config
    ) -> None:
        _dispatch(
            self._logger, self._level, self._message, fields={**self._fields, **numbers},
            context=context, exception=None, config=config, routine=True,
        )  # fmt: skip


def _swap(old: logging.Handler | None, new: logging.Handler | None) -> None:
    """Put ``new`` where ``old`` is among the ``tokenbroker`` logger's handlers (appended
    when ``old`` is not there; ``old`` removed when ``new`` is ``None``). The application's
    own handlers stay as they are."""
    handlers = _ROOT.handlers
    if old is not None and old in handlers:
        if new is None:
            _ROOT.removeHandler(old)
        else:
            handlers[handlers.index(old)] = new
    elif new is not None:
        _ROOT.addHandler(new)


def configure_logging(
    level: str = "info",
    *,
    stream: IO[str] | None = None,
    log_file: Path | str | None = None,
    project: str | None = None,
    service: str | None = None,
    propagate: bool = False,
) -> None:
    """Set up the library's logging: lines at ``level`` and above to ``stream`` (stderr), and
    also appended to ``log_file`` when one is given, as Cloud Logging's JSON with traces named
    in ``project`` and the ``function`` label ``service`` (``K_SERVICE``). One handler on the
    ``tokenbroker`` logger (replacing the one installed before; the application's stay), that
    logger's level set, and ``propagate`` to the root logger off unless asked for. Raises
    ValueError for an unknown level."""
    global _config  # noqa: PLW0603 - process-wide logging configuration
    threshold = level_threshold(level)
    streams: list[IO[str]] = [stream or sys.stderr]
    owned: list[IO[str]] = []
    if log_file:
        owned.append(open(log_file, "a", encoding="utf-8"))  # noqa: SIM115 - closed on reconfigure
    formatter = CloudLoggingFormatter(
        project=project, labels={"function": service} if service else None
    )
    sink = _Sink(streams + owned, owned)
    handler = _SinkHandler(sink, formatter)
    with _config_lock:
        previous = _config
        _swap(previous.handler if previous is not None else None, handler)
        _ROOT.setLevel(threshold)
        _ROOT.propagate = propagate
        _config = _Config(sink, handler, formatter)
    if previous is not None and previous.sink is not None:
        previous.sink.close()


def level_threshold(level: str) -> int:
    """The numeric threshold of a level name (case-insensitive). ValueError when unknown."""
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r} (one of: {', '.join(_LEVELS)})") from None


@contextmanager
def capture_logs(
    level: str = "debug", *, project: str | None = None, service: str | None = None
) -> Iterator[io.StringIO]:
    """Everything logged inside the block, as JSON lines in a string buffer; the configuration
    in force before is restored afterwards (its files stay open). The project and the
    ``function`` label are the configuration's unless given."""
    global _config  # noqa: PLW0603 - process-wide logging configuration
    threshold = level_threshold(level)
    stream = io.StringIO()
    with _config_lock:
        previous = _config
        base = previous.formatter if previous is not None else CloudLoggingFormatter()
        formatter = CloudLoggingFormatter(
            project=project or base.project,
            labels={"function": service} if service else base.labels,
        )
        handler = _SinkHandler(_Sink([stream], []), formatter)
        saved_level = _ROOT.level
        _swap(previous.handler if previous is not None else None, handler)
        _ROOT.setLevel(threshold)
        _config = _Config(handler.sink, handler, formatter)
    try:
        yield stream
    finally:
        with _config_lock:
            _swap(handler, previous.handler if previous is not None else None)
            _ROOT.setLevel(saved_level)
            _config = previous


def _configure_default() -> _Config:
    """The configuration a library used without :func:`configure_logging` gets on its first
    line: ``info`` on stderr -- or, when the application has put handlers on the
    ``tokenbroker`` logger itself, theirs alone."""
    global _config  # noqa: PLW0603 - process-wide logging configuration
    with _config_lock:
        configured = _config
        if configured is None and _ROOT.handlers:
            configured = _config = _Config(None, None, CloudLoggingFormatter())
    if configured is not None:
        return configured
    configure_logging()
    assert _config is not None  # noqa: S101 - set just above
    return _config


def get_logger(**bound: Any) -> Logger:
    """The library's logger (``info`` on stderr until an entry point configures it), writing
    through ``logging.getLogger("tokenbroker.<component>")``."""
    return Logger(bound)
