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
a loser destroys the version it added.

Overlap: when version n is written, older versions stay ENABLED while their access token is
still valid at n's ``obtained_at`` (a consumer that read them keeps working), and are disabled
on the first write after their expiry. Versions older than ``retained_versions`` are destroyed.

API calls per refresh (read, then write): GetSecret + AccessSecretVersion, then
AddSecretVersion + UpdateSecret, plus one DisableSecretVersion and one DestroySecretVersion per
rotation in steady state. The write reuses the etag the read saw (a stale one costs a re-read).
"""

from __future__ import annotations

import builtins
import contextlib
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
    StoreUnavailable,
    TokenBrokerError,
    VersionConflict,
)
from tokenbroker.kernel.model import Credential, StoredCredential
from tokenbroker.ports import SecretWrite

T = TypeVar("T")
R = TypeVar("R")

CURRENT = "tokenbroker-current"
EXPIRES = "tokenbroker-expires-v"
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
        concurrency: int = 16,
    ) -> None:
        super().__init__(retained_versions)
        self.project = project
        self.prefix = prefix
        self._client = client
        self._endpoint = endpoint
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="secret-manager")
        self._known: dict[str, Any] = {}
        self._known_limit = 100_000

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = make_client(self._endpoint)
        return self._client

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

    def _access(self, connection_id: str, version: int) -> StoredCredential:
        name = f"{self.secret_name(connection_id)}/versions/{version}"
        try:
            response = self._call(
                "access secret version", self.client.access_secret_version, name=name
            )
        except VersionConflict:  # FAILED_PRECONDITION: disabled or destroyed
            raise NotFound(
                f"connection {connection_id!r} version {version} is not readable"
            ) from None
        payload = response.payload
        if not payload.data_crc32c or _crc32c(payload.data) != payload.data_crc32c:
            raise CorruptCredential(
                f"connection {connection_id!r} version {version}: payload checksum mismatch"
            )
        return StoredCredential(connection_id, version, Credential.from_plaintext(payload.data))

    def _read_current(self, connection_id: str) -> StoredCredential:
        _, current = self._current_version(connection_id)
        return self._access(connection_id, current)

    def versions(self, connection_id: str) -> builtins.list[int]:
        try:
            pages = self._call(
                "list secret versions",
                self.client.list_secret_versions,
                parent=self.secret_name(connection_id),
                filter="state:ENABLED",
            )
            return sorted(int(v.name.rsplit("/", 1)[1]) for v in pages)
        except NotFound:
            return []

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

    def _commit(self, write: SecretWrite) -> int:
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
        data = credential.to_plaintext()
        added = self._call(
            "add secret version",
            self.client.add_secret_version,
            parent=secret.name,
            payload={"data": data, "data_crc32c": _crc32c(data)},
        )
        version = int(added.name.rsplit("/", 1)[1])
        secret, to_disable = self._advance(connection_id, secret, version, credential, added.name)
        for old in to_disable:
            self._quietly(
                "disable secret version",
                self.client.disable_secret_version,
                name=f"{secret.name}/versions/{old}",
            )
        doomed = self._retention_floor(version)  # one write destroys one version
        if doomed >= 1:
            self._quietly(
                "destroy secret version",
                self.client.destroy_secret_version,
                name=f"{secret.name}/versions/{doomed}",
            )
        return version

    def _advance(
        self, connection_id: str, secret: Any, version: int, credential: Credential, added: str
    ) -> tuple[Any, builtins.list[int]]:
        """Make ``version`` current with a compare-and-set on the secret's etag.

        An etag mismatch is re-checked once: if the current version is still the expected
        one (someone edited labels, or our cached etag was stale) the write is retried. An
        error with an unknown outcome is settled by reading the secret back. A version that
        did not become current is destroyed, so it can never be read as a credential.
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
                if now_current != expected or attempt == 1:
                    self._quietly(
                        "destroy secret version", self.client.destroy_secret_version, name=added
                    )
                    raise error from None
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
