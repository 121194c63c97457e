"""Secrets never print themselves; the logger redacts what slips through."""

from __future__ import annotations

import io
import json
import pickle

import pytest

from tests.conftest import restore_session_logging
from tokenbroker.kernel.errors import InvalidGrant
from tokenbroker.kernel.log import capture_logs, configure_logging, get_logger, redact_value
from tokenbroker.kernel.model import Credential
from tokenbroker.kernel.redact import scrub
from tokenbroker.kernel.secret import Secret

VALUE = "rt-Zk3mQ9vX2pL7wR4tY8uB1nC6"
JWT = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ3b3JrZXIifQ.c2lnbmF0dXJlLXZhbHVlLWhlcmU"


def test_secret_repr_str_format_show_fingerprint_only() -> None:
    secret = Secret(VALUE)
    for rendered in (repr(secret), str(secret), f"{secret}", f"{secret!r}", "%s" % secret):  # noqa: UP031
        assert VALUE not in rendered
        assert rendered.startswith("Secret(sha256:")
    assert secret.reveal() == VALUE
    assert Secret(VALUE) == secret
    assert Secret("other") != secret


def test_secret_refuses_pickling() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(Secret(VALUE))


def test_credential_repr_hides_every_secret() -> None:
    credential = Credential(
        access_token=Secret(JWT),
        refresh_token=Secret(VALUE),
        client_secret=Secret("s3cr3t-Value-123"),
    )
    rendered = repr(credential)
    for value in credential.secret_values():
        assert value not in rendered


@pytest.mark.parametrize(
    "text",
    [
        f"token {JWT} end",
        "ya29.a0AfH6SMBx-Real_Looking_Google_Token",
        "refresh 1//0gLongGoogleRefreshTokenValue_abcdef",
        "zoho 1000.8cb99dd3f2a1b4c5d6e7f8091a2b3c4d.9be93f1e2d3c4b5a69788796a5b4c3d2",
        "Authorization: Bearer abcDEF123456ghi",
        "opaque kX9aQ2mZ7pL0vB3nC8dE5fG1hJ4kL6mN",
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----",
    ],
)
def test_scrub_removes_token_shaped_text(text: str) -> None:
    scrubbed = scrub(text)
    assert "[REDACTED]" in scrubbed
    for fragment in ("ya29.a0", "1//0g", "8cb99d", "abcDEF123456", "kX9aQ2", "MIIEvQ", "eyJzdWIi"):
        assert fragment not in scrubbed


@pytest.mark.parametrize(
    "text",
    [
        "connection crm-eu-01 refreshed to version 12",
        "idempotency 0123456789abcdef0123456789abcdef",
        "event 6f1d2c3e-4b5a-4c6d-8e9f-0a1b2c3d4e5f",
        "https://accounts.zoho.eu/oauth/v2/token",
    ],
)
def test_scrub_leaves_ordinary_text_alone(text: str) -> None:
    assert scrub(text) == text


def test_redact_value_by_key_and_type() -> None:
    assert redact_value(Secret(VALUE)).startswith("Secret(sha256:")
    assert redact_value("plain", "refresh_token") == "[REDACTED]"
    assert redact_value("x", "client_secret") == "[REDACTED]"
    assert redact_value("Bearer", "token_type") == "Bearer"
    assert redact_value(3, "expires_in") == 3
    nested = redact_value({"body": {"access_token": "abc", "ok": [JWT]}})
    assert nested == {"body": {"access_token": "[REDACTED]", "ok": ["[REDACTED]"]}}


def test_logger_writes_cloud_logging_json_and_redacts() -> None:
    with capture_logs("debug") as stream:
        log = get_logger(component="test")
        log.info(
            "rotated", connection_id="crm", refresh_token=VALUE, secret=Secret(VALUE), note=JWT
        )
        try:
            raise InvalidGrant(f"provider said {JWT}")
        except InvalidGrant:
            log.exception("failed")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["severity"] == "INFO"
    assert lines[0]["message"] == "rotated"
    assert lines[0]["connection_id"] == "crm"
    assert "time" in lines[0]
    assert lines[1]["severity"] == "ERROR"
    assert "InvalidGrant" in lines[1]["exception"]
    output = stream.getvalue()
    assert VALUE not in output
    assert JWT not in output


def test_a_line_template_is_redacted_once_and_takes_only_numbers() -> None:
    """The issuer's per-request audit line is rendered once per decision shape: the same
    redaction as any line, the same JSON shape, and nothing but numbers added later."""
    with capture_logs("info") as stream:
        log = get_logger(component="test")
        line = log.template(
            "info", f"seen {JWT}", caller="a@b.c", refresh_token=VALUE, secret=Secret(VALUE)
        )
        line.emit(expires_in=900, latency_ms=0.25, absent=None)
        line.emit(expires_in=1, latency_ms=2.0)
        with pytest.raises(TypeError):
            line.emit(expires_in=True)
        with pytest.raises(TypeError):
            line.emit(expires_in="900")  # type: ignore[arg-type]
        log.template("debug", "hidden").emit(n=1)
    lines = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert (first["severity"], first["caller"], first["component"]) == ("INFO", "a@b.c", "test")
    assert (first["expires_in"], first["latency_ms"], first["absent"]) == (900, 0.25, None)
    assert first["time"].endswith("Z")
    assert lines[1]["expires_in"] == 1
    assert VALUE not in stream.getvalue() and JWT not in stream.getvalue()


def test_a_line_template_takes_its_numbers_in_order_and_nothing_else() -> None:
    """``emit_values``: the hot path's form of ``emit``, for the numbers named up front."""
    with capture_logs("info") as stream:
        line = get_logger(component="test").template(
            "info", "decided", refresh_token=VALUE, numbers=("expires_in", "latency_ms")
        )
        line.emit_values(900, 0.25)
        line.emit_values(None, 2.0)
        for bad in [(True, 1.0), ("900", 1.0), (1,), (1, 2, 3)]:
            with pytest.raises(TypeError):
                line.emit_values(*bad)  # type: ignore[arg-type]
    lines = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert [(x["expires_in"], x["latency_ms"]) for x in lines] == [(900, 0.25), (None, 2.0)]
    assert lines[0]["message"] == "decided" and lines[0]["time"].endswith("Z")
    assert VALUE not in stream.getvalue()


def test_log_level_filters() -> None:
    with capture_logs("warning") as stream:
        get_logger().info("hidden")
        get_logger().warning("shown")
    assert [json.loads(x)["message"] for x in stream.getvalue().splitlines()] == ["shown"]


def test_capture_logs_restores_the_configuration_in_force() -> None:
    outer = io.StringIO()
    configure_logging("info", stream=outer)
    try:
        with capture_logs("debug") as inner:
            get_logger().debug("inside")
        get_logger().info("after")
    finally:
        restore_session_logging()
    assert [json.loads(x)["message"] for x in inner.getvalue().splitlines()] == ["inside"]
    assert [json.loads(x)["message"] for x in outer.getvalue().splitlines()] == ["after"]


def test_an_unknown_level_is_refused_and_changes_nothing() -> None:
    with pytest.raises(ValueError, match="verbose"):
        configure_logging("verbose")


class FullDisk(io.StringIO):
    """A log destination that cannot take another byte (ENOSPC, EFBIG, a closed pipe)."""

    def write(self, _text: str) -> int:
        raise OSError(28, "No space left on device")


def test_a_log_destination_that_fails_never_fails_the_caller() -> None:
    """Found by the fault suite (an I/O error on every growing write): a warning logged while
    a store call was retrying raised OSError out of the retry, and the answer in hand -- the
    provider's new refresh token -- was lost with it. A line that cannot be written is
    dropped; the other destinations still get it."""
    kept = io.StringIO()
    try:
        configure_logging("info", stream=FullDisk())
        log = get_logger(component="test")
        log.warning("store call retrying", attempt=1)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("even with a traceback")
        configure_logging("info", stream=kept)
        get_logger(component="test").info("and the next destination works")
    finally:
        restore_session_logging()
    assert "and the next destination works" in kept.getvalue()


def test_one_failing_destination_does_not_starve_the_others(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    log_file = tmp_path / "broker.log"
    try:
        configure_logging("info", stream=FullDisk(), log_file=log_file)
        get_logger(component="test").error("still written to the file")
    finally:
        restore_session_logging()
    assert "still written to the file" in log_file.read_text()
