"""``Retry-After`` (RFC 9110 §10.2.3): the two forms, bounded, and never an exception."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tokenbroker.kernel.http import (
    MAX_RETRY_AFTER_SECONDS,
    PLAUSIBLE_RETRY_AFTER_SECONDS,
    parse_retry_after,
)
from tokenbroker.kernel.schedule import RefreshPolicy

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_delay_seconds_and_http_date() -> None:
    assert parse_retry_after("0", NOW) == 0
    assert parse_retry_after(" 120 ", NOW) == 120
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", NOW) == 30
    # The obsolete forms RFC 9110 §5.6.7 says recipients must accept.
    assert parse_retry_after("Thursday, 01-Jan-26 00:01:00 GMT", NOW) == 60
    assert parse_retry_after("Thu Jan  1 00:02:00 2026", NOW) == 120
    # A date in the past means "now".
    assert parse_retry_after("Wed, 31 Dec 2025 23:00:00 GMT", NOW) == 0


def test_long_waits_are_capped_at_one_hour() -> None:
    assert MAX_RETRY_AFTER_SECONDS == 3600
    assert parse_retry_after("7200", NOW) == MAX_RETRY_AFTER_SECONDS
    in_two_hours = "Thu, 01 Jan 2026 02:00:00 GMT"
    assert parse_retry_after(in_two_hours, NOW) == MAX_RETRY_AFTER_SECONDS


@pytest.mark.parametrize(
    "value",
    [
        # Far-future dates and huge delays: nobody means them; they are not believed.
        "Fri, 31 Dec 9999 23:59:59 GMT",
        "Sat, 01 Jan 2028 00:00:00 GMT",
        str(PLAUSIBLE_RETRY_AFTER_SECONDS + 1),
        "99999999999999999999",
        "9" * 5000,  # more digits than int() converts by default (a ValueError)
        # Not delay-seconds (1*DIGIT) and not an HTTP-date.
        "-5",
        "1.5",
        "1e3",
        "inf",
        "NaN",
        "0x10",
        "+10",
        "soon",
        "",
        "   ",
        # Non-ASCII digits that str.isdigit() accepts and float() does not (or does).
        "\u00b3",
        "\u0663\u0660",
        "\uff11\uff12",
        # Dates that make email.utils raise something other than ValueError.
        "Thu, 01 Jan 10000 00:00:00 GMT",
        "Thu, 99 Jan 2026 00:00:00 GMT",
        "Thu, 01 Jan 2026 25:61:61 GMT",
        "Thu, 01 Jan 2026 00:00:00 +9999",
        "\x00\x01",
        "Thu, 01 Jan 2026 00:00:00 GMT\r\nX: y",
    ],
)
def test_absurd_values_are_ignored_never_raised(value: str) -> None:
    assert parse_retry_after(value, NOW) is None


def test_a_naive_now_is_read_as_utc() -> None:
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", NOW.replace(tzinfo=None)) == 30


@pytest.mark.parametrize("value", ["Fri, 31 Dec 9999 23:59:59 GMT", "9" * 40, "7200"])
def test_no_retry_after_moves_the_next_attempt_beyond_the_cap(value: str) -> None:
    """The defect: a far-future date set the next refresh to 9999-12-31."""
    retry_after = parse_retry_after(value, NOW)
    at = RefreshPolicy().retry_at(NOW, 1, retry_after)
    assert at - NOW <= timedelta(seconds=MAX_RETRY_AFTER_SECONDS)
