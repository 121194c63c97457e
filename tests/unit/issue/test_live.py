"""LiveRecords: the connection's record as the store has it now (issue 9, item 2), with the
store's change marker read once per turn of the event loop."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from tokenbroker.adapters.memory import MemoryStateStore
from tokenbroker.issue.live import LiveRecords
from tokenbroker.kernel.errors import NeedsReauth
from tokenbroker.kernel.model import Connection, ConnectionStatus, GrantType, RefreshState


class Counting(MemoryStateStore):
    def __init__(self) -> None:
        super().__init__()
        self.markers = 0

    def change_marker(self) -> Any:
        self.markers += 1
        return super().change_marker()


def _store() -> Counting:
    store = Counting()
    store.create(
        Connection(id="c1", profile="generic", grant=GrantType.STATIC, client_id="x"),
        RefreshState(current_version=1),
    )
    return store


def test_requests_decided_in_one_turn_share_one_marker_read() -> None:
    store = _store()
    live = LiveRecords(store, denied="denied")

    async def main() -> None:
        await live.get("c1")
        await asyncio.sleep(0)  # the next turn
        before = (store.markers, live.reads)
        await asyncio.gather(*(live.get("c1") for _ in range(10)))
        assert (store.markers, live.reads) == (before[0] + 1, before[1])

    asyncio.run(main())


def test_a_change_is_seen_by_the_first_request_of_the_next_turn() -> None:
    store = _store()
    live = LiveRecords(store, denied="denied")

    async def main() -> None:
        await live.get("c1")
        record = store.get("c1")
        store.put_state("c1", replace(record.state, status=ConnectionStatus.DISABLED))
        await asyncio.sleep(0)  # the next turn
        with pytest.raises(NeedsReauth):
            await live.get("c1")

    asyncio.run(main())


def test_each_event_loop_reads_its_own_marker() -> None:
    store = _store()
    live = LiveRecords(store, denied="denied")
    asyncio.run(live.get("c1"))
    record = store.get("c1")
    store.put_state("c1", replace(record.state, status=ConnectionStatus.NEEDS_REAUTH))
    with pytest.raises(NeedsReauth):
        asyncio.run(live.get("c1"))


def test_peek_gives_only_an_active_record_whose_read_still_stands() -> None:
    store = _store()
    live = LiveRecords(store, denied="denied")

    async def main() -> None:
        assert live.peek("c1") is None  # never read: ask get()
        record = await live.get("c1")
        assert live.peek("c1") is record
        store.put_state("c1", replace(record.state, current_version=2))
        await asyncio.sleep(0)
        assert live.peek("c1") is None  # the marker moved: read again
        stopped = store.get("c1")
        store.put_state("c1", replace(stopped.state, status=ConnectionStatus.DISABLED))
        await asyncio.sleep(0)
        with pytest.raises(NeedsReauth):
            await live.get("c1")  # read, and remembered as disabled under this marker
        assert live.peek("c1") is None  # never handed out without get()'s refusal

    asyncio.run(main())
