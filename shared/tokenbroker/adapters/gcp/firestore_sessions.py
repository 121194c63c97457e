"""The AuthorizationSessions port on Cloud Firestore: the connect function's requests in flight.

One document per session in ``<collection>`` (the state store's collection +
``_authorization_sessions``; default ``tokenbroker_connections_authorization_sessions``),
its id the session's key (the SHA-256 of the ``state``, never the state itself)::

    connection       map        Connection.to_json() as it was when the flow started
    operator         string     who started the flow (the callback must come from them)
    redirect_uri     string
    new              bool
    sealed_verifier  bytes      the PKCE verifier, AES-256-GCM (below)
    created_at       timestamp
    expires_at       timestamp  the Firestore TTL policy's field (terraform: firestore.tf)

The verifier is sealed, not stored in the clear
-----------------------------------------------
The verifier is what makes an intercepted authorization code useless (RFC 7636 §1); a copy of
the collection (an export, a backup, a console reader with ``datastore.viewer``) must not give
it away. It is sealed with AES-256-GCM under the **session key** (32 random bytes that the
composition root passes in: ``TOKENBROKER_SESSION_KEY``, which Cloud Functions injects from a
Secret Manager secret readable only by the connect function; ``terraform/modules/tokenbroker``
creates it). The associated data binds the blob to its document's key, connection and
operator, so a blob copied onto another session does not open. Key rotation: a new secret
version; sessions sealed under the old key (10 minutes at most) then fail to open and the
operator starts again -- nothing else is encrypted with it.

Deriving the verifier instead (from the state) was rejected: the state travels with the code in
the callback, so whoever intercepts the code could derive the verifier too -- the one case
PKCE exists for.

Single use
----------
``take`` reads and deletes the document in one Firestore transaction (serializable: of racing
takers on any number of instances exactly one sees the document; the others' transactions are
aborted and retried, then find nothing). ``put`` uses ``create`` (fails if the document
exists). Expired documents are deleted by ``purge`` (a query on ``expires_at``, run at each
start) and by the TTL policy, which deletes within about 24 hours of expiry
(https://cloud.google.com/firestore/docs/ttl): the flow refuses an expired session itself, the
TTL only collects garbage.

The client library is imported on first use (cold start), as in :mod:`.firestore`.
"""

from __future__ import annotations

import base64
import binascii
import secrets as _random
from datetime import UTC, datetime
from typing import Any

from tokenbroker.adapters.gcp.firestore import EMULATOR_PROJECT, _translated, _utc
from tokenbroker.kernel.errors import AlreadyExists, ConfigError, CorruptCredential, NotFound
from tokenbroker.kernel.model import Connection
from tokenbroker.kernel.secret import Secret
from tokenbroker.ports import AuthorizationSession

__all__ = [
    "DEFAULT_SESSIONS_COLLECTION",
    "SESSIONS_SUFFIX",
    "SESSION_KEY_BYTES",
    "FirestoreAuthorizationSessions",
    "decode_session_key",
]

SESSIONS_SUFFIX = "_authorization_sessions"
DEFAULT_SESSIONS_COLLECTION = "tokenbroker_connections" + SESSIONS_SUFFIX
SESSION_KEY_BYTES = 32
_NONCE_BYTES = 12
_PURGE_BATCH = 200


def decode_session_key(key: Secret, where: str = "the session key") -> bytes:
    """The 32-byte key from its base64 text (standard or URL-safe, padded or not)."""
    text = key.reveal().strip().replace("+", "-").replace("/", "_")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{where}: not valid base64") from None
    if len(raw) != SESSION_KEY_BYTES:
        raise ConfigError(f"{where}: must decode to {SESSION_KEY_BYTES} bytes")
    return raw


def _context(key: str, connection_id: str, operator: str) -> bytes:
    """AES-GCM associated data: length-prefixed, so no two tuples encode alike."""
    parts = ("tokenbroker:authorization-session:v1", key, connection_id, operator)
    return b"".join(b"%d:%s;" % (len(p.encode()), p.encode()) for p in parts)


class FirestoreAuthorizationSessions:
    """Sessions in a Firestore collection, the verifier sealed with ``session_key``.

    ``client``: a ``google.cloud.firestore.Client``, or ``None`` to build one on first use
    for ``project``/``database`` (``emulator_host``: the emulator, anonymous credentials; tests
    and local runs only). Reads no environment."""

    def __init__(
        self,
        *,
        session_key: Secret,
        client: Any = None,
        project: str | None = None,
        database: str = "(default)",
        collection: str = DEFAULT_SESSIONS_COLLECTION,
        emulator_host: str | None = None,
    ) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415

        self._aead = AESGCM(decode_session_key(session_key))
        self._client = client
        self._owns_client = client is None
        self._project = project
        self._database = database
        self._emulator_host = emulator_host or None
        self.collection_name = collection

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._build_client()
        return self._client

    def _build_client(self) -> Any:
        with _translated("client setup"):
            from google.cloud import firestore  # noqa: PLC0415 - heavy, lazily

            if self._emulator_host is None:
                return firestore.Client(project=self._project, database=self._database)
            from google.auth.credentials import AnonymousCredentials  # noqa: PLC0415

            client = firestore.Client(
                project=self._project or EMULATOR_PROJECT,
                database=self._database,
                credentials=AnonymousCredentials(),
            )
            client._emulator_host = self._emulator_host  # as FirestoreStateStore does
            return client

    def close(self) -> None:
        if self._client is not None and self._owns_client:
            self._client.close()
            self._client = None

    def _doc(self, key: str) -> Any:
        return self.client.collection(self.collection_name).document(key)

    # -- the port --------------------------------------------------------------------------

    def put(self, session: AuthorizationSession) -> None:
        c = session.connection
        nonce = _random.token_bytes(_NONCE_BYTES)
        sealed = nonce + self._aead.encrypt(
            nonce,
            session.code_verifier.reveal().encode(),
            _context(session.key, c.id, session.operator),
        )
        document = {
            "connection": c.to_json(),
            "operator": session.operator,
            "redirect_uri": session.redirect_uri,
            "new": session.new,
            "sealed_verifier": sealed,
            "created_at": session.created_at,
            "expires_at": session.expires_at,
        }
        with _translated("put session"):
            try:
                self._doc(session.key).create(document)
            except Exception as exc:
                if type(exc).__name__ in ("AlreadyExists", "Conflict"):
                    raise AlreadyExists("authorization session already exists") from None
                raise

    def take(self, key: str) -> AuthorizationSession:
        from google.cloud import firestore  # noqa: PLC0415 - heavy, lazily

        ref = self._doc(key)

        @firestore.transactional
        def body(transaction: Any) -> dict[str, Any] | None:
            snap = next(iter(transaction.get(ref)), None)
            if snap is None or not snap.exists:
                return None
            transaction.delete(ref)
            data: dict[str, Any] = snap.to_dict()
            return data

        with _translated("take session"):
            data = body(self.client.transaction(max_attempts=8))
        if data is None:
            raise NotFound("no such authorization session")
        return self._session(key, data)

    def _session(self, key: str, data: dict[str, Any]) -> AuthorizationSession:
        from cryptography.exceptions import InvalidTag  # noqa: PLC0415

        try:
            connection = Connection.from_json(data["connection"])
            operator = str(data["operator"])
            sealed = bytes(data["sealed_verifier"])
            verifier = self._aead.decrypt(
                sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], _context(key, connection.id, operator)
            ).decode()
            created = _utc(data["created_at"]) or datetime.fromtimestamp(0, UTC)
            expires = _utc(data["expires_at"]) or datetime.fromtimestamp(0, UTC)
        except (InvalidTag, ValueError, KeyError, TypeError):
            raise CorruptCredential(
                "authorization session: its stored document does not verify (was the session"
                " key changed?); start again"
            ) from None
        return AuthorizationSession(
            key=key,
            connection=connection,
            operator=operator,
            redirect_uri=str(data["redirect_uri"]),
            code_verifier=Secret(verifier),
            created_at=created,
            expires_at=expires,
            new=bool(data.get("new")),
        )

    def purge(self, now: datetime) -> int:
        from google.cloud.firestore import FieldFilter  # noqa: PLC0415 - heavy, lazily

        query = (
            self.client.collection(self.collection_name)
            .where(filter=FieldFilter("expires_at", "<", now))
            .limit(_PURGE_BATCH)
        )
        with _translated("purge sessions"):
            snaps = list(query.stream())
            if snaps:
                batch = self.client.batch()
                for snap in snaps:
                    batch.delete(snap.reference)
                batch.commit()
        return len(snaps)
