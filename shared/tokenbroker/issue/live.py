"""What the issuer and the relay share about a decision: the connection's record as the state
store has it *now* (status is live, issue 9, item 2), the translation of a state store's
failure into the caller's answer, and the audit outcome of each wire error code."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import TypeVar

from tokenbroker.kernel.errors import (
    CorruptCredential,
    CredentialUnavailable,
    NeedsReauth,
    NotFound,
    PolicyDenied,
    TokenBrokerError,
)
from tokenbroker.kernel.model import ConnectionRecord, ConnectionStatus, StoredCredential
from tokenbroker.ports import SecretStore, StateStore

T = TypeVar("T")


def read_credential(
    secrets: SecretStore, connection_id: str, pointer: int | None
) -> StoredCredential:
    """The current credential of a connection whose live record names ``pointer`` as its
    current version (a store whose pointer is the state record then reads no state). Raises
    NotFound or the record's CorruptCredential, as ``SecretStore.get`` does."""
    value = secrets.get_many([connection_id], pointers={connection_id: pointer}).get(connection_id)
    if value is None:
        raise NotFound(f"no credential for connection {connection_id!r}")
    if isinstance(value, CorruptCredential):
        raise value
    return value


#: The audit outcome of each wire error code a decision can end in (anything else:
#: ``unavailable``); the same words for ``/token`` and the relay.
OUTCOMES = {
    "invalid_token": "unauthenticated",
    "access_denied": "denied",
    "invalid_request": "bad_request",
    "invalid_scope": "bad_request",
    "needs_reauth": "refused",
    "temporarily_unavailable": "unavailable",
}


def outcome_of(error: TokenBrokerError) -> str:
    return OUTCOMES.get(error.code, "unavailable")


async def state_call(call: Callable[[], T]) -> T:
    """A state store call, in a thread; a failure that may pass is the caller's 503 (retry
    shortly), anything else stays what it is."""
    try:
        return await asyncio.to_thread(call)
    except TokenBrokerError as error:
        if error.retryable:
            raise CredentialUnavailable(
                f"state store unavailable ({error.code})", retry_after=5
            ) from None
        raise


class LiveRecords:
    """Connection records as the store has them now, refused unless active.

    A record is read again (a state read, never a secret read) whenever the store's change
    marker moved since the last read -- on every request with a store that has no cheap
    marker (Firestore) -- so a disable, a removal, a needs_reauth or a rotation counts from
    the next request on, never after a TTL. A removed connection is ``PolicyDenied(denied)``
    (as for anything ungranted: no enumeration); a disabled one, or one that needs
    re-authorisation, a 409 ``needs_reauth``. ``on_stop(connection_id)`` runs when a
    connection is found removed or not active (to drop what was cached for it)."""

    def __init__(
        self,
        state: StateStore,
        *,
        denied: str,
        on_stop: Callable[[str], None] | None = None,
        size: int = 4096,
    ) -> None:
        self.state = state
        self.denied = denied
        self.on_stop = on_stop
        self.size = size
        #: The last read of each connection, with the marker taken just before it.
        self._seen: dict[str, tuple[Hashable, ConnectionRecord]] = {}
        #: State reads so far.
        self.reads = 0
        #: This turn of the event loop's marker (:meth:`_marker`).
        self._turn: tuple[asyncio.AbstractEventLoop, Hashable] | None = None

    def _marker(self) -> Hashable:
        """The store's change marker, read once per turn of the event loop and shared by the
        requests decided in that turn. Sound for "a request that arrives after a change sees
        it": a task step that runs in this turn was scheduled in an earlier one, so the bytes
        of its request were in before this turn began -- before the marker was read; a
        request that comes in during this turn is first stepped in the next one, after
        :meth:`_next_turn` (scheduled first) has dropped the shared marker. Outside a running
        loop, read every time."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self.state.change_marker()
        turn = self._turn
        if turn is not None and turn[0] is loop:
            return turn[1]
        marker = self.state.change_marker()
        self._turn = (loop, marker)
        loop.call_soon(self._next_turn)
        return marker

    def _next_turn(self) -> None:
        self._turn = None

    def peek(self, connection_id: str) -> ConnectionRecord | None:
        """The connection's record, without a read or a wait, when the last read still stands
        (the change marker has not moved since) and it is active; else ``None``: ask
        :meth:`get`, which reads and raises what a stopped connection gets."""
        seen = self._seen.get(connection_id)
        if seen is None or seen[0] != self._marker():
            return None
        record = seen[1]
        return record if record.state.status is ConnectionStatus.ACTIVE else None

    async def get(self, connection_id: str) -> ConnectionRecord:
        marker = self._marker()  # before the read: a change during it shows next
        seen = self._seen.get(connection_id)
        if seen is None or seen[0] != marker:
            try:
                record = await state_call(lambda: self.state.get(connection_id))
            except NotFound:
                self._seen.pop(connection_id, None)
                self._stopped(connection_id)
                raise PolicyDenied(self.denied) from None
            self.reads += 1
            if len(self._seen) >= self.size:
                self._seen.clear()
            seen = self._seen[connection_id] = (marker, record)
        record = seen[1]
        status = record.state.status
        if status is not ConnectionStatus.ACTIVE:
            self._stopped(connection_id)
            if status is ConnectionStatus.NEEDS_REAUTH:
                raise NeedsReauth(f"connection {connection_id!r} needs re-authorisation")
            raise NeedsReauth(f"connection {connection_id!r} is disabled")
        return record

    def _stopped(self, connection_id: str) -> None:
        if self.on_stop is not None:
            self.on_stop(connection_id)
