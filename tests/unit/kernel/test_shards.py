"""Shards: the shards of one count partition every connection id, by a slot stable across
processes (a fan-out worker and the store must agree on it without talking)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenbroker.kernel.model import BUCKETS, SLOTS, SLOTS_PER_BUCKET, Shard, bucket_of, slot_of

ids = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,62}", fullmatch=True)
counts = st.integers(min_value=1, max_value=SLOTS)


@given(ids, counts)
def test_exactly_one_shard_of_a_count_holds_each_connection(cid: str, count: int) -> None:
    holders = [i for i in range(count) if Shard(i, count).holds(cid)] if count <= 64 else None
    if holders is not None:
        assert len(holders) == 1
    # For any count: the shard whose range holds the slot is the only one (ranges tile).
    slot = slot_of(cid)
    index = next(i for i in range(count) if slot < Shard(i, count).slots.stop)
    assert Shard(index, count).holds(cid)
    assert index == 0 or not Shard(index - 1, count).holds(cid)


@given(counts)
def test_the_slot_ranges_of_a_count_tile_every_slot_with_none_empty(count: int) -> None:
    starts = {0: Shard(0, count).slots}
    for index in (1, count // 2, count - 1):
        if 0 < index < count:
            previous, here = Shard(index - 1, count).slots, Shard(index, count).slots
            assert previous.stop == here.start
            starts[index] = here
    assert Shard(0, count).slots.start == 0
    assert Shard(count - 1, count).slots.stop == SLOTS
    if count <= BUCKETS:  # whole buckets, sizes within one bucket of each other
        smallest = BUCKETS // count * SLOTS_PER_BUCKET
        assert all(
            r.start % SLOTS_PER_BUCKET == 0 == r.stop % SLOTS_PER_BUCKET for r in starts.values()
        )
    else:
        smallest = SLOTS // count
    assert all(smallest <= len(r) <= smallest + SLOTS_PER_BUCKET for r in starts.values())


@pytest.mark.parametrize("count", [2, 3, 4, 5, 7, 16, 31, 32])
def test_up_to_bucket_count_no_two_shards_share_a_bucket(count: int) -> None:
    """What keeps fan-out workers' claims off each other's index entries (Firestore)."""
    owned = [b for i in range(count) for b in Shard(i, count).buckets]
    assert sorted(owned) == list(range(BUCKETS))
    assert all(len(Shard(i, count).buckets) <= 16 for i in range(count))  # under 30 for an IN


@pytest.mark.parametrize("count", [33, 100, 1000])
def test_beyond_it_a_bucket_is_shared_only_by_neighbours(count: int) -> None:
    for i in range(count):
        buckets = Shard(i, count).buckets
        assert len(buckets) <= 2
        assert all(bucket_of(slot) in buckets for slot in Shard(i, count).slots)


def test_the_slot_is_the_same_in_another_process() -> None:
    """Not Python's salted ``hash``: a worker started later must agree with the store."""
    names = ["zoho-acme", "google-ops", "c0001"]
    code = f"from tokenbroker.kernel.model import slot_of; print([slot_of(n) for n in {names!r}])"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    )
    assert out.stdout.strip() == str([slot_of(n) for n in names])


def test_slots_spread_evenly() -> None:
    """10,000 ids over 4 shards: each within 10% of a quarter (a skewed hash would leave one
    worker carrying most of the fleet)."""
    held = [0] * 4
    for n in range(10_000):
        held[next(i for i in range(4) if Shard(i, 4).holds(f"conn-{n:05d}"))] += 1
    assert all(2_250 <= h <= 2_750 for h in held), held


@pytest.mark.parametrize(("index", "count"), [(-1, 2), (2, 2), (0, 0), (0, SLOTS + 1)])
def test_a_shard_outside_its_count_is_refused(index: int, count: int) -> None:
    with pytest.raises(ValueError, match="shard"):
        Shard(index, count)
