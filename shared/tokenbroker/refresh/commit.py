"""The refresh commit across separate stores: promote the staged versions, then write the
states (fenced) with their events.

The order matters, and is what keeps a crash harmless: a staged version holds an answer that
is already durable; promoting it first means a state is never committed pointing at a version
that is not current. A crash between the two leaves the version current and the state behind;
the next holder finds the intent the refresh recorded and a newer current version, and catches
the state up without presenting anything (:mod:`.tick`). On the embedded store both happen in
one transaction instead (``adapters.embedded.EmbeddedRefreshCommitter``).

Where the secret store keeps no pointer of its own -- Secret Manager's pointer protocol, the
pointer in the state record (``adapters.gcp.secret_manager_pointed``) -- the state commit *is*
the promotion: :class:`PointerCommitter` writes the states fenced by the lease and by a
compare-and-set of the pointer (``Completion.pointer_from``), then has the store retire what
the new versions drop. A crash between the two leaves old versions for a later sweep, never a
pointer at a version that is not there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol, runtime_checkable

from tokenbroker.kernel.errors import TokenBrokerError
from tokenbroker.ports import (
    CommitOutcome,
    Completion,
    Promotion,
    SecretStore,
    StateStore,
)

__all__ = ["PointerCommitter", "PointerSecretStore", "StoreCommitter", "committer_for"]


@runtime_checkable
class PointerSecretStore(SecretStore, Protocol):
    """A secret store whose current-version pointer is the state record's
    ``current_version`` (moved by the committer's fenced state write)."""

    def accepted_pointers(self, connection_id: str, version: int | None) -> frozenset[int | None]:
        """What the pointer may be now for a commit that makes ``version`` current."""
        ...

    def retire(self, promotions: Sequence[Promotion]) -> None:
        """Housekeeping after these versions became current (never fails the commit)."""
        ...

    def abandon(self, promotions: Sequence[Promotion]) -> None:
        """These staged versions lost: clear them away (never fails the commit)."""
        ...


def committer_for(secrets: SecretStore, state: StateStore) -> StoreCommitter | PointerCommitter:
    """The committer a pair of stores needs (the composition root passes the embedded one)."""
    if isinstance(secrets, PointerSecretStore):
        return PointerCommitter(secrets, state)
    return StoreCommitter(secrets, state)


class StoreCommitter:
    """:class:`~tokenbroker.ports.RefreshCommitter` over a secret store and a state store."""

    def __init__(self, secrets: SecretStore, state: StateStore) -> None:
        self.secrets = secrets
        self.state = state

    def commit(self, items: Sequence[tuple[Completion, Promotion | None]]) -> list[CommitOutcome]:
        promotions = [(index, p) for index, (_, p) in enumerate(items) if p is not None]
        promoted = self.secrets.promote([p for _, p in promotions]) if promotions else []
        # Not promoted -- a newer version won, or the staged record is refused: the state
        # is not written (it would point at a version that is not current).
        superseded = {
            index
            for (index, _), result in zip(promotions, promoted, strict=True)
            if isinstance(result, TokenBrokerError)
        }
        completing = [(i, c) for i, (c, _) in enumerate(items) if i not in superseded]
        accepted = self.state.complete([c for _, c in completing]) if completing else []
        outcomes = [CommitOutcome.SUPERSEDED] * len(items)
        for (index, _), ok in zip(completing, accepted, strict=True):
            outcomes[index] = CommitOutcome.COMMITTED if ok else CommitOutcome.LEASE_LOST
        for index in sorted(superseded):
            self.state.release(items[index][0].lease)
        return outcomes


class PointerCommitter:
    """:class:`~tokenbroker.ports.RefreshCommitter` for a :class:`PointerSecretStore`: one
    fenced state commit per batch moves the pointers (no promotion call), then retirement."""

    def __init__(self, secrets: PointerSecretStore, state: StateStore) -> None:
        self.secrets = secrets
        self.state = state

    def commit(self, items: Sequence[tuple[Completion, Promotion | None]]) -> list[CommitOutcome]:
        completions = []
        for completion, promotion in items:
            cid = completion.lease.connection_id
            target = (
                promotion.version if promotion is not None else completion.state.current_version
            )
            accepted = self.secrets.accepted_pointers(cid, target)
            completions.append(replace(completion, pointer_from=accepted))
        done = self.state.complete(completions) if completions else []
        won, lost = [], []
        for (completion, promotion), ok in zip(items, done, strict=True):
            if ok:
                # Retire for every version now pointed at, a staged one it committed too.
                version = completion.state.current_version
                if version is not None:
                    cid = completion.lease.connection_id
                    won.append(promotion or Promotion(cid, version, None))
            elif promotion is not None:
                lost.append(promotion)
        if won:
            self.secrets.retire(won)
        if lost:
            self.secrets.abandon(lost)
        return [CommitOutcome.COMMITTED if ok else CommitOutcome.LEASE_LOST for ok in done]
