"""The trace context of the request being served, for log correlation.

Cloud Run (and so a gen2 function) passes the caller's trace on in two headers; Google's
advice is to read ``traceparent`` and prefer it, keeping ``X-Cloud-Trace-Context`` as the
fallback (https://cloud.google.com/trace/docs/trace-context, *HTTP requests*):

* W3C ``traceparent`` (https://www.w3.org/TR/trace-context/#traceparent-header):
  ``VERSION-TRACE_ID-PARENT_ID-FLAGS``, lower-case hex: a 2-digit version (``ff`` is invalid),
  a 32-digit trace id and a 16-digit parent (span) id, neither all zeros, 2 digits of flags
  whose lowest bit says *sampled*. Version ``00`` is exactly 55 characters; a later version may
  append ``-...`` fields, which are ignored, as the spec asks of a version-00 reader.
* ``X-Cloud-Trace-Context: TRACE_ID/SPAN_ID;o=OPTIONS``: 32 hex digits, then a span id in
  *decimal* (an unsigned 64-bit number), then ``o=1`` (sampled) or ``o=0``; the span and the
  options may be left out.

Cloud Logging wants the span id as 16 hex digits (``spanId``: "the 16-character hexadecimal
encoding of the span's ID ... an ID of 74 ... 000000000000004a",
https://cloud.google.com/trace/docs/trace-log-integration), so a decimal one is converted --
the conversion Google's own Python client once got wrong (googleapis/python-logging#942).

Parsing is strict because the header comes from the caller: anything malformed (a wrong
length, a non-hex digit, an all-zero id, a value longer than :data:`MAX_HEADER_CHARS`) is no
trace at all, never an error and never logged raw. What is kept is hex digits only, so a log
line can carry it without escaping.

The context lives in a :class:`contextvars.ContextVar`: each HTTP entry point sets it for the
request (:func:`enter`) and resets it when the answer is ready (:func:`leave`). Asyncio tasks
and :func:`asyncio.to_thread` copy it, so the lines a request causes carry it wherever they are
written; a plain executor thread does not.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Protocol

#: Longer header values are not parsed: ``traceparent`` version 00 is 55 characters and
#: ``X-Cloud-Trace-Context`` at most 59; a later ``traceparent`` version may be longer.
MAX_HEADER_CHARS = 256

_HEX = frozenset("0123456789abcdef")
_HEX_ANY_CASE = frozenset("0123456789abcdefABCDEF")
_DIGITS = frozenset("0123456789")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_MAX_SPAN = 2**64 - 1


@dataclass(slots=True)
class TraceContext:
    """One request's trace: ids as lower-case hex (validated), and the sampling decision
    when the header gave one."""

    trace_id: str
    span_id: str | None = None
    sampled: bool | None = None
    #: The log's rendering of this context, kept by the logger (project, fragment).
    rendered: tuple[str | None, str] | None = field(default=None, compare=False, repr=False)


def _text(value: str | bytes | None) -> str | None:
    if value is None:
        return None
    if len(value) > MAX_HEADER_CHARS:
        return None
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    return value.strip(" \t")


def parse_traceparent(value: str | bytes | None) -> TraceContext | None:
    """The context a W3C ``traceparent`` value carries, or ``None`` when it is not one."""
    text = _text(value)
    if text is None or len(text) < 55:
        return None
    version, trace_id, span_id, flags = text[0:2], text[3:35], text[36:52], text[53:55]
    valid = (
        text[2] == text[35] == text[52] == "-"
        and _HEX.issuperset(version)
        and version != "ff"
        # version 00 has exactly four fields; a later one may add "-..."
        and (len(text) == 55 or (version != "00" and text[55] == "-"))
        and _HEX.issuperset(trace_id)
        and _HEX.issuperset(span_id)
        and _HEX.issuperset(flags)
        and trace_id != _ZERO_TRACE
        and span_id != _ZERO_SPAN
    )
    return TraceContext(trace_id, span_id, bool(int(flags, 16) & 1)) if valid else None


#: ``X-Cloud-Trace-Context`` options: sampled, not sampled, left empty.
_OPTIONS: dict[str, bool | None] = {"o=1": True, "o=0": False, "o=": None}


def _decimal_span(span: str) -> str | None:
    """A decimal span id as 16 hex digits; ``""`` when it is not one (an unsigned 64-bit
    number, not zero)."""
    if len(span) > 20 or not _DIGITS.issuperset(span):
        return ""
    number = int(span)
    return f"{number:016x}" if 0 < number <= _MAX_SPAN else ""


def parse_cloud_trace_context(value: str | bytes | None) -> TraceContext | None:
    """The context an ``X-Cloud-Trace-Context`` value carries (the span id converted from
    decimal to 16 hex digits), or ``None`` when it is not one."""
    text = _text(value)
    if not text:
        return None
    rest, semicolon, options = text.partition(";")
    trace_id, _, span = rest.partition("/")  # "TRACE_ID", "TRACE_ID/" or "TRACE_ID/SPAN"
    span_id = _decimal_span(span) if span else None
    valid = (
        len(trace_id) == 32
        and _HEX_ANY_CASE.issuperset(trace_id)
        and trace_id != _ZERO_TRACE
        and span_id != ""
        and (not semicolon or options in _OPTIONS)
    )
    if not valid:
        return None
    return TraceContext(trace_id.lower(), span_id, _OPTIONS.get(options) if semicolon else None)


def from_headers(
    traceparent: str | bytes | None, cloud_trace_context: str | bytes | None = None
) -> TraceContext | None:
    """The request's context: ``traceparent`` when it is valid, else
    ``X-Cloud-Trace-Context`` when that is, else ``None``."""
    return parse_traceparent(traceparent) or parse_cloud_trace_context(cloud_trace_context)


class _Headers(Protocol):
    def get(self, name: str, /) -> str | None: ...


def from_header_map(headers: _Headers) -> TraceContext | None:
    """:func:`from_headers` over a case-insensitive header mapping (Flask's, aiohttp's)."""
    return from_headers(headers.get("traceparent"), headers.get("x-cloud-trace-context"))


def from_asgi_headers(headers: Iterable[tuple[bytes, bytes]]) -> TraceContext | None:
    """:func:`from_headers` over an ASGI header list (one pass; names in any case)."""
    traceparent: bytes | None = None
    cloud: bytes | None = None
    for name, value in headers:
        if len(name) == 11 and traceparent is None and name.lower() == b"traceparent":
            traceparent = value
        elif len(name) == 21 and cloud is None and name.lower() == b"x-cloud-trace-context":
            cloud = value
    if traceparent is None and cloud is None:
        return None
    return from_headers(traceparent, cloud)


_CURRENT: ContextVar[TraceContext | None] = ContextVar("tokenbroker_trace", default=None)

#: The context of the request being served (``None``: none, or outside a request).
current = _CURRENT.get


def enter(context: TraceContext | None) -> Token[TraceContext | None]:
    """Make ``context`` the current request's (``None`` clears one left by an earlier request
    on this thread); give the token to :func:`leave` when the request is answered."""
    return _CURRENT.set(context)


def leave(token: Token[TraceContext | None]) -> None:
    """Restore the context in force before :func:`enter`."""
    _CURRENT.reset(token)
