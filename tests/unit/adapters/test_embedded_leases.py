"""The embedded store's lease clock: the one host's boot clock, never its wall clock."""

from __future__ import annotations

import sqlite3
import time
from datetime import timedelta
from pathlib import Path

import pytest

from tests.contract.builders import T0, ManualClock, connection, due_state
from tokenbroker.adapters.embedded import EmbeddedDatabase, EmbeddedStateStore, HostLeaseClock

TTL = timedelta(seconds=30)


def test_the_host_lease_clock_does_not_follow_the_wall_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = HostLeaseClock()
    before = clock.now()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # an NTP step, a manual change
    after = clock.now()
    assert timedelta(0) <= after - before < timedelta(seconds=5)
    assert clock.epoch == HostLeaseClock().epoch  # every process on the host agrees


def test_a_lease_from_another_boot_is_free(tmp_path: Path) -> None:
    db = EmbeddedDatabase(tmp_path)
    try:
        before_reboot = ManualClock()
        before_reboot.epoch = "boot-1"  # type: ignore[misc]
        store = EmbeddedStateStore(db, lease_clock=before_reboot)
        store.create(connection("c1"), due_state(T0))
        assert store.claim(["c1"], T0, holder="h", ttl=TTL).claims
        after_reboot = ManualClock(T0 - timedelta(hours=1))  # uptime restarts from zero
        after_reboot.epoch = "boot-2"  # type: ignore[misc]
        again = EmbeddedStateStore(db, lease_clock=after_reboot)
        assert again.claim(["c1"], T0, holder="h2", ttl=TTL).claims  # its holder died
        assert again.claim(["c1"], T0, holder="h3", ttl=TTL).leased_elsewhere == 1
    finally:
        db.close()


def test_a_database_from_before_the_lease_clock_is_migrated(tmp_path: Path) -> None:
    db = EmbeddedDatabase(tmp_path)
    EmbeddedStateStore(db).create(connection("c1"), due_state(T0))
    db.close()
    with sqlite3.connect(tmp_path / "tokenbroker.db") as raw:  # as an older release made it
        raw.execute("ALTER TABLE connections DROP COLUMN lease_epoch")
    db = EmbeddedDatabase(tmp_path)
    try:
        store = EmbeddedStateStore(db)
        (claim,) = store.claim(["c1"], T0, holder="h", ttl=TTL).claims
        assert store.renew([claim.lease], ttl=TTL)[0] is not None
    finally:
        db.close()


def test_a_promoted_version_keeps_the_time_it_was_staged(tmp_path: Path) -> None:
    """A version's ``created_at`` is when it first became durable -- its stage -- not its
    promotion: that is what the loss window (answer received to durable) is measured by."""
    from tokenbroker.adapters.embedded import EmbeddedSecretStore
    from tokenbroker.kernel.model import Credential
    from tokenbroker.kernel.secret import Secret
    from tokenbroker.ports import Promotion, SecretWrite

    store = EmbeddedSecretStore(EmbeddedDatabase(tmp_path, key=None))
    first = store.put("c1", Credential(refresh_token=Secret("rt-1")), expected_version=None)
    before = time.time()
    (staged,) = store.stage([SecretWrite("c1", Credential(refresh_token=Secret("rt-2")), first)])
    assert isinstance(staged, int)
    after = time.time()
    time.sleep(0.3)
    (promoted,) = store.promote([Promotion("c1", staged, first)])
    assert promoted == staged
    created = store.get("c1").created_at
    assert created is not None and before <= created.timestamp() <= after
