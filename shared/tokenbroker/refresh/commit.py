"""The refresh commit across separate stores: promote the staged versions, then write the
states (fenced) with their events.

The order matters, and is what keeps a crash harmless: a staged version holds an answer that
is already durable; promoting it first means a state is never committed pointing at a version
that is not current. A crash between the two leaves the version current and the state behind;
the next holder finds the intent the refresh recorded and a newer current version, and catches
the state up without presenting anything (:mod:`.tick`). On the embedded store both happen in
one transaction instead (``adapters.embedded.EmbeddedRefreshCommitter``).
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenbroker.kernel.errors import TokenBrokerError
from tokenbroker.ports import (
    CommitOutcome,
    Completion,
    Promotion,
    SecretStore,
    StateStore,
)

__all__ = ["StoreCommitter"]


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
