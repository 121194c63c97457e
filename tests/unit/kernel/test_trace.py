"""Trace headers (``traceparent``, ``X-Cloud-Trace-Context``) parsed strictly into the request's
context: what is kept is validated hex, and anything else is no trace at all."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenbroker.kernel import trace
from tokenbroker.kernel.trace import (
    MAX_HEADER_CHARS,
    TraceContext,
    from_asgi_headers,
    from_header_map,
    from_headers,
    parse_cloud_trace_context,
    parse_traceparent,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{SPAN_ID}-01"
CLOUD = f"{TRACE_ID}/74;o=1"


# --- traceparent (https://www.w3.org/TR/trace-context/#traceparent-header) ----------------------


@pytest.mark.parametrize(
    ("value", "sampled"),
    [
        (TRACEPARENT, True),
        (f"00-{TRACE_ID}-{SPAN_ID}-00", False),
        (f"00-{TRACE_ID}-{SPAN_ID}-09", True),  # other flag bits set: sampled is the lowest
        (f"00-{TRACE_ID}-{SPAN_ID}-fe", False),
        (f" 00-{TRACE_ID}-{SPAN_ID}-01\t", True),  # optional whitespace around a header value
        (f"01-{TRACE_ID}-{SPAN_ID}-01-what-comes-later", True),  # a later version's extra field
        (f"cc-{TRACE_ID}-{SPAN_ID}-01", True),
        (TRACEPARENT.encode(), True),  # ASGI headers are bytes
    ],
)
def test_a_traceparent_gives_its_trace_span_and_sampling(value: str | bytes, sampled: bool) -> None:
    assert parse_traceparent(value) == TraceContext(TRACE_ID, SPAN_ID, sampled)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "00",
        f"00-{TRACE_ID}-{SPAN_ID}",  # no flags
        f"00-{TRACE_ID}-{SPAN_ID}-01-extra",  # version 00 has exactly four fields
        f"01-{TRACE_ID}-{SPAN_ID}-01extra",  # a later version's extra field starts with "-"
        f"ff-{TRACE_ID}-{SPAN_ID}-01",  # version ff is invalid
        f"00-{TRACE_ID.upper()}-{SPAN_ID}-01",  # lower-case hex only
        f"00-{TRACE_ID}-{SPAN_ID.upper()}-01",
        f"0g-{TRACE_ID}-{SPAN_ID}-01",
        f"00-{'0' * 32}-{SPAN_ID}-01",  # all-zero ids are invalid
        f"00-{TRACE_ID}-{'0' * 16}-01",
        f"00-{TRACE_ID[:-1]}-{SPAN_ID}-01",  # wrong lengths
        f"00-{TRACE_ID}z-{SPAN_ID}-01",
        f"00-{TRACE_ID}-{SPAN_ID}0-01",
        f"00_{TRACE_ID}_{SPAN_ID}_01",
        f"00-{TRACE_ID}-{SPAN_ID}-0x",
        f"00-{TRACE_ID[:31]}\u00e9-{SPAN_ID}-01",  # not ASCII
        f"00-{TRACE_ID}-{SPAN_ID}-01".encode() + b"\xff",
        f"01-{TRACE_ID}-{SPAN_ID}-01-" + "x" * MAX_HEADER_CHARS,  # absurdly long
    ],
)
def test_a_malformed_traceparent_is_no_trace(value: str | bytes | None) -> None:
    assert parse_traceparent(value) is None


# --- X-Cloud-Trace-Context (https://cloud.google.com/trace/docs/trace-context) ------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # Cloud Logging's own example: span 74 is 000000000000004a
        # (https://cloud.google.com/trace/docs/trace-log-integration).
        (f"{TRACE_ID}/74;o=1", TraceContext(TRACE_ID, "000000000000004a", True)),
        (f"{TRACE_ID}/74;o=0", TraceContext(TRACE_ID, "000000000000004a", False)),
        (f"{TRACE_ID}/74", TraceContext(TRACE_ID, "000000000000004a", None)),
        (f"{TRACE_ID}/18446744073709551615", TraceContext(TRACE_ID, "ffffffffffffffff", None)),
        (f"{TRACE_ID}/0074;o=", TraceContext(TRACE_ID, "000000000000004a", None)),
        (f"{TRACE_ID}/;o=1", TraceContext(TRACE_ID, None, True)),
        (f"{TRACE_ID}/", TraceContext(TRACE_ID, None, None)),
        (f"{TRACE_ID};o=1", TraceContext(TRACE_ID, None, True)),
        (TRACE_ID, TraceContext(TRACE_ID, None, None)),
        (f"{TRACE_ID.upper()}/1", TraceContext(TRACE_ID, "0000000000000001", None)),
    ],
)
def test_an_x_cloud_trace_context_gives_its_trace_and_its_span_in_hex(
    value: str, expected: TraceContext
) -> None:
    assert parse_cloud_trace_context(value) == expected
    assert parse_cloud_trace_context(value.encode()) == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "/74;o=1",
        f"{TRACE_ID[:-1]}/74;o=1",
        f"{TRACE_ID}0/74;o=1",
        f"{'0' * 32}/74;o=1",  # an all-zero trace
        f"{TRACE_ID}/0;o=1",  # a zero span
        f"{TRACE_ID}/18446744073709551616",  # past 64 bits
        f"{TRACE_ID}/123456789012345678901",  # more than 20 digits
        f"{TRACE_ID}/-74",
        f"{TRACE_ID}/+74",
        f"{TRACE_ID}/7a",  # hex is not decimal
        f"{TRACE_ID}/74;o=2",
        f"{TRACE_ID}/74;o=1;extra",
        f"{TRACE_ID}/74/75",
        f"{TRACE_ID}/\u0664",  # a digit, but not an ASCII one
        "g" * 32,
        f"{TRACE_ID}/74;o=1" + " " * MAX_HEADER_CHARS,
    ],
)
def test_a_malformed_x_cloud_trace_context_is_no_trace(value: str | None) -> None:
    assert parse_cloud_trace_context(value) is None


# --- which header ------------------------------------------------------------------------------


def test_traceparent_is_preferred_and_the_legacy_header_is_the_fallback() -> None:
    """Google's advice: support traceparent and prefer it; keep X-Cloud-Trace-Context as the
    fallback (https://cloud.google.com/trace/docs/trace-context)."""
    other = "0af7651916cd43dd8448eb211c80319c"
    assert from_headers(TRACEPARENT, f"{other}/1;o=0") == TraceContext(TRACE_ID, SPAN_ID, True)
    assert from_headers("garbage", f"{other}/1;o=0") == TraceContext(
        other, "0000000000000001", False
    )
    assert from_headers(None, None) is None
    assert from_headers("garbage", "garbage") is None


def test_asgi_and_mapping_headers_are_read_in_any_case() -> None:
    headers = [(b"content-type", b"application/json"), (b"TraceParent", TRACEPARENT.encode())]
    assert from_asgi_headers(headers) == TraceContext(TRACE_ID, SPAN_ID, True)
    legacy = [(b"X-Cloud-Trace-Context", CLOUD.encode())]
    assert from_asgi_headers(legacy) == TraceContext(TRACE_ID, "000000000000004a", True)
    assert from_asgi_headers([(b"host", b"issuer")]) is None
    # The first of a repeated header counts.
    twice = [(b"traceparent", TRACEPARENT.encode()), (b"traceparent", b"junk")]
    assert from_asgi_headers(twice) == TraceContext(TRACE_ID, SPAN_ID, True)

    class Headers(dict[str, str]):
        def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
            return next((v for k, v in self.items() if k.lower() == name), default)

    assert from_header_map(Headers({"X-Cloud-Trace-Context": CLOUD})) == TraceContext(
        TRACE_ID, "000000000000004a", True
    )


# --- anything at all ----------------------------------------------------------------------------

_HEXISH = st.text(alphabet="0123456789abcdefABCDEF-/;o=xg 0", max_size=80)


def _well_formed(context: TraceContext) -> bool:
    hexdigits = set("0123456789abcdef")
    span_ok = context.span_id is None or (
        len(context.span_id) == 16 and set(context.span_id) <= hexdigits
    )
    return (
        len(context.trace_id) == 32
        and set(context.trace_id) <= hexdigits
        and context.trace_id != "0" * 32
        and span_ok
        and context.span_id != "0" * 16
        and context.sampled in (True, False, None)
    )


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300), _HEXISH))
def test_any_header_value_gives_a_valid_context_or_none_and_never_raises(
    value: str | bytes,
) -> None:
    for parse in (parse_traceparent, parse_cloud_trace_context):
        context = parse(value)
        assert context is None or _well_formed(context)


@given(st.integers(0, 54), st.characters(codec="utf-8"))
def test_one_character_changed_in_a_traceparent_keeps_it_valid_or_voids_it(
    position: int, character: str
) -> None:
    mutated = TRACEPARENT[:position] + character + TRACEPARENT[position + 1 :]
    context = parse_traceparent(mutated)
    assert context is None or _well_formed(context)
    if context is not None:  # what is kept is what was sent: hex, unchanged
        assert context.trace_id in mutated and (context.span_id or "") in mutated


@given(st.integers(0, 2**70), st.sampled_from(["", ";o=1", ";o=0", ";o="]))
def test_any_decimal_span_converts_to_16_hex_digits_or_voids_the_header(
    span: int, options: str
) -> None:
    context = parse_cloud_trace_context(f"{TRACE_ID}/{span}{options}")
    if 0 < span < 2**64:
        assert context is not None and context.span_id == f"{span:016x}"
        assert int(context.span_id, 16) == span
    else:
        assert context is None


# --- the context of the request -------------------------------------------------------------------


def test_enter_and_leave_set_the_request_context_and_restore_the_one_before() -> None:
    assert trace.current() is None
    outer = trace.enter(TraceContext(TRACE_ID, SPAN_ID, True))
    inner = trace.enter(None)  # a request without a header clears what an earlier one left
    assert trace.current() is None
    trace.leave(inner)
    assert trace.current() == TraceContext(TRACE_ID, SPAN_ID, True)
    trace.leave(outer)
    assert trace.current() is None


def test_concurrent_requests_each_see_their_own_context() -> None:
    async def request(trace_id: str) -> list[str | None]:
        token = trace.enter(TraceContext(trace_id))
        seen = []
        try:
            for _ in range(5):
                await asyncio.sleep(0)
                context = trace.current()
                seen.append(context.trace_id if context else None)
                # A thread the request starts (asyncio.to_thread) sees it too.
                in_thread = await asyncio.to_thread(trace.current)
                seen.append(in_thread.trace_id if in_thread else None)
        finally:
            trace.leave(token)
        return seen

    async def main() -> list[list[str | None]]:
        return list(await asyncio.gather(*(request(f"{n:032x}") for n in range(1, 4))))

    for n, seen in enumerate(asyncio.run(main()), 1):
        assert seen == [f"{n:032x}"] * 10
    assert trace.current() is None
