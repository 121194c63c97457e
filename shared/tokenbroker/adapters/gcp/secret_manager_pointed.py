"""Secret Manager for the versions, the state store for which one is current: the fewest calls.

Issue 13 measured the annotation protocol (:mod:`.secret_manager`) at one ``GetSecret``, one
access and three or four writes per refresh -- 150 refreshes a minute at a project's default
quotas (600 reads and 600 writes a minute, https://cloud.google.com/secret-manager/quotas).
Here the pointer lives where the refresher reads and writes anyway: the connection's state
record (``RefreshState.current_version``, through :class:`~tokenbroker.ports.VersionPointers`).
A refresh then costs **one AccessSecretVersion, no read request, and two writes**
(``AddSecretVersion`` and one ``DestroySecretVersion``): 300 refreshes a minute.

The protocol (docs/gcp.md, "The pointer protocol"):

* **Versions.** One per credential, its CRC32C checked on write by the service and on every
  read by us. The payload is the credential JSON plus a ``tokenbroker_staged`` member that
  credential readers ignore: ``parent`` (the version it was staged on), ``attempt``, ``kept``
  (the older versions retention keeps with it, newest first), ``retire`` (the versions its
  promotion destroys) and ``sweep`` (its promotion also lists and destroys leftovers).
* **Current.** The pointer's version -- or, when the newest version (``latest``) descends
  from it through its parents, that newest one: an answer staged by a writer that died before
  the pointer moved is current for every reader at once (issue 8's rule: a staged answer
  outlives its writer), and readers never write anything.
* **Read.** ``AccessSecretVersion`` of ``latest``: it is the pointer's version, or staged on
  it, in steady state; the chain is followed down only after a crash (an access per link),
  and the versions between are listed only when ``latest`` is a loser's leftover.
* **Stage.** ``AddSecretVersion`` on the current version this handle last read (else it
  reads it first); its ``kept`` and ``retire`` come from that version's ``kept``, so nothing
  needs listing or reading to retire.
* **Promote.** A compare-and-set of the pointer, accepted while it is still any version of
  the chain the stage was built on (the parent, or the pointer that parent descends from).
  The refresher does it inside its fenced state commit (``Completion.pointer_from``,
  :class:`~tokenbroker.refresh.commit.PointerCommitter`: no extra write); every other writer
  through ``move_pointer``. Then the ``retire`` versions are destroyed -- in steady state the
  one retention drops (``retained_versions`` back), whose access token, with the default three
  versions kept, expired a rotation ago. Nothing is disabled: an expired token in a readable
  old version helps nobody, and disabling cost a write.
* **Losers.** A promotion refused (an operator's write won) destroys its own version unless
  the winner descends from it; a crash leaves it to the ``sweep`` of the next promotion that
  sees a gap in the numbers.

Why it is safe: a rotated refresh token is only ever in a version staged on the then-current
one; that version is current for every reader until someone builds on it (their chain then
contains it) or a compare-and-set of the pointer proves another writer won first, which is
the rule the annotation protocol's etag enforced. Retention and the overlap are as before: the
current version and the ``retained_versions - 1`` before it stay readable.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tokenbroker.adapters.gcp.secret_manager import (
    STAGED,
    SecretManagerSecretStore,
    _crc32c,
)
from tokenbroker.adapters.secret_store import ReadResult
from tokenbroker.kernel.errors import (
    AlreadyExists,
    NotFound,
    StoreUnavailable,
    TokenBrokerError,
    VersionConflict,
)
from tokenbroker.kernel.model import Credential, StoredCredential
from tokenbroker.ports import Promotion, RequestQuota, SecretWrite, VersionPointers

__all__ = ["PointedSecretManagerStore"]

#: What one refresh costs here (the module docstring): no read request (the access counts
#: against its own quota, 90,000 a minute), AddSecretVersion and one DestroySecretVersion.
READS_PER_REFRESH = 0
WRITES_PER_REFRESH = 2
#: Links of a chain of staged versions followed down from ``latest`` (each an access); longer
#: chains need that many crashes in a row and are searched by listing instead.
CHAIN_LIMIT = 8
#: Versions above the pointer tried, newest first, when ``latest`` does not descend from it.
SEARCH_LIMIT = 16


@dataclass(frozen=True)
class _Version:
    """One version as read, with what its payload says it was staged on."""

    stored: StoredCredential
    #: The version it was staged on (``None``: a first version); meaningless if not recorded.
    parent: int | None
    #: The older versions kept with it, newest first.
    kept: tuple[int, ...]
    #: Whether the payload carries the member at all (versions of the annotation protocol
    #: carry only ``parent``; older ones nothing).
    recorded: bool
    #: Whether ``kept`` is recorded (not for a version written by the annotation protocol).
    ledger: bool
    retire: tuple[int, ...] = ()
    sweep: bool = False

    @property
    def number(self) -> int:
        return self.stored.version


@dataclass(frozen=True)
class _Seen:
    """What this handle last read of a connection: the pointer, the current version (``None``:
    no credential) and the chain from it down to the pointer (what a compare-and-set of the
    pointer may accept on its behalf)."""

    pointer: int | None
    current: _Version | None
    chain: frozenset[int | None]

    @property
    def number(self) -> int | None:
        return None if self.current is None else self.current.number


def _payload(
    credential: Credential,
    *,
    parent: int | None,
    attempt: str | None,
    kept: tuple[int, ...],
    retire: tuple[int, ...],
    sweep: bool,
) -> bytes:
    body = json.loads(credential.to_plaintext())
    body[STAGED] = {
        "parent": parent,
        "attempt": attempt,
        "kept": list(kept),
        "retire": list(retire),
        "sweep": sweep,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _numbers(raw: Any) -> tuple[int, ...] | None:
    if not isinstance(raw, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in raw
    ):
        return None
    return tuple(raw)


def _version(connection_id: str, number: int, data: bytes) -> _Version:
    stored = StoredCredential(connection_id, number, Credential.from_plaintext(data))
    try:
        staged = json.loads(data).get(STAGED)
    except (ValueError, AttributeError):
        staged = None
    if not isinstance(staged, dict):
        return _Version(stored, None, (), recorded=False, ledger=False)
    parent = staged.get("parent")
    if parent is not None and (
        not isinstance(parent, int) or isinstance(parent, bool) or not 0 < parent < number
    ):
        return _Version(stored, None, (), recorded=False, ledger=False)
    kept = _numbers(staged.get("kept"))
    retire = _numbers(staged.get("retire")) or ()
    return _Version(
        stored,
        parent,
        kept or (),
        recorded=True,
        ledger=kept is not None,
        retire=retire,
        sweep=staged.get("sweep") is True,
    )


class PointedSecretManagerStore(SecretManagerSecretStore):
    """The SecretStore port on Secret Manager, the current-version pointer in ``pointers``
    (the state store: see the module docstring). The refresher commits through
    :class:`~tokenbroker.refresh.commit.PointerCommitter`, which moves the pointer inside the
    fenced state commit and then calls :meth:`retire`."""

    def __init__(self, client: Any = None, *, pointers: VersionPointers, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self.pointers = pointers
        self._seen: dict[str, _Seen] = {}
        #: Versions this handle staged, with the chain they were built on.
        self._built: dict[tuple[str, int], tuple[_Version, frozenset[int | None]]] = {}

    def request_quota(self) -> RequestQuota:
        return RequestQuota(
            key=f"secret-manager-requests:projects/{self.project}",
            reads_per_window=self.reads_per_minute,
            writes_per_window=self.writes_per_minute,
            reads_per_refresh=READS_PER_REFRESH,
            writes_per_refresh=WRITES_PER_REFRESH,
        )

    # -- what this handle knows ------------------------------------------------------------

    def _note(self, connection_id: str, seen: _Seen) -> _Seen:
        if len(self._seen) >= self._known_limit:
            self._seen.pop(next(iter(self._seen)), None)
        self._seen[connection_id] = seen
        return seen

    def _forget_built(self, key: tuple[str, int]) -> tuple[_Version, frozenset[int | None]] | None:
        return self._built.pop(key, None)

    # -- reads -------------------------------------------------------------------------------

    def _open(self, connection_id: str, version: int | str) -> _Version:
        number, data = self._access_data(connection_id, version)
        return _version(connection_id, number, data)

    def _descends(
        self, connection_id: str, top: _Version, pointer: int | None
    ) -> frozenset[int | None] | None:
        """The chain from ``top`` down to ``pointer`` through recorded parents, or ``None``
        when it does not reach it. With no pointer, only a staged first version qualifies
        (older versions are a removed registration's leftovers)."""
        if top.number == pointer:
            return frozenset({pointer})
        if pointer is None:
            return frozenset({top.number, None}) if top.recorded and top.parent is None else None
        links: list[int | None] = [top.number]
        node = top
        for _ in range(CHAIN_LIMIT):
            if not node.recorded or node.parent is None or node.parent < pointer:
                return None
            if node.parent == pointer:
                return frozenset([*links, pointer])
            try:
                node = self._open(connection_id, node.parent)
            except NotFound:
                return None
            links.append(node.number)
        return None

    def _resolve(self, connection_id: str, pointer: int | None) -> _Seen:
        """The current version for this pointer (the module docstring's rule)."""
        try:
            latest: _Version | None = self._open(connection_id, "latest")
        except NotFound:  # no version, or the newest is not readable: look below it
            latest = None
        if latest is not None:
            chain = self._descends(connection_id, latest, pointer)
            if chain is not None:
                return self._note(connection_id, _Seen(pointer, latest, chain))
        if pointer is not None and (latest is None or latest.number > pointer):
            found = self._search(connection_id, pointer, None if latest is None else latest.number)
            if found is not None:
                return self._note(connection_id, found)
        if pointer is None:
            return self._note(connection_id, _Seen(None, None, frozenset({None})))
        current = self._open(connection_id, pointer)  # NotFound: the pointer's version is gone
        return self._note(connection_id, _Seen(pointer, current, frozenset({pointer})))

    def _search(self, connection_id: str, pointer: int, below: int | None) -> _Seen | None:
        """After a crash and a loser's leftover on top: the newest version between the pointer
        and ``below`` that descends from the pointer (one list call, then accesses)."""
        try:
            pages = self._call(
                "list secret versions",
                self.client.list_secret_versions,
                parent=self.secret_name(connection_id),
                filter="state:ENABLED",
            )
            numbers = sorted((int(v.name.rsplit("/", 1)[1]) for v in pages), reverse=True)
        except NotFound:
            return None
        for number in [n for n in numbers if n > pointer and (below is None or n < below)][
            :SEARCH_LIMIT
        ]:
            try:
                candidate = self._open(connection_id, number)
            except NotFound:
                continue
            chain = self._descends(connection_id, candidate, pointer)
            if chain is not None:
                return _Seen(pointer, candidate, chain)
        return None

    def _learn(self, connection_id: str) -> _Seen:
        """The pointer from the state store, then the current version for it."""
        pointers = self.pointers.current_versions([connection_id])
        return self._resolve(connection_id, pointers.get(connection_id))

    def _read_current(self, connection_id: str) -> StoredCredential:
        seen = self._learn(connection_id)
        if seen.current is None:
            raise self._missing(connection_id)
        return seen.current.stored

    def get_many(
        self,
        connection_ids: Sequence[str],
        *,
        pointers: Mapping[str, int | None] | None = None,
    ) -> dict[str, ReadResult]:
        """The pointers given (the caller read them with the state moments ago) or, for the
        others, one batched read of the state store; then one access each, in parallel."""
        ids = list(dict.fromkeys(connection_ids))
        known = {cid: pointers[cid] for cid in ids if pointers is not None and cid in pointers}
        unknown = [cid for cid in ids if cid not in known]
        if unknown:
            known.update(self.pointers.current_versions(unknown))

        def one(connection_id: str) -> ReadResult | None:
            if connection_id not in known:
                return None  # no record: no credential

            def read() -> StoredCredential:
                seen = self._resolve(connection_id, known[connection_id])
                if seen.current is None:
                    raise self._missing(connection_id)
                return seen.current.stored

            return self._read_value(connection_id, read)

        found = self._map(one, ids)
        return {cid: value for cid, value in zip(ids, found, strict=True) if value is not None}

    def versions(self, connection_id: str) -> builtins.list[int]:
        """The current version and those kept with it (no list call)."""
        try:
            seen = self._learn(connection_id)
        except NotFound:
            return []
        if seen.current is None:
            return []
        return sorted({seen.current.number, *seen.current.kept})

    # -- writes ------------------------------------------------------------------------------

    def _stage(self, write: SecretWrite) -> int:
        cid, expected = write.connection_id, write.expected_version
        if expected is None:
            chain: frozenset[int | None] = frozenset({None})
            kept: tuple[int, ...] = ()
            retire: tuple[int, ...] = ()
            sweep = False
            try:
                self._create_secret(cid)
            except AlreadyExists:
                # A first version only goes into a new secret: one already there belongs to
                # no record (a crashed registration, an older broker), and the registry
                # destroys it on this conflict.
                raise VersionConflict(
                    f"connection {cid!r} already has a secret (a first version was expected)"
                ) from None
        else:
            seen = self._seen.get(cid)
            if seen is None or seen.number != expected:
                seen = self._learn(cid)
            self._check_expected(cid, seen.number, expected)
            assert seen.current is not None  # noqa: S101 - checked: it is ``expected``
            keep = self.retained_versions - 1
            older = (expected, *seen.current.kept)
            kept, retire = older[:keep], older[keep:]
            # Leftovers to list and destroy: versions before the ledger existed, or a
            # parent that was itself never pointed at (its own retirement never ran).
            sweep = not seen.current.ledger or len(seen.chain) > 2
            chain = seen.chain
        data = _payload(
            write.credential,
            parent=expected,
            attempt=write.attempt,
            kept=kept,
            retire=retire,
            sweep=sweep,
        )
        try:
            added = self._call(
                "add secret version",
                self.client.add_secret_version,
                parent=self.secret_name(cid),
                payload={"data": data, "data_crc32c": _crc32c(data)},
            )
        except NotFound:  # the secret was deleted meanwhile
            raise self._conflict(cid, None, expected) from None
        number = int(added.name.rsplit("/", 1)[1])
        staged = _version(cid, number, data)
        if len(self._built) >= self._known_limit:
            self._built.pop(next(iter(self._built)), None)
        self._built[(cid, number)] = (staged, chain)
        return number

    def accepted_pointers(self, connection_id: str, version: int | None) -> frozenset[int | None]:
        """What the pointer may be for a commit that makes ``version`` current (a version
        this handle staged, or the current one it read): the chain it was built on."""
        if version is not None:
            built = self._built.get((connection_id, version))
            if built is not None:
                return built[1] | {version}
        seen = self._seen.get(connection_id)
        if seen is None or version not in seen.chain:
            seen = self._learn(connection_id)
        if version not in seen.chain:
            return frozenset({version})
        return seen.chain

    def _promote(self, promotion: Promotion) -> int:
        """Move the pointer by compare-and-set, then :meth:`retire`."""
        cid, version = promotion.connection_id, promotion.version
        built = self._built.get((cid, version))
        if built is None:  # staged by another handle: read what it is
            seen = self._learn(cid)
            if seen.pointer == version:
                return version  # promoted before
            if seen.current is None or seen.number != version:
                raise self._conflict(cid, seen.number, promotion.parent)
            staged, accepted = seen.current, seen.chain
        else:
            staged, accepted = built[0], built[1] | {version}
        if staged.parent != promotion.parent:
            raise self._conflict(cid, staged.parent, promotion.parent)
        if not self.pointers.move_pointer(cid, accepted=accepted, version=version):
            self._lost(cid, version)
            raise self._conflict(cid, None, promotion.parent)
        self._committed(cid, staged)
        return version

    def retire(self, promotions: Sequence[Promotion]) -> None:
        """After the state store made these versions current (the refresher's commit): the
        housekeeping of :meth:`_promote`, in parallel."""

        def one(promotion: Promotion) -> None:
            cid = promotion.connection_id
            built = self._built.get((cid, promotion.version))
            if built is not None:
                self._committed(cid, built[0])
                return
            seen = self._seen.get(cid)
            if (
                seen is not None
                and seen.current is not None
                and seen.number == promotion.version
                and seen.pointer != promotion.version
            ):
                self._committed(cid, seen.current)  # a staged answer found, now pointed at

        self._map(one, list(promotions))

    def abandon(self, promotions: Sequence[Promotion]) -> None:
        """These staged versions lost (the state commit refused them): destroyed unless the
        winner descends from them."""
        self._map(lambda p: self._lost(p.connection_id, p.version), list(promotions))

    def _committed(self, connection_id: str, staged: _Version) -> None:
        self._forget_built((connection_id, staged.number))
        self._note(connection_id, _Seen(staged.number, staged, frozenset({staged.number})))
        name = self.secret_name(connection_id)
        failed = False
        for old in staged.retire:
            failed |= not self._destroy(f"{name}/versions/{old}")
        gap = staged.parent is not None and staged.number != staged.parent + 1
        if staged.sweep or gap or failed:
            self._sweep_below(connection_id, staged)

    def _destroy(self, name: str) -> bool:
        try:
            self._call("destroy secret version", self.client.destroy_secret_version, name=name)
        except (NotFound, VersionConflict):
            return True  # gone already
        except StoreUnavailable:
            return False
        return True

    def _sweep_below(self, connection_id: str, staged: _Version) -> None:
        """Destroy every version older than ``staged`` that it does not keep: losers' leftovers
        and what failed destroys left (one list call; rare)."""
        try:
            pages = self._call(
                "list secret versions",
                self.client.list_secret_versions,
                parent=self.secret_name(connection_id),
                filter="NOT state:DESTROYED",
            )
            left = [int(v.name.rsplit("/", 1)[1]) for v in pages]
        except (NotFound, VersionConflict, StoreUnavailable):
            return
        keep = {staged.number, *staged.kept}
        name = self.secret_name(connection_id)
        for old in sorted(left):
            if old < staged.number and old not in keep:
                self._destroy(f"{name}/versions/{old}")

    def _lost(self, connection_id: str, version: int) -> None:
        """A promotion refused: destroy the version unless the current one descends from it
        (someone built on it; it is kept with theirs)."""
        self._forget_built((connection_id, version))
        try:
            seen = self._learn(connection_id)
        except TokenBrokerError:
            return  # cannot tell: a later sweep destroys it
        if seen.current is not None and (
            version in seen.chain or version in seen.current.kept or seen.number == version
        ):
            return
        self._destroy(f"{self.secret_name(connection_id)}/versions/{version}")

    def delete(self, connection_id: str) -> None:
        self._seen.pop(connection_id, None)
        super().delete(connection_id)
        # A removed connection's record goes first (the registry); a lone pointer (a store
        # tried on its own) is cleared so the id can start again at a first version.
        self.pointers.move_pointer(connection_id, accepted=None, version=None)
