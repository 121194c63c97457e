"""The domain: connections, their credentials, refresh state, leases and events; the issuer's
callers and the tokens minted for them."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from tokenbroker.kernel.clock import isoformat, parse_iso
from tokenbroker.kernel.errors import ConfigError
from tokenbroker.kernel.secret import Secret

# Fits Secret Manager secret ids ([A-Za-z0-9_-]{1,255}), Firestore document ids and AWS names.
CONNECTION_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class GrantType(StrEnum):
    REFRESH_TOKEN = "refresh_token"  # noqa: S105 - a grant name, RFC 6749 §6
    CLIENT_CREDENTIALS = "client_credentials"  # RFC 6749 §4.4
    JWT_BEARER = "jwt_bearer"  # RFC 7523 §2.1, Google service-account keys
    #: Keyless: the issuer mints tokens for ``params.service_account`` through IAM Credentials.
    IMPERSONATION = "impersonation"
    #: A static credential (an API key pair, a header token) used only by the relay.
    STATIC = "static"


#: Grants the refresher never refreshes: nothing at a token endpoint expires.
UNREFRESHED_GRANTS = frozenset({GrantType.IMPERSONATION, GrantType.STATIC})


def recovery_step(connection_id: str, grant: GrantType) -> str:
    """The one CLI command that brings a connection of this grant back from needs_reauth.

    A refresh-token connection is re-authorised by its account holder through the
    authorization-code flow; the others need new material from whoever holds it. Carried by the
    ``connection.needs_reauth`` event (``next_step``), its log line, ``tokenbroker show`` and
    the alert text (docs/events.md, docs/operations.md).
    """
    if grant is GrantType.REFRESH_TOKEN:
        return f"tokenbroker authorize {connection_id}"
    if grant is GrantType.JWT_BEARER:
        return f"tokenbroker reauth {connection_id} --service-account-key-file FILE"
    if grant is GrantType.CLIENT_CREDENTIALS:
        return f"tokenbroker reauth {connection_id} --client-secret-file FILE"
    return f"tokenbroker show {connection_id}"  # never refreshed: nothing to re-authorise


class ClientAuthMethod(StrEnum):
    BASIC = "client_secret_basic"  # RFC 6749 §2.3.1, HTTP Basic
    POST = "client_secret_post"  # RFC 6749 §2.3.1, in the form body
    NONE = "none"


class ConnectionStatus(StrEnum):
    ACTIVE = "active"
    NEEDS_REAUTH = "needs_reauth"
    DISABLED = "disabled"


def validate_connection_id(value: str) -> str:
    if not CONNECTION_ID_RE.match(value):
        raise ConfigError(
            f"connection id {value!r} is invalid: use 1-63 lowercase letters, digits, '-' or '_',"
            " starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class Connection:
    """A registered account at a provider: what to refresh and how. Holds no secret."""

    id: str
    profile: str
    grant: GrantType
    client_id: str | None = None
    scopes: tuple[str, ...] = ()
    token_url: str | None = None
    auth_method: ClientAuthMethod | None = None
    params: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "profile": self.profile,
            "grant": self.grant.value,
            "client_id": self.client_id,
            "scopes": list(self.scopes),
            "token_url": self.token_url,
            "auth_method": self.auth_method.value if self.auth_method else None,
            "params": dict(self.params),
            "created_at": isoformat(self.created_at),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Connection:
        return cls(
            id=data["id"],
            profile=data["profile"],
            grant=GrantType(data["grant"]),
            client_id=data.get("client_id"),
            scopes=tuple(data.get("scopes") or ()),
            token_url=data.get("token_url"),
            auth_method=ClientAuthMethod(data["auth_method"]) if data.get("auth_method") else None,
            params=dict(data.get("params") or {}),
            created_at=parse_iso(data["created_at"]) if data.get("created_at") else None,
        )


_SECRET_FIELDS = ("access_token", "refresh_token", "client_secret", "private_key")


@dataclass(frozen=True)
class Credential:
    """Everything secret about a connection, stored as one versioned, encrypted unit.

    ``private_key`` holds a Google service-account key file (JSON) for the JWT bearer grant.
    ``metadata`` holds non-secret facts the provider returned (e.g. Zoho's ``api_domain``).
    """

    access_token: Secret | None = None
    refresh_token: Secret | None = None
    client_secret: Secret | None = None
    private_key: Secret | None = None
    token_type: str = "Bearer"  # noqa: S105 - RFC 6750 token type
    scope: tuple[str, ...] = ()
    expires_at: datetime | None = None
    obtained_at: datetime | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    def with_token(self, **changes: Any) -> Credential:
        return replace(self, **changes)

    def to_plaintext(self) -> bytes:
        """Serialise for encryption. The only place secret values are written out."""
        body: dict[str, Any] = {
            name: value.reveal()
            for name in _SECRET_FIELDS
            if (value := getattr(self, name)) is not None
        }
        body.update(
            token_type=self.token_type,
            scope=list(self.scope),
            expires_at=isoformat(self.expires_at),
            obtained_at=isoformat(self.obtained_at),
            metadata=dict(self.metadata),
        )
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_plaintext(cls, raw: bytes) -> Credential:
        body = json.loads(raw)
        return cls(
            **{name: Secret(body[name]) for name in _SECRET_FIELDS if body.get(name) is not None},
            token_type=body.get("token_type") or "Bearer",
            scope=tuple(body.get("scope") or ()),
            expires_at=parse_iso(body["expires_at"]) if body.get("expires_at") else None,
            obtained_at=parse_iso(body["obtained_at"]) if body.get("obtained_at") else None,
            metadata=dict(body.get("metadata") or {}),
        )

    def secret_values(self) -> list[str]:
        """Every secret value this credential holds (for leak scans in tests)."""
        return [v.reveal() for name in _SECRET_FIELDS if (v := getattr(self, name)) is not None]


@dataclass(frozen=True)
class StoredCredential:
    """A credential as a store holds it: with the version the store assigned."""

    connection_id: str
    version: int
    credential: Credential
    created_at: datetime | None = None


@dataclass(frozen=True)
class Intent:
    """A refresh about to present a rotating refresh token, made durable before it does.

    Written by the lease holder (fenced by ``token``) just before the request, and cleared by
    the commit of its outcome. A connection found with an intent and no outcome -- its holder
    crashed, or the answer never arrived -- may have had its refresh token consumed: the next
    holder must not present it again blindly (see ``refresh.transitions.unknown_outcome``).
    ``at`` is the state store's clock when the intent was recorded (the store stamps it).
    """

    attempt: str
    #: The credential version whose refresh token is being presented.
    from_version: int | None
    #: The fencing token of the lease it is presented under.
    token: int
    at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "from_version": self.from_version,
            "token": self.token,
            "at": self.at.isoformat() if self.at is not None else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Intent:
        at = data.get("at")
        return cls(
            attempt=str(data["attempt"]),
            from_version=data.get("from_version"),
            token=int(data["token"]),
            at=datetime.fromisoformat(at) if at else None,
        )


@dataclass(frozen=True)
class RefreshState:
    """Where a connection stands: the non-secret half of the state store's record."""

    status: ConnectionStatus = ConnectionStatus.ACTIVE
    expires_at: datetime | None = None
    next_refresh_at: datetime | None = None
    last_refresh_at: datetime | None = None
    last_attempt_at: datetime | None = None
    consecutive_failures: int = 0
    current_version: int | None = None
    last_error: str | None = None
    #: A presentation of a rotating refresh token whose outcome is not known yet.
    intent: Intent | None = None
    #: The outcome of ``intent`` is unknown and the refresh token may be spent: the current
    #: access token is served until shortly before it expires, when the refresh token is
    #: presented once more as the last step (announced by ``refresh.at_risk``).
    at_risk: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "expires_at": isoformat(self.expires_at),
            "next_refresh_at": isoformat(self.next_refresh_at),
            "last_refresh_at": isoformat(self.last_refresh_at),
            "last_attempt_at": isoformat(self.last_attempt_at),
            "consecutive_failures": self.consecutive_failures,
            "current_version": self.current_version,
            "last_error": self.last_error,
            "intent": self.intent.to_json() if self.intent is not None else None,
            "at_risk": self.at_risk,
        }


@dataclass(frozen=True)
class ConnectionRecord:
    connection: Connection
    state: RefreshState


@dataclass(frozen=True)
class Lease:
    """Exclusive right to refresh one connection until ``expires_at``.

    ``token`` is a fencing token: it grows by one every time the lease is granted, and a commit
    is accepted only with the newest one, so a holder that stalled past its lease and was
    overtaken can no longer write (Kleppmann, "How to do distributed locking").
    """

    connection_id: str
    holder: str
    token: int
    expires_at: datetime


#: How many slots connection ids hash into; a :class:`Shard` is a contiguous range of them.
SLOTS = 1 << 16
#: Slots are grouped into this many buckets (a slot's top five bits). A store that indexes the
#: bucket lets a shard's claim read only its own buckets' index entries: up to ``BUCKETS``
#: shards, no two shards' claims touch the same entries (docs/gcp.md, "Fan-out").
BUCKETS = 32
SLOTS_PER_BUCKET = SLOTS // BUCKETS


def slot_of(connection_id: str) -> int:
    """The connection's slot in ``range(SLOTS)``: the first two bytes of the SHA-256 of its
    id, so uniform, stable across processes and versions, and the same in every store."""
    return int.from_bytes(hashlib.sha256(connection_id.encode()).digest()[:2], "big") % SLOTS


def bucket_of(slot: int) -> int:
    """The bucket of a slot, in ``range(BUCKETS)``."""
    return slot // SLOTS_PER_BUCKET


@dataclass(frozen=True)
class Shard:
    """The ``index``-th of ``count`` disjoint parts of the connections, by slot: the shards of
    one count partition every connection id (each is in exactly one), so refreshers on
    different shards never look at the same connections."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count <= SLOTS:
            raise ValueError(f"shard {self.index} of {self.count}: need 0 <= index < count")

    @property
    def slots(self) -> range:
        """The slots this shard holds, contiguous. Up to ``BUCKETS`` shards, whole buckets:
        shard i of n holds buckets ``[i*BUCKETS//n, (i+1)*BUCKETS//n)``, so no two shards
        share one (sizes differ by at most one bucket); beyond, slots
        ``[i*SLOTS//n, (i+1)*SLOTS//n)``, and neighbours may share a bucket."""
        if self.count <= BUCKETS:
            low, high = self.index * BUCKETS // self.count, (self.index + 1) * BUCKETS // self.count
            return range(low * SLOTS_PER_BUCKET, high * SLOTS_PER_BUCKET)
        return range(self.index * SLOTS // self.count, (self.index + 1) * SLOTS // self.count)

    @property
    def buckets(self) -> range:
        """The buckets holding this shard's slots."""
        slots = self.slots
        return range(bucket_of(slots.start), bucket_of(slots.stop - 1) + 1)

    @property
    def everything(self) -> bool:
        """Whether this shard holds every connection (the only shard of one)."""
        return self.count == 1

    def holds(self, connection_id: str) -> bool:
        return slot_of(connection_id) in self.slots


@dataclass(frozen=True)
class Claim:
    """A lease together with the record it was taken on."""

    lease: Lease
    record: ConnectionRecord


class EventType(StrEnum):
    ROTATED = "credential.rotated"
    REFRESH_FAILED = "refresh.failed"
    NEEDS_REAUTH = "connection.needs_reauth"
    RECOVERED = "connection.recovered"
    #: A new connection was authorised by its account holder (the authorization-code flow).
    CONNECTED = "connection.connected"
    #: The outcome of a rotating refresh is unknown: the access token is served until shortly
    #: before it expires, then the refresh token is presented once more (docs/events.md).
    AT_RISK = "refresh.at_risk"


EVENT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ConnectionEvent:
    """Something that happened to a connection. Never carries token material.

    Delivery is at-least-once; ``idempotency_key`` is the same for every delivery of the same
    happening, so subscribers de-duplicate on it. The schema is documented in docs/events.md.
    """

    type: EventType
    connection_id: str
    occurred_at: datetime
    idempotency_key: str
    version: int | None = None
    expires_at: datetime | None = None
    error_code: str | None = None
    failure_class: str | None = None
    consecutive_failures: int = 0
    #: ``connection.needs_reauth`` only: the command that recovers the connection.
    next_step: str | None = None
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    schema_version: int = EVENT_SCHEMA_VERSION

    @staticmethod
    def key_for(event_type: EventType, connection_id: str, discriminator: str) -> str:
        raw = f"{event_type.value}|{connection_id}|{discriminator}".encode()
        return hashlib.sha256(raw).hexdigest()[:32]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "event_id": self.event_id,
            "idempotency_key": self.idempotency_key,
            "type": self.type.value,
            "connection_id": self.connection_id,
            "version": self.version,
            "expires_at": isoformat(self.expires_at),
            "occurred_at": isoformat(self.occurred_at),
            "error_code": self.error_code,
            "failure_class": self.failure_class,
            "consecutive_failures": self.consecutive_failures,
            "next_step": self.next_step,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ConnectionEvent:
        return cls(
            type=EventType(data["type"]),
            connection_id=data["connection_id"],
            occurred_at=parse_iso(data["occurred_at"]),
            idempotency_key=data["idempotency_key"],
            version=data.get("version"),
            expires_at=parse_iso(data["expires_at"]) if data.get("expires_at") else None,
            error_code=data.get("error_code"),
            failure_class=data.get("failure_class"),
            consecutive_failures=int(data.get("consecutive_failures") or 0),
            next_step=data.get("next_step"),
            event_id=data["event_id"],
            schema_version=int(data.get("schema_version") or EVENT_SCHEMA_VERSION),
        )


@dataclass(frozen=True)
class Caller:
    """Who is calling the issuer: the identity a verified credential vouches for.

    For a Google ID token (the only kind the broker accepts today) ``email`` is the calling
    service account, lower-cased; ``subject`` and ``issuer`` are the token's ``sub`` and ``iss``
    (OpenID Connect Core §2), and ``expires_at`` its ``exp``.
    """

    email: str
    subject: str
    issuer: str
    expires_at: datetime


@dataclass(frozen=True)
class MintedToken:
    """An access token minted for one request by impersonation (IAM Credentials
    ``generateAccessToken``): exactly the requested scopes, a bounded lifetime, never stored."""

    access_token: Secret
    expires_at: datetime
