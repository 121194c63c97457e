"""Redaction by value (every secret known for a connection) and by shape (token-like text)."""

from __future__ import annotations

import html
import json
import pickle
from collections.abc import Callable
from urllib.parse import quote, quote_plus

import pytest

from tokenbroker.kernel.redact import REDACTED, Scrubber, scrub
from tokenbroker.kernel.secret import Secret

# Known values that no shape rule recognises: a 32-hex token (the shape of a UUID's hex and
# our own idempotency keys, so deliberately not a token shape), a passphrase, a short secret.
HEX_TOKEN = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
PASSPHRASE = "correct horse battery staple"
SHORT = "s3cr3t"
ODD = 'p/a+s%s "w\u00f6rd" <&>'


@pytest.mark.parametrize("value", [HEX_TOKEN, PASSPHRASE, SHORT, ODD])
@pytest.mark.parametrize(
    "encode",
    [
        lambda v: v,
        lambda v: quote(v, safe=""),
        quote,
        quote_plus,
        lambda v: quote(v, safe="").lower(),  # %2f as some servers write it
        lambda v: json.dumps(v)[1:-1],
        lambda v: json.dumps(v, ensure_ascii=False)[1:-1],
        lambda v: json.dumps(v)[1:-1].replace("/", "\\/"),  # PHP's json_encode
        html.escape,
        lambda v: html.escape(v, quote=False),
    ],
)
def test_known_values_are_scrubbed_in_every_encoded_form(
    value: str, encode: Callable[[str], str]
) -> None:
    form = encode(value)
    text = f"refresh token {form} is invalid; retry with {form}."
    scrubbed = Scrubber([Secret(value)])(text)
    assert form not in scrubbed
    assert value not in scrubbed
    assert scrubbed.count(REDACTED) == 2
    assert scrubbed.startswith("refresh token ") and scrubbed.endswith(".")


def test_without_the_value_the_shape_scrubber_alone_misses_them() -> None:
    """Why redaction by value exists: these are not token-shaped."""
    for value in (HEX_TOKEN, PASSPHRASE, SHORT):
        assert value in scrub(f"echo {value}")


def test_a_scrubber_takes_secrets_strings_and_none_and_grows() -> None:
    scrubber = Scrubber([Secret(HEX_TOKEN), None, PASSPHRASE])
    assert scrubber("x " + HEX_TOKEN + " " + PASSPHRASE) == f"x {REDACTED} {REDACTED}"
    more = scrubber.including([Secret(SHORT)])
    assert SHORT not in more(SHORT)
    assert SHORT in scrubber(SHORT)  # the original is unchanged


def test_values_too_short_to_be_secrets_do_not_shred_text() -> None:
    scrubber = Scrubber([Secret("ab"), Secret(""), Secret("abcde")])
    assert scrubber("abandon abcdef ab") == "abandon abcdef ab"


def test_overlapping_values_leave_no_fragment() -> None:
    long = "rt-" + HEX_TOKEN + "-suffix"
    scrubbed = Scrubber([Secret(HEX_TOKEN), Secret(long)])(f"old {long} new {HEX_TOKEN}")
    assert HEX_TOKEN[:8] not in scrubbed
    assert "suffix" not in scrubbed


def test_a_scrubber_never_shows_its_values() -> None:
    scrubber = Scrubber([Secret(PASSPHRASE)])
    assert PASSPHRASE not in repr(scrubber)
    assert PASSPHRASE not in str(scrubber)
    with pytest.raises(TypeError):
        pickle.dumps(scrubber)


def test_a_scrubber_also_scrubs_shapes() -> None:
    assert "kX9aQ2mZ7pL0vB3nC8dE5fG1hJ4kL6mN" not in Scrubber()(
        "opaque kX9aQ2mZ7pL0vB3nC8dE5fG1hJ4kL6mN"
    )


# --- shapes: single-case tokens ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "token"),
    [
        ("token 3f786850e387550fdab836ed7e6dc881de23001b", "3f786850e387550fdab836ed"),  # 40 hex
        (
            "digest 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "9f86d081884c7d659a2f",
        ),
        ("at k3j4h5g6f7d8s9a0q1w2e3r4t5y6u7i8o9p0", "k3j4h5g6f7d8"),  # lower base64url
        ("at k3j4h5g6f7d8s9a0q1w2-e3r4t5y6u7i8_o9p0zz", "k3j4h5g6f7d8"),
        ("AT K3J4H5G6F7D8S9A0Q1W2E3R4T5Y6", "K3J4H5G6F7D8"),  # upper case
        ("key key-3ax6xnjp29jd6fds4gc373sgvjxteol0", "3ax6xnjp29jd"),
        (
            "do dop_v1_9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "9f86d081884c",
        ),
        ("aws AKIAIOSFODNN7EXAMPLE used", "AKIAIOSFODNN7EXAMPLE"),
        ("rt=8cb99dd3f2a1b4c5d6e7f8091a2b3c4d5e6f", "8cb99dd3f2a1b4c5"),
    ],
)
def test_single_case_tokens_are_scrubbed(text: str, token: str) -> None:
    scrubbed = scrub(text)
    assert token not in scrubbed
    assert REDACTED in scrubbed


@pytest.mark.parametrize(
    "text",
    [
        "connection acme-salesforce-production-eu-west-01 refreshed to version 12",
        "connection tenant_1234_prod_billing_2026 refreshed",
        "idempotency 0123456789abcdef0123456789abcdef",
        "idempotency_key=0123456789abcdef0123456789abcdef",
        "event 6f1d2c3e-4b5a-4c6d-8e9f-0a1b2c3d4e5f",
        "event_id=6f1d2c3e-4b5a-4c6d-8e9f-0a1b2c3d4e5f,6f1d2c3e-4b5a-4c6d-8e9f-0a1b2c3d4e5f",
        "uuid 6f1d2c3e4b5a4c6d8e9f0a1b2c3d4e5f",
        "holder worker-7:12345:abcdef12",
        "node gke-cluster-1-default-pool-3c2d9a4b-x7k2",
        "fingerprint sha256:0aad7da77d2e",
        "tokenbroker 1.4.2 on python 3.12.3, release v2026.05.01-rc1",
        "at 2026-05-01T12:00:00.123456+00:00",
        "projects/my-project-123456/secrets/tb-crm-eu-01/versions/12",
        "https://www.googleapis.com/auth/drive.readonly",
        "https://accounts.zoho.eu/oauth/v2/token",
        "error_code=temporarily_unavailable attempts=3 refresh_token_reuse_grace_seconds=30",
        "build-20240501-1a2b3c4d on instance-00001a2b3c",
    ],
)
def test_ordinary_identifiers_are_left_alone(text: str) -> None:
    assert scrub(text) == text
    assert Scrubber([Secret(HEX_TOKEN)])(text) == text
