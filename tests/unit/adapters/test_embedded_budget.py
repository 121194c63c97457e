"""The embedded store's token-endpoint budgets across real processes, and what it keeps.

The contract suite races threads, each with its own SQLite connection; here separate
processes share one database file, as refreshers on one host do, so the ``BEGIN IMMEDIATE``
lock is what stands between them and an over-spent budget.
"""

from __future__ import annotations

import multiprocessing
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tokenbroker.adapters.budget_log import GC_GRACE
from tokenbroker.adapters.embedded import DB_NAME, EmbeddedDatabase, EmbeddedStateStore
from tokenbroker.kernel.errors import ConfigError

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
WINDOW = timedelta(minutes=10)


def _taker(state_dir: str, start_at: float, takes: int, limit: int) -> list[bool]:
    """One process: open the store, wait for the common start, take ``takes`` times."""
    store = EmbeddedStateStore(EmbeddedDatabase(Path(state_dir)))
    time.sleep(max(0.0, start_at - time.time()))
    return [
        store.take_budget("zoho:rt:shared", limit=limit, window=WINDOW, now=T0).granted
        for _ in range(takes)
    ]


def test_racing_processes_never_exceed_the_limit(tmp_path: Path) -> None:
    processes, takes, limit = 4, 30, 70
    EmbeddedDatabase(tmp_path).close()  # the key file and schema exist before the race
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        start_at = time.time() + 3.0  # after every interpreter has started and imported
        results = pool.starmap(
            _taker, [(str(tmp_path), start_at, takes, limit)] * processes, chunksize=1
        )
    granted = sum(sum(r) for r in results)
    assert granted == limit
    assert sum(len(r) for r in results) == processes * takes
    store = EmbeddedStateStore(EmbeddedDatabase(tmp_path))
    assert store.take_budget("zoho:rt:shared", limit=limit, window=WINDOW, now=T0).used == limit


def _rows(state_dir: Path) -> dict[str, str]:
    with sqlite3.connect(state_dir / DB_NAME) as conn:
        return dict(conn.execute("SELECT key, takes FROM budgets").fetchall())


def test_a_grant_forgets_budgets_that_aged_out_a_grace_period_ago(tmp_path: Path) -> None:
    store = EmbeddedStateStore(EmbeddedDatabase(tmp_path))
    store.take_budget("rotated-away", limit=1, window=WINDOW, now=T0)
    store.take_budget("recent", limit=1, window=WINDOW, now=T0 + GC_GRACE)
    # "rotated-away" aged out at T0 + WINDOW; "recent" only at T0 + GC_GRACE + WINDOW.
    store.take_budget("new", limit=1, window=WINDOW, now=T0 + WINDOW + GC_GRACE)
    assert sorted(_rows(tmp_path)) == ["new", "recent"]


def test_a_denial_writes_nothing(tmp_path: Path) -> None:
    store = EmbeddedStateStore(EmbeddedDatabase(tmp_path))
    store.take_budget("k", limit=1, window=WINDOW, now=T0)
    before = _rows(tmp_path)
    assert not store.take_budget("k", limit=1, window=WINDOW, now=T0 + WINDOW / 2).granted
    assert _rows(tmp_path) == before


@pytest.mark.parametrize(
    "stored",
    ["not json", '{"a": 1}', "[[1]]", "[[1, 0]]", '[["1", 2]]', "[[true, 1]]", "[[-5, 1]]"],
)
def test_a_tampered_budget_row_is_refused_not_guessed_at(tmp_path: Path, stored: str) -> None:
    store = EmbeddedStateStore(EmbeddedDatabase(tmp_path))
    store.take_budget("k", limit=5, window=WINDOW, now=T0)
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.execute("UPDATE budgets SET takes = ? WHERE key = 'k'", (stored,))
    with pytest.raises(ConfigError, match="budget 'k'"):
        store.take_budget("k", limit=5, window=WINDOW, now=T0)
