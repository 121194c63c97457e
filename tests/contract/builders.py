"""Small builders for the values the contract suites store and compare."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta, timezone

from tokenbroker.kernel.model import (
    ClientAuthMethod,
    Connection,
    ConnectionEvent,
    ConnectionStatus,
    Credential,
    EventType,
    GrantType,
    RefreshState,
)
from tokenbroker.kernel.secret import Secret

#: A fixed "now" for state-store tests; whole seconds plus microseconds on purpose.
T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)

_serial = itertools.count(1)


class ManualClock:
    """A state store's lease clock in the suites: starts at ``T0``, moved only by the test.

    Stores keep lease time on their own clock (the port's rule), so a test that wants a lease
    to expire moves this clock, not the ``now`` it passes (which only selects what is due).
    ``epoch`` is what the embedded store's boot clock would call the current boot.
    """

    epoch = "contract-suite"

    def __init__(self, start: datetime = T0) -> None:
        self._now = start

    def now(self) -> datetime:
        return self._now

    def set(self, at: datetime) -> datetime:
        """Move the clock to ``at`` and return it (so a call can pass it as its ``now``)."""
        self._now = at
        return at


def connection(cid: str, **changes: object) -> Connection:
    base: dict[str, object] = {
        "id": cid,
        "profile": "generic",
        "grant": GrantType.REFRESH_TOKEN,
        "client_id": f"client-{cid}",
        "scopes": ("openid", "offline_access"),
        "token_url": "https://idp.example/token",
        "auth_method": ClientAuthMethod.BASIC,
        "params": {"audience": "api://x"},
        "created_at": datetime(2026, 1, 1, 9, 30, 0, tzinfo=UTC),
    }
    base.update(changes)
    return Connection(**base)  # type: ignore[arg-type]


def due_state(at: datetime, **changes: object) -> RefreshState:
    """An ACTIVE state whose refresh is due at ``at``."""
    base: dict[str, object] = {
        "status": ConnectionStatus.ACTIVE,
        "expires_at": at + timedelta(minutes=5),
        "next_refresh_at": at,
        "current_version": 1,
    }
    base.update(changes)
    return RefreshState(**base)  # type: ignore[arg-type]


def credential(tag: str = "") -> Credential:
    """A distinct credential each call (its tokens carry a serial number)."""
    n = next(_serial)
    return Credential(
        access_token=Secret(f"at-{tag}-{n}"),
        refresh_token=Secret(f"rt-{tag}-{n}"),
        client_secret=Secret("client-secret"),
        expires_at=datetime(2026, 1, 1, 13, 0, 0, tzinfo=UTC),
        obtained_at=datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC),
    )


def full_credential() -> Credential:
    """Every field set, with awkward values."""
    return Credential(
        access_token=Secret("at-ÿ-\u2603-" + "a" * 300),
        refresh_token=Secret('rt "quoted" \\ back\\slash\n newline'),
        client_secret=Secret("cs-\x00-nul"),
        private_key=Secret(
            '{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----\\nMIIE'
            '\\n-----END PRIVATE KEY-----\\n", "client_email": "sa@p.iam.gserviceaccount.com"}'
        ),
        token_type="DPoP",
        scope=("openid", "email", "https://www.googleapis.com/auth/drive.readonly"),
        expires_at=datetime(2026, 5, 4, 3, 2, 1, tzinfo=timezone(timedelta(hours=2))),
        obtained_at=datetime(2026, 5, 4, 0, 2, 1, tzinfo=UTC),
        metadata={"api_domain": "https://www.zohoapis.eu", "note": "ünïcödé"},
    )


def event(cid: str, event_type: EventType = EventType.ROTATED, n: int = 1) -> ConnectionEvent:
    return ConnectionEvent(
        type=event_type,
        connection_id=cid,
        occurred_at=datetime(2026, 2, 1, 8, 0, n % 60, tzinfo=UTC),
        idempotency_key=ConnectionEvent.key_for(event_type, cid, str(n)),
        version=n,
        expires_at=datetime(2026, 2, 1, 9, 0, 0, tzinfo=UTC),
        consecutive_failures=0,
    )
