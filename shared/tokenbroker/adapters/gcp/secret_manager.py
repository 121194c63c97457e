"""Credentials in Google Secret Manager: one secret per connection, one version per refresh.

Layout (documented in docs/gcp.md):

* secret ``projects/P/secrets/{prefix}{connection_id}``, labels ``managed-by=tokenbroker`` and
  ``connection={connection_id}``;
* each successful refresh adds a version whose payload is the credential (JSON) with its CRC32C
  in ``data_crc32c``, which Secret Manager verifies on write and we verify on every read
  (https://cloud.google.com/secret-manager/docs/reference/rpc/google.cloud.secretmanager.v1#secretpayload);
* the secret's annotations say which version is current (``tokenbroker-current``) and when
  each tracked version's access token expires (``tokenbroker-expires-v{n}``).

"Current" is never ``latest``: ``latest`` is simply the most recently *created* version, which
an interrupted or losing writer may have added. The current version moves only by
``UpdateSecret`` with the etag read before the write, so concurrent writers cannot both win
(https://cloud.google.com/secret-manager/docs/reference/rpc/google.cloud.secretmanager.v1#updatesecretrequest);
a loser -- whose parent is no longer current -- destroys the version it added.

Pending versions, settled like AWS's staged labels: ``AddSecretVersion`` is the *stage* (the
payload then holds the answer durably: the credential JSON, plus a ``tokenbroker_staged``
member naming the version it was staged on and the attempt, which credential readers ignore)
and ``UpdateSecret`` the *promotion*. Every read asks for ``latest`` with the current pointer:
when ``latest`` is newer than the current version and was staged on it, the read promotes it
(the same etag compare-and-set) before answering. So a writer that dies -- or whose
``UpdateSecret`` fails, however often -- between the two calls loses nothing: the next reader
settles its version (issue 8: the orphan was ``latest``, and a second update failure destroyed
the only copy of the new refresh token). A staged version is never destroyed while its parent
is current.

Overlap: when version n is written, older versions stay ENABLED while their access token is
still valid at n's ``obtained_at`` (a consumer that read them keeps working), and are disabled
on the first write after their expiry. Versions older than ``retained_versions`` are destroyed.

API calls per refresh (read, then write): GetSecret + AccessSecretVersion (of ``latest``),
then AddSecretVersion (the stage) + UpdateSecret (the promotion), plus one
DisableSecretVersion and one DestroySecretVersion per rotation in steady state, and one
ListSecretVersions every ``SWEEP_EVERY`` versions (failed destroys retried). The write
reuses the etag the read saw (a stale one costs a re-read). Settling a version a dead writer
staged costs the reader one UpdateSecret.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, TypeVar

from tokenbroker.adapters.gcp.errors import translate
from tokenbroker.adapters.secret_store import DEFAULT_RETAINED_VERSIONS, VersionedSecretStore
from tokenbroker.kernel.clock import isoformat, parse_iso
from tokenbroker.kernel.errors import (
    AlreadyExists,
    CorruptCredential,
    NotFound,
    PermissionDenied,
    StoreUnavailable,
    TokenBrokerError,
    VersionConflict,
)
from tokenbroker.kernel.log import get_logger
from tokenbroker.kernel.model import Credential, StoredCredential
from tokenbroker.ports import Promotion, RequestQuota, SecretWrite

T = TypeVar("T")
R = TypeVar("R")

CURRENT = "tokenbroker-current"
EXPIRES = "tokenbroker-expires-v"
#: Every this many versions, a write also destroys what failed destroys left behind (one
#: ListSecretVersions, amortised: a tenth of a call per refresh).
SWEEP_EVERY = 10
#: What one refresh costs of the project's request quotas, at most, in steady state (the
#: module docstring): reads -- the GetSecret of the read, and the amortised ListSecretVersions
#: and re-reads after a conflict -- and writes: AddSecretVersion, UpdateSecret,
#: DestroySecretVersion, DisableSecretVersion. AccessSecretVersion counts against its own
#: quota (90,000 per minute per project), far from any refresher's reach.
READS_PER_REFRESH = 2
WRITES_PER_REFRESH = 4
#: Secret Manager's default request quotas per minute per project
#: (https://cloud.google.com/secret-manager/quotas).
DEFAULT_READS_PER_MINUTE = 600
DEFAULT_WRITES_PER_MINUTE = 600
#: The payload member recording what a version was staged on (ignored by credential readers).
STAGED = "tokenbroker_staged"
LABELS = {"managed-by": "tokenbroker"}


def make_client(endpoint: str | None = None) -> Any:
    """The official client: the real service with Application Default Credentials, or, given
    ``endpoint`` (``host:port``, tests and local runs only), an insecure channel to it. The
    composition root passes ``endpoint`` from its settings; nothing here reads the
    environment."""
    from google.cloud import secretmanager_v1  # noqa: PLC0415 - heavy, lazily

    if not endpoint:
        return secretmanager_v1.SecretManagerServiceClient()
    import grpc  # noqa: PLC0415
    from google.auth.credentials import AnonymousCredentials  # noqa: PLC0415
    from google.cloud.secretmanager_v1.services.secret_manager_service.transports import (  # noqa: PLC0415
        SecretManagerServiceGrpcTransport,
    )

    # With an explicit channel the transport ignores credentials; the client refuses
    # credentials next to a transport instance, so they go to the transport.
    channel = grpc.insecure_channel(endpoint)
    transport = SecretManagerServiceGrpcTransport(
        channel=channel, credentials=AnonymousCredentials()
    )
    return secretmanager_v1.SecretManagerServiceClient(transport=transport)


def _staged_payload(credential: Credential, parent: int | None, attempt: str | None) -> bytes:
    """The credential JSON with what it was staged on: readers of credentials ignore the
    extra member, so a consumer reading a version directly still gets a credential."""
    body = json.loads(credential.to_plaintext())
    body[STAGED] = {"parent": parent, "attempt": attempt}
    return json.dumps(body, separators=(",", ":")).encode()


#: What ``_staged_on`` answers for a payload that records no parent (written unstaged).
UNRECORDED = -1


def _staged_on(data: bytes) -> int | None:
    """The version a payload was staged on: ``None`` for a first version, ``UNRECORDED``
    when the payload does not say."""
    try:
        staged = json.loads(data).get(STAGED)
    except (ValueError, AttributeError):
        return UNRECORDED
    if not isinstance(staged, dict):
        return UNRECORDED
    parent = staged.get("parent")
    if parent is None or isinstance(parent, int):
        return parent
    return UNRECORDED


def _crc32c(data: bytes) -> int:
    import google_crc32c  # noqa: PLC0415

    return int(google_crc32c.value(data))


class SecretManagerSecretStore(VersionedSecretStore):
    """The SecretStore port on Secret Manager (see the module docstring for the layout).

    ``client``: a ``SecretManagerServiceClient``; when ``None`` one is built on first use,
    for the real service, or for ``endpoint`` (``host:port`` of a test server) when given.
    The commit protocol (the service numbers versions; an etag compare-and-set on the
    annotations makes one current) is this class's own ``_commit``; the decisions and
    ``get``/``get_many``/``put_many`` come from :class:`VersionedSecretStore`, the latter two
    on a pool of ``concurrency`` threads.
    """

    def __init__(
        self,
        client: Any = None,
        *,
        project: str,
        prefix: str = "tokenbroker-",
        retained_versions: int = DEFAULT_RETAINED_VERSIONS,
        endpoint: str | None = None,
        concurrency: int = 64,
        reads_per_minute: int = DEFAULT_READS_PER_MINUTE,
        writes_per_minute: int = DEFAULT_WRITES_PER_MINUTE,
    ) -> None:
        super().__init__(retained_versions)
        self.project = project
        self.reads_per_minute = reads_per_minute
        self.writes_per_minute = writes_per_minute
        self.prefix = prefix
        self._client = client
        self._endpoint = endpoint
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="secret-manager")
        self._known: dict[str, Any] = {}
        self._known_limit = 100_000
        #: False once UpdateSecret was refused for permission: this identity only reads
        #: (the issuer), and a staged version is left for the refresher to settle.
        self._may_promote = True
        #: Credentials staged by this handle, kept for their promotion (saves reading back).
        self._staged: dict[tuple[str, int], Credential] = {}
        self.log = get_logger(component="secret-manager")

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = make_client(self._endpoint)
        return self._client

    def request_quota(self) -> RequestQuota:
        """The project's read and write quotas (per minute; every handle on the project shares
        one count) and what a refresh spends of them."""
        return RequestQuota(
            key=f"secret-manager-requests:projects/{self.project}",
            reads_per_window=self.reads_per_minute,
            writes_per_window=self.writes_per_minute,
            reads_per_refresh=READS_PER_REFRESH,
            writes_per_refresh=WRITES_PER_REFRESH,
        )

    def secret_name(self, connection_id: str) -> str:
        return f"projects/{self.project}/secrets/{self.prefix}{connection_id}"

    def _call(self, what: str, fn: Callable[..., T], **request: Any) -> T:
        from google.api_core import exceptions  # noqa: PLC0415

        try:
            return fn(request=request)
        except exceptions.GoogleAPICallError as exc:
            raise translate(exc, what) from None
        except exceptions.RetryError as exc:
            raise translate(exc, what) from None

    # -- reads ---------------------------------------------------------------------------------

    def _map(self, fn: Callable[[T], R], items: Sequence[T]) -> builtins.list[R]:
        if len(items) <= 1:
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items))

    def _current_version(self, connection_id: str) -> tuple[Any, int]:
        secret = self._fetch_secret(connection_id)
        current = self._current_of(secret)
        if current is None:
            raise self._missing(connection_id)
        return secret, current

    def _access(
        self, connection_id: str, version: int | str
    ) -> tuple[StoredCredential, int | None]:
        """A version (a number or ``latest``) and the parent it was staged on (``None``: a
        first version; ``UNRECORDED``: written before staging existed)."""
        number, data = self._access_data(connection_id, version)
        stored = StoredCredential(connection_id, number, Credential.from_plaintext(data))
        return stored, _staged_on(data)

    def _access_data(self, connection_id: str, version: int | str) -> tuple[int, bytes]:
        """One AccessSecretVersion: the version's number and its payload, checksum verified.
        NotFound when it is not readable (absent, disabled or destroyed)."""
        name = f"{self.secret_name(connection_id)}/versions/{version}"
        try:
            response = self._call(
                "access secret version", self.client.access_secret_version, name=name
            )
        except VersionConflict:  # FAILED_PRECONDITION: disabled or destroyed
            raise NotFound(
                f"connection {connection_id!r} version {version} is not readable"
            ) from None
        number = int(response.name.rsplit("/", 1)[1])
        payload = response.payload
        if not payload.data_crc32c or _crc32c(payload.data) != payload.data_crc32c:
            raise CorruptCredential(
                f"connection {connection_id!r} version {number}: payload checksum mismatch"
            )
        return number, bytes(payload.data)

    def _read_current(self, connection_id: str) -> StoredCredential:
        """The current version, settling first a version staged on it (``latest``, newer than
        the current one): one GetSecret and one AccessSecretVersion when there is none."""
        secret = self._fetch_secret(connection_id)
        current = self._current_of(secret)
        try:
            latest, parent = self._access(connection_id, "latest")
        except NotFound:  # latest disabled or destroyed (or none): read the current by number
            if current is None:
                raise self._missing(connection_id) from None
            return self._access(connection_id, current)[0]
        if latest.version == current:
            return latest
        if (
            self._may_promote
            and (current is None or latest.version > current)
            and parent == current
        ):
            try:
                secret, to_disable = self._advance(
                    connection_id, secret, latest.version, latest.credential, None
                )
            except (VersionConflict, StoreUnavailable):
                pass  # someone moved it meanwhile, or cannot tell: re-read below
            except PermissionDenied:
                # A reader that may not move the pointer (the issuer: terraform/README.md)
                # reads the current version; the staged one stays, safe, for the refresher.
                self._may_promote = False
                self.log.warning(
                    "cannot settle a staged credential version (no secretmanager.secrets."
                    "update): reading the current one; the refresher settles it",
                    connection_id=connection_id,
                    version=latest.version,
                )
            else:
                self._housekeep(secret, latest.version, to_disable)
                self.log.info(
                    "settled a staged credential version",
                    connection_id=connection_id,
                    version=latest.version,
                )
                return latest
            current = self._current_of(self._fetch_secret(connection_id))
            if current == latest.version:
                return latest
        if current is None:
            raise self._missing(connection_id)
        return self._access(connection_id, current)[0]

    def versions(self, connection_id: str) -> builtins.list[int]:
        """Enabled versions up to the current one (a staged version is not readable yet)."""
        try:
            current = self._current_of(self._fetch_secret(connection_id))
            pages = self._call(
                "list secret versions",
                self.client.list_secret_versions,
                parent=self.secret_name(connection_id),
                filter="state:ENABLED",
            )
            numbers = sorted(int(v.name.rsplit("/", 1)[1]) for v in pages)
        except NotFound:
            return []
        return [n for n in numbers if current is not None and n <= current]

    # -- writes --------------------------------------------------------------------------------

    def _create_secret(self, connection_id: str) -> Any:
        return self._call(
            "create secret",
            self.client.create_secret,
            parent=f"projects/{self.project}",
            secret_id=f"{self.prefix}{connection_id}",
            secret={
                "replication": {"automatic": {}},
                "labels": {**LABELS, "connection": connection_id},
            },
        )

    def _fetch_secret(self, connection_id: str) -> Any:
        secret = self._call(
            "get secret", self.client.get_secret, name=self.secret_name(connection_id)
        )
        self._remember(connection_id, secret)
        return secret

    def _remember(self, connection_id: str, secret: Any) -> None:
        """Keep the secret's metadata (etag, annotations) from a read for the write that
        usually follows it in the same tick: it saves one read request per refresh (Secret
        Manager allows 600 per minute per project). A stale entry only costs a re-read."""
        if len(self._known) >= self._known_limit:
            self._known.pop(next(iter(self._known)), None)
        self._known[connection_id] = secret

    @staticmethod
    def _current_of(secret: Any) -> int | None:
        raw = secret.annotations.get(CURRENT)
        return int(raw) if raw else None

    def _stage(self, write: SecretWrite) -> int:
        """AddSecretVersion on top of the expected current version (checked against the
        secret's annotations, usually from the read just before): durable once it returns."""
        connection_id, credential = write.connection_id, write.credential
        expected_version = write.expected_version
        secret = self._known.get(connection_id)
        if secret is None or self._current_of(secret) != expected_version:
            try:
                secret = self._fetch_secret(connection_id)
            except NotFound:
                if expected_version is not None:
                    raise self._conflict(connection_id, None, expected_version) from None
                try:
                    secret = self._create_secret(connection_id)
                except AlreadyExists:  # created concurrently: compete through the etag below
                    secret = self._fetch_secret(connection_id)
        self._check_expected(connection_id, self._current_of(secret), expected_version)
        data = _staged_payload(credential, expected_version, write.attempt)
        added = self._call(
            "add secret version",
            self.client.add_secret_version,
            parent=secret.name,
            payload={"data": data, "data_crc32c": _crc32c(data)},
        )
        version = int(added.name.rsplit("/", 1)[1])
        self._staged[(connection_id, version)] = credential
        return version

    def _promote(self, promotion: Promotion) -> int:
        """UpdateSecret moves the current pointer to the staged version (etag compare-and-set
        on the parent still being current), then the overlap and retention housekeeping."""
        connection_id, version = promotion.connection_id, promotion.version
        secret = self._known.get(connection_id)
        if secret is None or self._current_of(secret) != promotion.parent:
            secret = self._fetch_secret(connection_id)
        current = self._current_of(secret)
        if current == version:
            self._staged.pop((connection_id, version), None)
            return version  # settled by a reader meanwhile
        self._check_expected(connection_id, current, promotion.parent)
        credential = self._staged.pop((connection_id, version), None)
        if credential is None:  # staged by another process: read it back
            credential = self._access(connection_id, version)[0].credential
        added = f"{secret.name}/versions/{version}"
        secret, to_disable = self._advance(connection_id, secret, version, credential, added)
        self._housekeep(secret, version, to_disable)
        return version

    def _housekeep(self, secret: Any, version: int, to_disable: builtins.list[int]) -> None:
        """After ``version`` became current: disable the versions whose access token expired,
        destroy the one retention drops (one write destroys one version); every
        :data:`SWEEP_EVERY`-th version, destroy whatever older one a failed destroy left."""
        for old in to_disable:
            self._quietly(
                "disable secret version",
                self.client.disable_secret_version,
                name=f"{secret.name}/versions/{old}",
            )
        doomed = self._retention_floor(version)
        if doomed >= 1:
            self._quietly(
                "destroy secret version",
                self.client.destroy_secret_version,
                name=f"{secret.name}/versions/{doomed}",
            )
        if doomed > 1 and version % SWEEP_EVERY == 0:
            self._sweep(secret, doomed)

    def _sweep(self, secret: Any, doomed: int) -> None:
        """Destroy the versions older than ``doomed`` that are not destroyed yet: those whose
        destroy failed (housekeeping never fails a committed write). One list call per
        :data:`SWEEP_EVERY` versions; a failure is left to the next sweep."""
        try:
            pages = self._call(
                "list secret versions",
                self.client.list_secret_versions,
                parent=secret.name,
                filter="NOT state:DESTROYED",
            )
            left = sorted(int(v.name.rsplit("/", 1)[1]) for v in pages)
        except (NotFound, VersionConflict, StoreUnavailable):
            return
        for old in left:
            if old < doomed:  # never a staged version: those are newer than the current one
                self._quietly(
                    "destroy secret version",
                    self.client.destroy_secret_version,
                    name=f"{secret.name}/versions/{old}",
                )

    def _advance(
        self,
        connection_id: str,
        secret: Any,
        version: int,
        credential: Credential,
        added: str | None,
    ) -> tuple[Any, builtins.list[int]]:
        """Make ``version`` current with a compare-and-set on the secret's etag.

        An etag mismatch is re-checked once: if the current version is still the expected
        one (someone edited labels, or our cached etag was stale) the write is retried. An
        error with an unknown outcome is settled by reading the secret back. A version whose
        parent is no longer current lost the race and is destroyed (``added``), so it can never
        be read as a credential; one whose parent still is stays, staged, for the next read to
        settle: it may hold the only refresh token left alive.
        """
        expected = self._current_of(secret)
        for attempt in range(2):
            annotations, to_disable = self._plan(secret.annotations, version, credential)
            try:
                updated = self._call(
                    "update secret",
                    self.client.update_secret,
                    secret={"name": secret.name, "etag": secret.etag, "annotations": annotations},
                    update_mask={"paths": ["annotations"]},
                )
            except (VersionConflict, StoreUnavailable) as error:
                self._known.pop(connection_id, None)
                try:
                    secret = self._fetch_secret(connection_id)
                except TokenBrokerError:
                    raise error from None  # outcome unknown; the added version stays harmless
                now_current = self._current_of(secret)
                if now_current == version:
                    return secret, to_disable  # our update did land
                if now_current != expected:  # another version won: ours is an orphan
                    if added is not None:
                        self._quietly(
                            "destroy secret version",
                            self.client.destroy_secret_version,
                            name=added,
                        )
                    raise error from None
                if attempt == 1:
                    raise error from None  # still staged on the current one: settled by a read
                continue
            self._remember(connection_id, updated)
            return updated, to_disable
        raise AssertionError("unreachable")  # pragma: no cover

    def _plan(
        self, annotations: Any, version: int, credential: Credential
    ) -> tuple[dict[str, str], builtins.list[int]]:
        """New annotations, and the tracked versions whose tokens expired by this write."""
        now: datetime | None = credential.obtained_at
        keep: dict[str, str] = {}
        expired: builtins.list[int] = []
        for key, value in dict(annotations).items():
            if not key.startswith(EXPIRES):
                if key != CURRENT:
                    keep[key] = value
                continue
            tracked = int(key.removeprefix(EXPIRES))
            if tracked <= self._retention_floor(version):
                continue  # destroyed by retention
            if now is not None and value and parse_iso(value) <= now:
                expired.append(tracked)
                continue
            keep[key] = value
        keep[CURRENT] = str(version)
        keep[f"{EXPIRES}{version}"] = isoformat(credential.expires_at) or ""
        return keep, expired

    def _quietly(self, what: str, fn: Callable[..., Any], **request: Any) -> None:
        """Housekeeping that must not fail a committed write; a later write retries it."""
        with contextlib.suppress(NotFound, VersionConflict, StoreUnavailable):
            self._call(what, fn, **request)

    def delete(self, connection_id: str) -> None:
        self._known.pop(connection_id, None)
        self._call("delete secret", self.client.delete_secret, name=self.secret_name(connection_id))
