"""The connect function's library parts without a server: the operator allow-list and the
start form's token."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tokenbroker.entrypoints.connect import FORM_TOKEN_SECONDS, form_token, form_token_holds
from tokenbroker.entrypoints.operators import OperatorAllowList
from tokenbroker.kernel.errors import ConfigError, PolicyDenied
from tokenbroker.kernel.model import Caller

KEY = b"k" * 32


def caller(email: str) -> Caller:
    return Caller(email=email, subject="s", issuer="i", expires_at=datetime.now(UTC))


def test_the_allow_list_takes_emails_members_and_domains() -> None:
    allowed = OperatorAllowList.parse(
        [
            "Alice@Example.com",
            "user:bob@example.com",
            "serviceAccount:ops@p.iam.gserviceaccount.com",
            "domain:Ops.Example.org",
        ],
        "X",
    )
    for email in ("alice@example.com", "BOB@example.com", "ops@p.iam.gserviceaccount.com",
                  "carol@ops.example.org"):  # fmt: skip
        assert allowed.check(caller(email)) == email.lower()
    for email in ("mallory@example.com", "carol@sub.ops.example.org", "x@example.org"):
        with pytest.raises(PolicyDenied):
            allowed.check(caller(email))


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "no operator"),
        (["group:ops@example.com"], "groups cannot be checked"),
        (["allUsers"], "not an email"),
        (["domain:a@b"], "not an email"),
    ],
)
def test_the_allow_list_refuses_what_it_cannot_check(entries: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        OperatorAllowList.parse(entries, "TOKENBROKER_CONNECT_OPERATORS")


def test_a_form_token_holds_for_its_operator_connection_and_time_only() -> None:
    now = 1_800_000_000.0
    token = form_token(KEY, "alice@example.com", "crm", now)
    assert form_token_holds(KEY, token, "alice@example.com", "crm", now + 1)
    assert not form_token_holds(KEY, token, "bob@example.com", "crm", now)
    assert not form_token_holds(KEY, token, "alice@example.com", "erp", now)
    assert not form_token_holds(b"x" * 32, token, "alice@example.com", "crm", now)
    assert not form_token_holds(KEY, token, "alice@example.com", "crm", now + FORM_TOKEN_SECONDS)
    for forged in ("", "abc", "1.2", token + "0", "9" * 20 + "." + token.split(".")[1]):
        assert not form_token_holds(KEY, forged, "alice@example.com", "crm", now)
