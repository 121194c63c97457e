"""What every SecretStore adapter shares, written once: a template method.

The port's rules (:class:`tokenbroker.ports.SecretStore`) are the same on every backend: a
write is a compare-and-set on the current version; versions count up; the newest
``retained_versions`` are kept; ``put_many`` is independent compare-and-set writes, one result
each; ``get_many`` leaves absent connections out and returns a record that does not verify or
decode as that connection's :class:`CorruptCredential` (one bad record never fails the batch);
a missing credential is one ``NotFound``; ``stage`` adds a *pending* version (durable, not yet
current) that ``promote`` makes current by compare-and-set on its parent, and that every read
settles (promotes) when its parent is still current, so a staged answer outlives its writer;
``put`` is a stage and a promotion.
:class:`VersionedSecretStore` owns those rules and each adapter implements only its raw I/O,
as aws-powertools does for its storage (``utilities/parameters/base.py``: ``BaseProvider``
owns caching and transforms, a provider implements ``_get``/``_get_multiple``;
``idempotency/persistence/base.py``: ``BasePersistenceLayer`` owns the record rules, a layer
implements ``_get_record``/``_put_record``/``_update_record``/``_delete_record``).

Two shapes of commit, because the backends really differ there:

* :class:`TransactionalSecretStore` (memory, embedded): the backend offers a local transaction
  (a lock; SQLite's ``BEGIN IMMEDIATE``). The base reads the current version, decides the
  compare-and-set, numbers the new version, writes it and destroys what retention drops, all
  inside one transaction; a subclass supplies the transaction and four primitives.
* Remote stores (Secret Manager, AWS Secrets Manager) implement :meth:`_stage` and
  :meth:`_promote` themselves: Secret Manager numbers versions itself (adding one is the
  stage) and promotes with an etag compare-and-set on the secret's annotations; AWS stages
  with ``AWSPENDING`` and promotes by moving staging labels, each move a compare-and-set, and
  its VersionId is the number. Forcing either into the transactional shape would hide the
  steps that make them crash-safe. They still take every decision from the rules here
  (:meth:`_check_expected`, :meth:`_conflict`, :meth:`_retention_floor`,
  :meth:`_is_retained`) and inherit ``get``, ``get_many`` and ``put_many``, which run their
  per-connection work through :meth:`_map` (a thread pool there).

Hooks, by who must implement them:

==========================  ==============================================================
every store                 ``_read_current`` (settling), ``versions``, ``delete``
remote stores               ``_stage``, ``_promote`` (``_commit``: both, or its own)
optional                    ``_read_current_many`` (a batch read), ``_map`` (concurrency)
transactional stores        ``_transaction``, ``_current_version``, ``_add_version``,
                            ``_destroy_through``; pending versions: ``_add_pending``,
                            ``_pending``, ``_pending_credential``, ``_drop_pending``,
                            ``_with_pending`` (the base has ``_stage``/``_promote``/``_commit``
                            and the settling)
==========================  ==============================================================
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Generic, TypeVar

from tokenbroker.kernel.errors import (
    ConfigError,
    CorruptCredential,
    NotFound,
    TokenBrokerError,
    VersionConflict,
)
from tokenbroker.kernel.model import Credential, StoredCredential
from tokenbroker.ports import Promotion, RequestQuota, SecretWrite, WriteBudget

__all__ = [
    "DEFAULT_RETAINED_VERSIONS",
    "ReadResult",
    "TransactionalSecretStore",
    "VersionedSecretStore",
]

T = TypeVar("T")
R = TypeVar("R")
Tx = TypeVar("Tx")
W = TypeVar("W", SecretWrite, Promotion)

#: The current version and the two before it, so a credential a consumer read survives two
#: more rotations.
DEFAULT_RETAINED_VERSIONS = 3

#: One write's outcome in ``put_many``: the new version, or the conflict it met.
WriteResult = int | VersionConflict
#: One item's outcome in ``stage``/``promote``: the version, or the error that is that
#: connection's own (a conflict, a corrupt or refused record).
ItemResult = int | TokenBrokerError
#: One connection's current version as ``get_many`` returns it.
ReadResult = StoredCredential | CorruptCredential

#: What decoding a damaged record raises (bad JSON, missing fields, wrong types): the record
#: is corrupt. Anything else -- a store that cannot answer, a bug -- is not the record's fault.
_DECODE_ERRORS = (ValueError, KeyError, TypeError)


class VersionedSecretStore(ABC):
    """The SecretStore port's rules; subclasses implement the I/O (see the module docstring)."""

    def __init__(self, retained_versions: int = DEFAULT_RETAINED_VERSIONS) -> None:
        if retained_versions < 1:
            raise ConfigError(f"retained_versions must be at least 1, got {retained_versions}")
        self.retained_versions = retained_versions

    # -- the rules -----------------------------------------------------------------------------

    @staticmethod
    def _missing(connection_id: str) -> NotFound:
        return NotFound(f"no credential for connection {connection_id!r}")

    @staticmethod
    def _conflict(connection_id: str, current: int | None, expected: int | None) -> VersionConflict:
        """The refusal of a write that expected ``expected`` where ``current`` is."""
        if current is None:
            return VersionConflict(
                f"connection {connection_id!r}: no credential, expected v{expected}"
            )
        if expected is None:
            return VersionConflict(
                f"connection {connection_id!r} already has a credential (v{current})"
            )
        return VersionConflict(
            f"connection {connection_id!r}: current version is {current}, expected {expected}"
        )

    def _check_expected(
        self, connection_id: str, current: int | None, expected: int | None
    ) -> None:
        """The compare-and-set decision: a write goes ahead only on the version it expects."""
        if current != expected:
            raise self._conflict(connection_id, current, expected)

    def _retention_floor(self, newest: int) -> int:
        """Once ``newest`` is current, versions at or below this number are destroyed."""
        return newest - self.retained_versions

    def _is_retained(self, version: int, newest: int) -> bool:
        """Whether ``version`` is among the newest ``retained_versions`` up to ``newest``."""
        return self._retention_floor(newest) < version <= newest

    # -- the port ------------------------------------------------------------------------------

    def get(self, connection_id: str) -> StoredCredential:
        value = self._read_value(connection_id, lambda: self._read_current(connection_id))
        if value is None:
            raise self._missing(connection_id) from None
        if isinstance(value, CorruptCredential):
            raise value from None
        return value

    def get_many(
        self,
        connection_ids: Sequence[str],
        *,
        pointers: Mapping[str, int | None] | None = None,  # noqa: ARG002 - the pointer is ours
    ) -> dict[str, ReadResult]:
        return self._read_current_many(list(dict.fromkeys(connection_ids)))

    @staticmethod
    def _read_value(connection_id: str, read: Callable[[], StoredCredential]) -> ReadResult | None:
        """One connection's read with its failure as a value, the rule ``get_many`` keeps on
        every store: ``None`` when absent, a :class:`CorruptCredential` when the record does
        not verify or decode. A store that cannot answer still raises: that is not one
        record's fault, and the whole read is retried."""
        try:
            return read()
        except NotFound:
            return None
        except CorruptCredential as corrupt:
            return corrupt
        except _DECODE_ERRORS as exc:
            return CorruptCredential(
                f"connection {connection_id!r}: the stored credential does not decode"
                f" ({type(exc).__name__})"
            )

    def put(
        self, connection_id: str, credential: Credential, *, expected_version: int | None
    ) -> int:
        return self._commit(SecretWrite(connection_id, credential, expected_version))

    def put_many(self, writes: Sequence[SecretWrite]) -> list[WriteResult]:
        """Writes to different connections may run at once (:meth:`_map`); writes to the same
        connection run in the order given, since a later one may expect the version an earlier
        one made. A conflict is that write's result and stops no other write."""
        return self._each(writes, self._commit)  # type: ignore[return-value]  # no containment

    def stage(self, writes: Sequence[SecretWrite]) -> list[ItemResult]:
        """Pending versions, one compare-and-set each (as ``put_many`` runs its writes)."""
        return self._each(writes, self._stage, contain=True)

    def promote(self, promotions: Sequence[Promotion]) -> list[ItemResult]:
        """Staged versions made current, one compare-and-set each."""
        return self._each(promotions, self._promote, contain=True)

    def _each(
        self, items: Sequence[W], one: Callable[[W], int], *, contain: bool = False
    ) -> list[ItemResult]:
        """``one`` over ``items``: different connections through :meth:`_map`, one connection's
        items in the order given; a conflict is that item's result and stops nothing else.
        ``contain``: so is any error that is that connection's own (not retryable: a corrupt
        record, a refused version), as the port's ``stage``/``promote`` promise."""
        by_connection: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            by_connection.setdefault(item.connection_id, []).append(index)
        results: list[ItemResult] = [0] * len(items)

        def run(indices: list[int]) -> None:
            for index in indices:
                try:
                    results[index] = one(items[index])
                except VersionConflict as conflict:
                    results[index] = conflict
                except TokenBrokerError as error:
                    if not contain or error.retryable:
                        raise
                    results[index] = error

        self._map(run, list(by_connection.values()))
        return results

    def write_budget(self, connection_id: str) -> WriteBudget | None:  # noqa: ARG002
        """No limit on versions but the store's rate quotas (the port's default)."""
        return None

    def request_quota(self) -> RequestQuota | None:
        """No request-rate quota to pace by (the port's default)."""
        return None

    @abstractmethod
    def versions(self, connection_id: str) -> list[int]:
        """Readable versions, oldest first; empty when the connection has none."""

    @abstractmethod
    def delete(self, connection_id: str) -> None:
        """Destroy every version; NotFound when there is none."""

    # -- hooks ---------------------------------------------------------------------------------

    @abstractmethod
    def _read_current(self, connection_id: str) -> StoredCredential:
        """The current version as stored. Raises NotFound (any message: ``get`` words it)."""

    def _commit(self, write: SecretWrite) -> int:
        """Add a version if the current one is ``write.expected_version``; the new number.
        Raises VersionConflict otherwise (decided with :meth:`_check_expected`). A stage and
        its promotion; a backend with a shorter way overrides it."""
        version = self._stage(write)
        return self._promote(Promotion(write.connection_id, version, write.expected_version))

    @abstractmethod
    def _stage(self, write: SecretWrite) -> int:
        """Add a pending version on top of ``write.expected_version`` (compare-and-set); its
        number. Idempotent for the same ``write.attempt``."""

    @abstractmethod
    def _promote(self, promotion: Promotion) -> int:
        """Make the pending version current if its parent still is; idempotent when it
        already is. Raises VersionConflict otherwise."""

    def _read_current_many(self, connection_ids: list[str]) -> dict[str, ReadResult]:
        """Current versions of distinct ids, absent ones left out, bad ones as values (see
        :meth:`_read_value`): one :meth:`_read_current` each, through :meth:`_map`. Override
        with a batch read where the backend has one, keeping the same rule."""

        def one(connection_id: str) -> ReadResult | None:
            return self._read_value(connection_id, lambda: self._read_current(connection_id))

        found = self._map(one, connection_ids)
        return {
            cid: stored
            for cid, stored in zip(connection_ids, found, strict=True)
            if stored is not None
        }

    def _map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``fn`` over ``items``, results in order; the first exception propagates. One after
        another here; remote stores override it with a thread pool."""
        return [fn(item) for item in items]


class TransactionalSecretStore(VersionedSecretStore, Generic[Tx]):
    """A store whose backend gives a local transaction ``Tx``: the whole compare-and-set,
    numbering and retention run inside it, here, so the primitives stay plain I/O."""

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Tx]:
        """Serialise against every other writer of the same storage (other handles, other
        processes); commit on a normal exit, roll back on an exception."""

    @abstractmethod
    def _current_version(self, tx: Tx, connection_id: str) -> int | None:
        """The current version's number, ``None`` when the connection has no credential."""

    @abstractmethod
    def _add_version(
        self, tx: Tx, connection_id: str, version: int, credential: Credential
    ) -> None:
        """Store ``credential`` as ``version`` and make it the current one."""

    @abstractmethod
    def _destroy_through(self, tx: Tx, connection_id: str, floor: int) -> None:
        """Destroy the connection's versions numbered ``floor`` or lower."""

    @abstractmethod
    def _add_pending(self, tx: Tx, write: SecretWrite, version: int, parent: int | None) -> None:
        """Keep ``write.credential`` as pending ``version`` of ``write.attempt``, staged on
        ``parent``."""

    @abstractmethod
    def _pending(self, tx: Tx, connection_id: str) -> list[tuple[int, int | None, str | None]]:
        """The connection's pending versions as (version, parent, attempt), oldest first."""

    @abstractmethod
    def _pending_credential(self, tx: Tx, connection_id: str, version: int) -> Credential:
        """The credential of a pending version (CorruptCredential when it does not verify)."""

    @abstractmethod
    def _drop_pending(self, tx: Tx, connection_id: str, version: int) -> None:
        """Forget one pending version."""

    @abstractmethod
    def _with_pending(self, connection_ids: list[str]) -> list[str]:
        """Which of these connections have pending versions (a read outside any transaction:
        the cheap check before settling)."""

    # -- pending versions ------------------------------------------------------------------

    def _settle_in(self, tx: Tx, connection_id: str) -> int | None:
        """Promote the oldest pending version staged on the current one, forget those staged
        on anything else (their parent is gone: someone else's version won); the current
        version after it."""
        current = self._current_version(tx, connection_id)
        for version, parent, _ in self._pending(tx, connection_id):
            if parent == current:
                credential = self._pending_credential(tx, connection_id, version)
                self._drop_pending(tx, connection_id, version)
                self._add_version(tx, connection_id, version, credential)
                self._destroy_through(tx, connection_id, self._retention_floor(version))
                current = version
            else:
                self._drop_pending(tx, connection_id, version)
        return current

    def _settle(self, connection_ids: list[str]) -> None:
        """Settle the pending versions of these connections, if any (one transaction)."""
        waiting = self._with_pending(connection_ids)
        if waiting:
            with self._transaction() as tx:
                for connection_id in waiting:
                    self._settle_in(tx, connection_id)

    def get(self, connection_id: str) -> StoredCredential:
        self._settle([connection_id])
        return super().get(connection_id)

    def get_many(
        self,
        connection_ids: Sequence[str],
        *,
        pointers: Mapping[str, int | None] | None = None,
    ) -> dict[str, ReadResult]:
        self._settle(list(dict.fromkeys(connection_ids)))
        return super().get_many(connection_ids, pointers=pointers)

    def _stage_in(self, tx: Tx, write: SecretWrite) -> int:
        cid = write.connection_id
        for version, parent, attempt in self._pending(tx, cid):
            if write.attempt is not None and (attempt, parent) == (
                write.attempt,
                write.expected_version,
            ):
                return version  # the same answer staged again (a retried call)
        current = self._settle_in(tx, cid)
        self._check_expected(cid, current, write.expected_version)
        version = (current or 0) + 1
        self._add_pending(tx, write, version, current)
        return version

    def _promote_in(self, tx: Tx, promotion: Promotion) -> int:
        cid = promotion.connection_id
        current = self._current_version(tx, cid)
        if current == promotion.version:
            return current  # settled by a reader meanwhile, or promoted before
        staged = {version: parent for version, parent, _ in self._pending(tx, cid)}
        parent = staged.get(promotion.version, -1)
        if parent != current or promotion.parent != current:
            raise self._conflict(cid, current, promotion.parent)
        credential = self._pending_credential(tx, cid, promotion.version)
        self._drop_pending(tx, cid, promotion.version)
        self._add_version(tx, cid, promotion.version, credential)
        self._destroy_through(tx, cid, self._retention_floor(promotion.version))
        return promotion.version

    def _stage(self, write: SecretWrite) -> int:
        with self._transaction() as tx:
            return self._stage_in(tx, write)

    def _promote(self, promotion: Promotion) -> int:
        with self._transaction() as tx:
            return self._promote_in(tx, promotion)

    def stage(self, writes: Sequence[SecretWrite]) -> list[ItemResult]:
        """All stages in one transaction (one commit, one fsync for SQLite), in order."""
        return self._all_in_one(writes, self._stage_in)

    def promote(self, promotions: Sequence[Promotion]) -> list[ItemResult]:
        """All promotions in one transaction, in order."""
        return self._all_in_one(promotions, self._promote_in)

    def _all_in_one(self, items: Sequence[W], one: Callable[[Tx, W], int]) -> list[ItemResult]:
        results: list[ItemResult] = []
        if not items:
            return results
        with self._transaction() as tx:
            for item in items:
                try:
                    results.append(one(tx, item))
                except VersionConflict as conflict:
                    results.append(conflict)
                except CorruptCredential as corrupt:  # one bad staged record: its own result
                    results.append(corrupt)
        return results

    def _commit_in(self, tx: Tx, write: SecretWrite) -> int:
        current = self._settle_in(tx, write.connection_id)
        self._check_expected(write.connection_id, current, write.expected_version)
        version = (current or 0) + 1
        self._add_version(tx, write.connection_id, version, write.credential)
        self._destroy_through(tx, write.connection_id, self._retention_floor(version))
        return version

    def _commit(self, write: SecretWrite) -> int:
        with self._transaction() as tx:
            return self._commit_in(tx, write)

    def put_many(self, writes: Sequence[SecretWrite]) -> list[WriteResult]:
        """All writes in one transaction (one commit, one fsync for SQLite), in the order
        given; each is still its own compare-and-set."""
        results: list[WriteResult] = []
        with self._transaction() as tx:
            for write in writes:
                try:
                    results.append(self._commit_in(tx, write))
                except VersionConflict as conflict:
                    results.append(conflict)
        return results
