"""A local Google Secret Manager for tests: the v1 gRPC API, in memory, on 127.0.0.1.

Google ships no Secret Manager emulator, so this server speaks the real wire protocol
(``google.cloud.secretmanager.v1.SecretManagerService`` over gRPC) with the request and response
types of the official ``google-cloud-secret-manager`` package, and the official client talks to
it unchanged over an insecure channel (:func:`make_client`). Everything is kept in memory, under
one lock; state is isolated per project by resource name.

Each rule below cites where it comes from. The references:

* [RPC] API reference, https://cloud.google.com/secret-manager/docs/reference/rpc/google.cloud.secretmanager.v1
  (the same text ships as docstrings in ``google.cloud.secretmanager_v1.types``);
* [ETAGS] https://cloud.google.com/secret-manager/docs/etags
* [INTEGRITY] https://cloud.google.com/secret-manager/docs/data-integrity
* [FILTER] https://cloud.google.com/secret-manager/docs/filtering
* [ACCESS] https://cloud.google.com/secret-manager/docs/reference/rest/v1/projects.secrets.versions/access
* [DISABLE] https://cloud.google.com/secret-manager/docs/disable-secret-version
* [DELAY] https://cloud.google.com/secret-manager/docs/delay-destruction-of-secret-versions
* [AIP-160] https://google.aip.dev/160 (list filtering language);
  [AIP-193] https://google.aip.dev/193 (error codes); [AIP-158] https://google.aip.dev/158 (paging)
* Error texts seen from the real service, where the docs name no message:
  "Secret Version [...] is in DESTROYED state." / FAILED_PRECONDITION
  (https://github.com/google-github-actions/get-secretmanager-secrets/issues/268);
  "Secret.replication must be provided." / INVALID_ARGUMENT
  (https://github.com/googleapis/google-cloud-node-core/issues/689);
  "Secret.replication should not be provided." / INVALID_ARGUMENT for regional secrets
  (https://github.com/airbytehq/airbyte/issues/73660);
  "Resource ID [...] is not in a valid format." / INVALID_ARGUMENT
  (https://github.com/googleapis/nodejs-secret-manager/issues/74);
  "Field [payload] is required." / 400 for a missing or empty payload
  (https://github.com/hashicorp/terraform-provider-google/issues/10475);
  409 ALREADY_EXISTS on creating an existing secret
  (https://github.com/ansible-collections/google.cloud/issues/768).

IAM, as far as a deployment's least privilege needs it: a client made with ``principal=``
(:meth:`SecretManagerTestServer.client`) sends that name in a request header, and a principal
restricted with :meth:`SecretManagerTestServer.restrict` is answered PERMISSION_DENIED for
any method whose permission it lacks, with the message shape IAM uses ("Permission '...'
denied for resource '...' (or it may not exist)."; the permission of each method:
[PERMS] https://cloud.google.com/secret-manager/docs/access-control#permissions; the status:
[AIP-193]). Unrestricted principals (and clients without one) may do everything.

Not modelled: IAM policies (``*IamPolicy`` / ``TestIamPermissions``), locations, managed
rotation, Pub/Sub notifications on ``topics``, rotation schedules, CMEK, tags, and the
project-ID-to-number rewriting of resource names unless ``project_numbers`` is given.
Unimplemented methods answer UNIMPLEMENTED, as gRPC does for any unknown method.

Standalone: ``python -m tests.support.secretmanager_server --port P`` prints
``READY 127.0.0.1:P`` once serving, and serves until SIGINT or SIGTERM. With ``--stats-port Q``
(0: a free port) it also serves ``GET /stats`` over plain HTTP on 127.0.0.1 -- the calls per
method (:attr:`SecretManagerTestServer.calls`) and the process's CPU seconds, as JSON -- and
``POST /stats/reset`` to zero the calls; the line then reads ``READY 127.0.0.1:P STATS
127.0.0.1:Q``. Benchmarks use it to count the calls a run makes from another process.
``--max-workers`` sets the gRPC handler threads (default 16).
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import hashlib
import http.server
import json
import os
import re
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
from google.auth.credentials import AnonymousCredentials
from google.cloud import secretmanager_v1
from google.cloud.secretmanager_v1.services.secret_manager_service.transports import (
    SecretManagerServiceGrpcTransport,
)
from google.cloud.secretmanager_v1.types import resources, service
from google.protobuf import empty_pb2

from tests.support.grpc_server import (
    GrpcTestServer,
    UnaryMethod,
    announce_and_wait,
    standalone_parser,
)

SERVICE = "google.cloud.secretmanager.v1.SecretManagerService"
State = resources.SecretVersion.State

# [RPC] SecretPayload.data: "Must be no larger than 64KiB."
MAX_PAYLOAD_BYTES = 64 * 1024
# [RPC] ListSecretsRequest.page_size: "If the number is greater than 25000, it is capped at 25000."
MAX_PAGE_SIZE = 25000
# [RPC] Secret.labels: "No more than 64 labels can be assigned to a given resource."
MAX_LABELS = 64
# [RPC] Secret.version_aliases: "No more than 50 aliases can be assigned to a given secret."
MAX_ALIASES = 50
# [RPC] Secret.annotations: "The total size of annotation keys and values must be less than 16KiB."
MAX_ANNOTATIONS_BYTES = 16 * 1024

# [RPC] CreateSecretRequest.secret_id: "a string with a maximum length of 255 characters and can
# contain uppercase and lowercase letters, numerals, and the hyphen (-) and underscore (_)".
_SECRET_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")
_SEGMENT = r"([^/]+)"
# [RPC] parents are ``projects/*`` or ``projects/*/locations/*``; secrets
# ``projects/*/secrets/*`` or ``projects/*/locations/*/secrets/*``; versions add ``/versions/*``.
_PARENT = re.compile(rf"projects/{_SEGMENT}(?:/locations/{_SEGMENT})?")
_SECRET = re.compile(rf"projects/{_SEGMENT}(?:/locations/{_SEGMENT})?/secrets/{_SEGMENT}")
_VERSION = re.compile(
    rf"projects/{_SEGMENT}(?:/locations/{_SEGMENT})?/secrets/{_SEGMENT}/versions/{_SEGMENT}"
)
# [RPC] Secret.version_aliases: "maximum length of 63 characters ... letters, numerals, and the
# hyphen (-) and underscore ('_') characters. An alias string must start with a letter and cannot
# be the string 'latest' or 'NEW'."
_ALIAS = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")
# [RPC] Secret.annotations: keys "between 1 and 63 characters long ... begin and end with an
# alphanumeric character ([a-z0-9A-Z]), and may have dashes (-), underscores (_), dots (.), and
# alphanumerics in between".
_ANNOTATION_KEY = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9._-]{0,61}[a-zA-Z0-9])?")
# UpdateSecret: the fields that are neither output-only nor immutable in [RPC] Secret.
_UPDATABLE = frozenset(
    {
        "labels",
        "annotations",
        "version_aliases",
        "topics",
        "rotation",
        "expire_time",
        "ttl",
        "version_destroy_ttl",
        "customer_managed_encryption",
    }
)


# -- CRC32C (Castagnoli) ----------------------------------------------------------------------
# [INTEGRITY] "the checksum of the secret data must be calculated using the CRC32C algorithm".
# Pure Python: google-crc32c is not a dependency of google-cloud-secret-manager.


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data`` as an unsigned 32-bit integer."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- errors -----------------------------------------------------------------------------------


class RpcError(Exception):
    """A gRPC status to answer with; raised inside the store, turned into ``context.abort``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _bad_name(name: str) -> RpcError:
    # Seen from the real service: "Resource ID [projects/N/secrets/foobar] is not in a valid
    # format." (https://github.com/googleapis/nodejs-secret-manager/issues/74)
    return _invalid(f"Resource ID [{name}] is not in a valid format.")


def _version_not_found(name: str) -> RpcError:
    return RpcError(grpc.StatusCode.NOT_FOUND, f"Secret Version [{name}] not found.")


# -- storage ----------------------------------------------------------------------------------


@dataclass
class _Version:
    number: int
    data: bytes | None
    crc32c: int
    client_checksum: bool
    create_time: datetime
    etag: str
    state: int = State.ENABLED  # a State (proto-plus enums are IntEnums)
    destroy_time: datetime | None = None
    scheduled_destroy_time: datetime | None = None


@dataclass
class _Secret:
    seq: int
    config: resources.Secret  # name, create_time, etag, labels, annotations, ... as returned
    versions: dict[int, _Version] = field(default_factory=dict)
    next_version: int = 1


@dataclass(frozen=True)
class _SecretRef:
    project: str
    location: str | None
    secret_id: str

    @property
    def parent(self) -> str:
        base = f"projects/{self.project}"
        return f"{base}/locations/{self.location}" if self.location else base

    @property
    def name(self) -> str:
        return f"{self.parent}/secrets/{self.secret_id}"


def _now() -> datetime:
    return datetime.now(UTC)


def _copy(secret: resources.Secret) -> resources.Secret:
    copied: resources.Secret = resources.Secret.deserialize(resources.Secret.serialize(secret))
    return copied


class SecretStore:
    """The Secret Manager semantics, independent of gRPC: methods take and return the official
    proto-plus request/response types and raise :class:`RpcError`."""

    def __init__(self, project_numbers: Mapping[str, str] | None = None) -> None:
        self._lock = threading.RLock()
        self._secrets: dict[str, _Secret] = {}
        self._seq = 0
        self._etags = 0
        # The real API answers with the project *number* in names whatever the caller used.
        self._project_numbers = dict(project_numbers or {})

    # -- names ----------------------------------------------------------------------------------

    def _project(self, project: str) -> str:
        return self._project_numbers.get(project, project)

    def _parent(self, parent: str) -> tuple[str, str | None]:
        match = _PARENT.fullmatch(parent or "")
        if not match:
            raise _bad_name(parent)
        return self._project(match[1]), match[2]

    def _secret_ref(self, name: str) -> _SecretRef:
        match = _SECRET.fullmatch(name or "")
        if not match or not _SECRET_ID.fullmatch(match[3]):
            raise _bad_name(name)
        return _SecretRef(self._project(match[1]), match[2], match[3])

    def _version_ref(self, name: str) -> tuple[_SecretRef, str]:
        match = _VERSION.fullmatch(name or "")
        if not match or not _SECRET_ID.fullmatch(match[3]):
            raise _bad_name(name)
        return _SecretRef(self._project(match[1]), match[2], match[3]), match[4]

    def _etag(self) -> str:
        # [ETAGS] etags are quoted strings ("ETags must include the surrounding quotes").
        self._etags += 1
        return f'"{time.time_ns():x}{self._etags:06x}"'

    # -- lookups --------------------------------------------------------------------------------

    def _get_secret(self, ref: _SecretRef) -> _Secret:
        stored = self._secrets.get(ref.name)
        if stored is not None and self._expired(stored):
            # [RPC] Secret.expire_time: the time the secret "is scheduled to expire"; an expired
            # secret is deleted with its versions.
            del self._secrets[ref.name]
            stored = None
        if stored is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"Secret [{ref.name}] not found.")
        return stored

    @staticmethod
    def _expired(stored: _Secret) -> bool:
        return "expire_time" in stored.config and stored.config.expire_time <= _now()

    def _resolve_version(
        self, ref: _SecretRef, version_id: str, *, aliases: bool
    ) -> tuple[_Secret, _Version]:
        stored = self._get_secret(ref)
        if version_id == "latest" and aliases:
            # [RPC] GetSecretVersionRequest.name / [ACCESS]: "projects/*/secrets/*/versions/latest
            # is an alias to the most recently created SecretVersion" -- whatever its state.
            if not stored.versions:
                raise RpcError(
                    grpc.StatusCode.NOT_FOUND, f"Secret [{ref.name}] not found or has no versions."
                )
            return stored, self._settle(stored.versions[max(stored.versions)])
        if version_id.isdigit():
            number = int(version_id)
        elif aliases and version_id in stored.config.version_aliases:
            # [RPC] Secret.version_aliases: "Access by alias is only be supported on
            # GetSecretVersion and AccessSecretVersion."
            number = int(stored.config.version_aliases[version_id])
        elif aliases and _ALIAS.fullmatch(version_id):
            raise _version_not_found(f"{ref.name}/versions/{version_id}")
        else:
            raise _bad_name(f"{ref.name}/versions/{version_id}")
        version = stored.versions.get(number)
        if version is None:
            raise _version_not_found(f"{ref.name}/versions/{number}")
        return stored, self._settle(version)

    @staticmethod
    def _settle(version: _Version) -> _Version:
        """Carry out a delayed destruction whose time has come ([DELAY])."""
        when = version.scheduled_destroy_time
        if when is not None and when <= _now():
            version.state = State.DESTROYED
            version.data = None
            version.destroy_time = when
            version.scheduled_destroy_time = None
        return version

    def _version_proto(
        self, ref: _SecretRef, stored: _Secret, version: _Version
    ) -> resources.SecretVersion:
        proto = resources.SecretVersion(
            name=f"{ref.name}/versions/{version.number}",
            create_time=version.create_time,
            state=version.state,
            etag=version.etag,
            client_specified_payload_checksum=version.client_checksum,
        )
        # [RPC] SecretVersion.replication_status mirrors the secret's replication policy.
        policy = stored.config.replication
        kind = resources.Replication.pb(policy).WhichOneof("replication")
        if kind == "automatic":
            proto.replication_status = resources.ReplicationStatus(automatic={})
        elif kind == "user_managed":
            replicas = [{"location": r.location} for r in policy.user_managed.replicas]
            proto.replication_status = resources.ReplicationStatus(
                user_managed={"replicas": replicas}
            )
        if version.destroy_time is not None:
            # [RPC] SecretVersion.destroy_time: "Only present if state is DESTROYED."
            proto.destroy_time = version.destroy_time
        if version.scheduled_destroy_time is not None:
            proto.scheduled_destroy_time = version.scheduled_destroy_time
        return proto

    # -- validation -----------------------------------------------------------------------------

    @staticmethod
    def _check_labels(labels: Mapping[str, str]) -> None:
        # [RPC] Secret.labels: keys match [\p{Ll}\p{Lo}][\p{Ll}\p{Lo}\p{N}_-]{0,62}, values
        # [\p{Ll}\p{Lo}\p{N}_-]{0,63}, each at most 128 bytes of UTF-8, at most 64 labels.
        if len(labels) > MAX_LABELS:
            raise _invalid(f"At most {MAX_LABELS} labels may be assigned to a secret.")
        for key, value in labels.items():
            ok_key = (
                0 < len(key) <= 63
                and unicodedata.category(key[0]) in {"Ll", "Lo"}
                and all(_label_char(c) for c in key[1:])
            )
            ok_value = len(value) <= 63 and all(_label_char(c) for c in value)
            if not ok_key or len(key.encode()) > 128:
                raise _invalid(f"Invalid label key [{key}].")
            if not ok_value or len(value.encode()) > 128:
                raise _invalid(f"Invalid value [{value}] for label [{key}].")

    @staticmethod
    def _check_annotations(annotations: Mapping[str, str]) -> None:
        total = 0
        for key, value in annotations.items():
            if not _ANNOTATION_KEY.fullmatch(key) or len(key.encode()) > 128:
                raise _invalid(f"Invalid annotation key [{key}].")
            total += len(key.encode()) + len(value.encode())
        if total >= MAX_ANNOTATIONS_BYTES:
            raise _invalid("The total size of annotation keys and values must be less than 16KiB.")

    @staticmethod
    def _check_aliases(aliases: Mapping[str, int], stored: _Secret | None) -> None:
        if len(aliases) > MAX_ALIASES:
            raise _invalid(f"At most {MAX_ALIASES} version aliases may be assigned to a secret.")
        for alias, number in aliases.items():
            if not _ALIAS.fullmatch(alias) or alias in {"latest", "NEW"}:
                raise _invalid(f"Invalid version alias [{alias}].")
            if stored is None or number not in stored.versions:
                # Not in the docs: an alias must name an existing version of this secret.
                raise _invalid(f"Version alias [{alias}] refers to a version that does not exist.")

    def _apply_expiration(self, target: resources.Secret, source: resources.Secret) -> None:
        # [RPC] Secret.ttl is "Input only"; expire_time "is always provided on output".
        if "ttl" in source:
            target.expire_time = _now() + source.ttl
        elif "expire_time" in source:
            target.expire_time = source.expire_time
        else:
            del target.expire_time

    # -- secrets --------------------------------------------------------------------------------

    def create_secret(self, request: service.CreateSecretRequest) -> resources.Secret:
        project, location = self._parent(request.parent)
        if not _SECRET_ID.fullmatch(request.secret_id):
            # [RPC] CreateSecretRequest.secret_id format (see _SECRET_ID).
            raise _invalid(f"Secret ID [{request.secret_id}] is not in a valid format.")
        ref = _SecretRef(project, location, request.secret_id)
        given = request.secret if "secret" in request else resources.Secret()
        replication = resources.Replication.pb(given.replication).WhichOneof("replication")
        if location is None and replication is None:
            # Seen from the real service for global secrets (module docstring).
            raise _invalid("Secret.replication must be provided.")
        if location is not None and "replication" in given:
            # Seen from the real service for regional secrets (module docstring).
            raise _invalid("Secret.replication should not be provided.")
        self._check_labels(given.labels)
        self._check_annotations(given.annotations)
        if given.version_aliases:
            self._check_aliases(given.version_aliases, None)
        with self._lock:
            existing = self._secrets.get(ref.name)
            if existing is not None and not self._expired(existing):
                # [AIP-193] / AIP-133: creating a resource that exists is ALREADY_EXISTS (409).
                raise RpcError(
                    grpc.StatusCode.ALREADY_EXISTS, f"Secret [{ref.name}] already exists."
                )
            config = _copy(given)
            config.name = ref.name
            config.create_time = _now()
            # [ETAGS] "Resource ETags are generated at resource creation".
            config.etag = self._etag()
            self._apply_expiration(config, given)
            del config.ttl
            del config.tags  # [RPC] Secret.tags: "Input only."
            self._seq += 1
            self._secrets[ref.name] = _Secret(seq=self._seq, config=config)
            return _copy(config)

    def get_secret(self, request: service.GetSecretRequest) -> resources.Secret:
        ref = self._secret_ref(request.name)
        with self._lock:
            return _copy(self._get_secret(ref).config)

    def update_secret(self, request: service.UpdateSecretRequest) -> resources.Secret:
        if "secret" not in request:
            raise _invalid("Field [secret] is required.")
        given = request.secret
        ref = self._secret_ref(given.name)
        paths = list(request.update_mask.paths) if "update_mask" in request else []
        if not paths:
            # [RPC] UpdateSecretRequest.update_mask: "Required."
            raise _invalid("Field [update_mask] is required.")
        for path in paths:
            if path not in _UPDATABLE:
                raise _invalid(f"Field [{path}] cannot be updated.")
        with self._lock:
            stored = self._get_secret(ref)
            if given.etag and given.etag != stored.config.etag:
                # [ETAGS] "In a secrets.patch request, the request ETag is embedded in the Secret
                # data." "If an ETag is provided and matches the current resource ETag, the
                # request succeeds; otherwise, it fails with a FAILED_PRECONDITION error and an
                # HTTP status code 400."
                raise RpcError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"The etag provided [{given.etag}] does not match the etag of Secret "
                    f"[{ref.name}].",
                )
            config = _copy(stored.config)
            for path in paths:
                self._update_field(config, given, path, stored)
            # [ETAGS] the etag is "updated for each of the above-listed modification requests",
            # "Even when an update doesn't change a resource's state".
            config.etag = self._etag()
            stored.config = config
            return _copy(config)

    def _update_field(
        self, config: resources.Secret, given: resources.Secret, path: str, stored: _Secret
    ) -> None:
        if path == "labels":
            self._check_labels(given.labels)
        elif path == "annotations":
            self._check_annotations(given.annotations)
        elif path == "version_aliases":
            self._check_aliases(given.version_aliases, stored)
        if path in {"expire_time", "ttl"}:
            self._apply_expiration(config, given)
            return
        if path in given:
            setattr(config, path, getattr(given, path))
        else:
            delattr(config, path)

    def delete_secret(self, request: service.DeleteSecretRequest) -> empty_pb2.Empty:
        ref = self._secret_ref(request.name)
        with self._lock:
            stored = self._get_secret(ref)
            if request.etag and request.etag != stored.config.etag:
                # [RPC] DeleteSecretRequest.etag: "The request succeeds if it matches the etag of
                # the currently stored secret object"; [ETAGS]: otherwise FAILED_PRECONDITION.
                raise RpcError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"The etag provided [{request.etag}] does not match the etag of Secret "
                    f"[{ref.name}].",
                )
            del self._secrets[ref.name]
        return empty_pb2.Empty()

    def list_secrets(self, request: service.ListSecretsRequest) -> service.ListSecretsResponse:
        project, location = self._parent(request.parent)
        parent = _SecretRef(project, location, "x").parent
        predicate = compile_filter(request.filter, _secret_field)
        with self._lock:
            candidates = []
            for stored in list(self._secrets.values()):
                ref = self._secret_ref(stored.config.name)
                if ref.parent != parent:
                    continue
                if self._expired(stored):
                    del self._secrets[ref.name]
                    continue
                candidates.append((stored.seq, _copy(stored.config)))
        # [RPC] ListSecretsResponse.secrets: "sorted in reverse by create_time (newest first)".
        candidates.sort(key=lambda item: item[0], reverse=True)
        matching = [(seq, s) for seq, s in candidates if predicate(s)]
        page, token = _page(matching, request, scope=f"{parent}|{request.filter}")
        return service.ListSecretsResponse(
            secrets=page,
            next_page_token=token,
            # [RPC] total_size: "The total number of Secrets but 0 when the filter field is set."
            total_size=0 if request.filter else len(matching),
        )

    # -- versions -------------------------------------------------------------------------------

    def add_secret_version(
        self, request: service.AddSecretVersionRequest
    ) -> resources.SecretVersion:
        ref = self._secret_ref(request.parent)
        payload = request.payload if "payload" in request else None
        if payload is None or not payload.data:
            # Seen from the real service (module docstring): a missing or empty payload is
            # refused with 400 "Field [payload] is required."
            raise _invalid("Field [payload] is required.")
        if len(payload.data) > MAX_PAYLOAD_BYTES:
            # [RPC] SecretPayload.data: "Must be no larger than 64KiB."
            raise _invalid(f"Secret payload data must be no larger than {MAX_PAYLOAD_BYTES} bytes.")
        actual = crc32c(payload.data)
        client_checksum = "data_crc32c" in payload
        if client_checksum and payload.data_crc32c != actual:
            # [RPC] SecretPayload.data_crc32c: "If specified, SecretManagerService will verify the
            # integrity of the received data on SecretManagerService.AddSecretVersion calls using
            # the crc32c checksum"; the code for a failed check is not documented: INVALID_ARGUMENT
            # is [AIP-193]'s code for a request that is wrong whatever the system state.
            raise _invalid(
                "Checksum mismatch: the data_crc32c given does not match the CRC32C of the data."
            )
        with self._lock:
            stored = self._get_secret(ref)
            # [RPC] SecretVersion.name: "SecretVersion IDs in a Secret start at 1 and are
            # incremented for each subsequent version of the secret." Never reused.
            number = stored.next_version
            stored.next_version += 1
            version = _Version(
                number=number,
                data=bytes(payload.data),
                # [RPC] data_crc32c: "If a checksum is not provided in the AddSecretVersion
                # request, the SecretManagerService will generate and store one for you."
                crc32c=actual,
                # [RPC] SecretVersion.client_specified_payload_checksum: "True if payload checksum
                # specified in SecretPayload object has been received".
                client_checksum=client_checksum,
                create_time=_now(),
                # [ETAGS] etags are generated at "projects.secrets.addVersion".
                etag=self._etag(),
            )
            stored.versions[number] = version
            return self._version_proto(ref, stored, version)

    def get_secret_version(
        self, request: service.GetSecretVersionRequest
    ) -> resources.SecretVersion:
        ref, version_id = self._version_ref(request.name)
        with self._lock:
            stored, version = self._resolve_version(ref, version_id, aliases=True)
            return self._version_proto(ref, stored, version)

    def access_secret_version(
        self, request: service.AccessSecretVersionRequest
    ) -> service.AccessSecretVersionResponse:
        ref, version_id = self._version_ref(request.name)
        with self._lock:
            _, version = self._resolve_version(ref, version_id, aliases=True)
            name = f"{ref.name}/versions/{version.number}"
            if version.state != State.ENABLED:
                # [RPC] State.DISABLED: "may not be accessed"; State.DESTROYED: "the secret data is
                # no longer stored"; [DISABLE]: "You won't be able to access a secret version
                # after you have disabled the version." The real service answers
                # FAILED_PRECONDITION "Secret Version [.../versions/4] is in DESTROYED state."
                # (module docstring) -- also through ``latest``, which never skips a version.
                raise RpcError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Secret Version [{name}] is in {State(version.state).name} state.",
                )
            data = version.data or b""
            checksum = version.crc32c
        # [INTEGRITY] "When the secret version is accessed, the returned SecretPayload contains
        # the data along with its checksum." The name is the resolved version, not the alias.
        return service.AccessSecretVersionResponse(
            name=name, payload=resources.SecretPayload(data=data, data_crc32c=checksum)
        )

    def list_secret_versions(
        self, request: service.ListSecretVersionsRequest
    ) -> service.ListSecretVersionsResponse:
        ref = self._secret_ref(request.parent)
        predicate = compile_filter(request.filter, _version_field)
        with self._lock:
            stored = self._get_secret(ref)
            protos = [
                (number, self._version_proto(ref, stored, self._settle(version)))
                for number, version in stored.versions.items()
            ]
        # [RPC] ListSecretVersionsResponse.versions: "sorted in reverse by create_time (newest
        # first)"; a larger number is always a later creation.
        protos.sort(key=lambda item: item[0], reverse=True)
        matching = [(n, v) for n, v in protos if predicate(v)]
        page, token = _page(matching, request, scope=f"{ref.name}|{request.filter}")
        return service.ListSecretVersionsResponse(
            versions=page,
            next_page_token=token,
            total_size=0 if request.filter else len(matching),
        )

    def _transition(
        self,
        name: str,
        etag: str,
        change: Callable[[_Secret, _Version], None],
    ) -> resources.SecretVersion:
        ref, version_id = self._version_ref(name)
        with self._lock:
            # Aliases (and ``latest``) are documented for Get and Access only ([RPC]
            # Secret.version_aliases); state changes take a version number.
            stored, version = self._resolve_version(ref, version_id, aliases=False)
            full_name = f"{ref.name}/versions/{version.number}"
            if etag and etag != version.etag:
                # [RPC] {Enable,Disable,Destroy}SecretVersionRequest.etag: "The request succeeds
                # if it matches the etag of the currently stored secret version object";
                # [ETAGS]: otherwise "it fails with a FAILED_PRECONDITION error".
                raise RpcError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"The etag provided [{etag}] does not match the etag of Secret Version "
                    f"[{full_name}].",
                )
            if version.state == State.DESTROYED:
                # [RPC] State.DESTROYED: "A version may not leave this state once entered."
                raise RpcError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Secret Version [{full_name}] is in DESTROYED state.",
                )
            change(stored, version)
            # [ETAGS] "Even when an update doesn't change a resource's state, it still updates
            # the resource ETag"; "updating a secret version doesn't affect the secret ETag".
            version.etag = self._etag()
            return self._version_proto(ref, stored, version)

    def enable_secret_version(
        self, request: service.EnableSecretVersionRequest
    ) -> resources.SecretVersion:
        def enable(_: _Secret, version: _Version) -> None:
            # [DELAY] enabling (or disabling) a version cancels its scheduled destruction.
            version.state = State.ENABLED
            version.scheduled_destroy_time = None

        return self._transition(request.name, request.etag, enable)

    def disable_secret_version(
        self, request: service.DisableSecretVersionRequest
    ) -> resources.SecretVersion:
        def disable(_: _Secret, version: _Version) -> None:
            version.state = State.DISABLED
            version.scheduled_destroy_time = None

        return self._transition(request.name, request.etag, disable)

    def destroy_secret_version(
        self, request: service.DestroySecretVersionRequest
    ) -> resources.SecretVersion:
        def destroy(stored: _Secret, version: _Version) -> None:
            config = stored.config
            ttl = config.version_destroy_ttl if "version_destroy_ttl" in config else None
            if ttl:
                # [RPC] Secret.version_destroy_ttl: "For secret with TTL>0, version destruction
                # doesn't happen immediately on calling destroy instead the version goes to a
                # disabled state and destruction happens after the TTL expires."
                version.state = State.DISABLED
                version.scheduled_destroy_time = _now() + ttl
                return
            # [RPC] DestroySecretVersion: "Sets the state of the SecretVersion to DESTROYED and
            # irrevocably destroys the secret data."
            version.state = State.DESTROYED
            version.data = None
            version.destroy_time = _now()

        return self._transition(request.name, request.etag, destroy)


def _label_char(char: str) -> bool:
    return char in "_-" or unicodedata.category(char) in {"Ll", "Lo", "Nd", "Nl", "No"}


# -- paging -------------------------------------------------------------------------------------


def _page(items: list[tuple[int, Any]], request: Any, *, scope: str) -> tuple[list[Any], str]:
    """One page of ``items`` (sorted by descending key), and the token for the next.

    The token is a cursor (the last key returned), so items created while a caller pages do not
    shift later pages. [AIP-158]: a token is only valid with the request that produced it.
    """
    if request.page_size < 0:
        raise _invalid("page_size must not be negative.")
    # [RPC] page_size: "If set to 0, the server decides the number of results to return. If the
    # number is greater than 25000, it is capped at 25000."
    size = min(request.page_size or MAX_PAGE_SIZE, MAX_PAGE_SIZE)
    digest = hashlib.sha256(scope.encode()).hexdigest()[:16]
    if request.page_token:
        try:
            raw = json.loads(base64.urlsafe_b64decode(request.page_token.encode()))
            cursor, token_scope = int(raw["after"]), raw["scope"]
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise _invalid("Invalid page_token.") from None
        if token_scope != digest:
            raise _invalid("The page_token does not belong to this request.")
        items = [item for item in items if item[0] < cursor]
    page = items[:size]
    token = ""
    if len(items) > size:
        state = {"after": page[-1][0], "scope": digest}
        token = base64.urlsafe_b64encode(json.dumps(state).encode()).decode()
    return [value for _, value in page], token


# -- filtering ------------------------------------------------------------------------------------
# [FILTER] "The API uses a simple language for referring to the fields in the object that is
# being filtered", with examples ``name:mysecret``, ``labels.environment=production``,
# ``create_time<2021-01-01T06:00:00Z AND create_time>2021-01-01T12:00:00Z``,
# ``name:asecret OR name:bsecret``; "Regex is not supported in the API." The grammar is
# [AIP-160]'s: juxtaposition or AND, OR (binding tighter than AND), NOT or ``-``, parentheses,
# and the comparators ``: = != < <= > >=``. Supported fields: for secrets ``name``, ``create_time``,
# ``expire_time``, ``labels.KEY``, ``annotations.KEY``; for versions ``name``, ``state``,
# ``create_time``, ``destroy_time``. Any other field is INVALID_ARGUMENT.

Predicate = Callable[[Any], bool]
FieldGetter = Callable[[Any, str], Any]


def _secret_field(secret: resources.Secret, path: str) -> Any:
    if path == "name":
        return secret.name
    if path in {"create_time", "expire_time"}:
        return getattr(secret, path) if path in secret else None
    head, _, key = path.partition(".")
    if head in {"labels", "annotations"} and key:
        return getattr(secret, head).get(key)
    raise _invalid(f"Invalid filter: unknown field [{path}].")


def _version_field(version: resources.SecretVersion, path: str) -> Any:
    if path == "name":
        return version.name
    if path == "state":
        return version.state
    if path in {"create_time", "destroy_time"}:
        return getattr(version, path) if path in version else None
    raise _invalid(f"Invalid filter: unknown field [{path}].")


_COMPARATORS = ("!=", "<=", ">=", ":", "=", "<", ">")


class _FilterParser:
    def __init__(self, text: str, getter: FieldGetter) -> None:
        self.text = text
        self.pos = 0
        self.getter = getter

    def fail(self, why: str) -> RpcError:
        return _invalid(f"Invalid filter [{self.text}]: {why} at offset {self.pos}.")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek_word(self) -> str:
        self.skip_space()
        match = re.compile(r"[^\s()]+").match(self.text, self.pos)
        return match.group() if match else ""

    def at_end(self) -> bool:
        self.skip_space()
        return self.pos >= len(self.text)

    def parse(self) -> Predicate:
        if self.at_end():
            return lambda _: True
        predicate = self.parse_and()
        if not self.at_end():
            raise self.fail("unexpected text")
        return predicate

    def parse_and(self) -> Predicate:
        terms = [self.parse_or()]
        while not self.at_end() and self.text[self.pos] != ")":
            if self.peek_word() == "AND":
                self.pos += 3
            terms.append(self.parse_or())
        return lambda item: all(term(item) for term in terms)

    def parse_or(self) -> Predicate:
        terms = [self.parse_unary()]
        while self.peek_word() == "OR":
            self.pos += 2
            terms.append(self.parse_unary())
        return lambda item: any(term(item) for term in terms)

    def parse_unary(self) -> Predicate:
        self.skip_space()
        negate = False
        if self.peek_word() == "NOT":
            self.pos += 3
            negate = True
        elif self.text.startswith("-", self.pos):
            self.pos += 1
            negate = True
        inner = self.parse_primary()
        return (lambda item: not inner(item)) if negate else inner

    def parse_primary(self) -> Predicate:
        self.skip_space()
        if self.text.startswith("(", self.pos):
            self.pos += 1
            inner = self.parse_and()
            self.skip_space()
            if not self.text.startswith(")", self.pos):
                raise self.fail("missing ')'")
            self.pos += 1
            return inner
        return self.parse_restriction()

    def parse_restriction(self) -> Predicate:
        match = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*").match(self.text, self.pos)
        if not match:
            raise self.fail("expected a field name")
        path = match.group()
        self.pos = match.end()
        self.skip_space()
        op = next((c for c in _COMPARATORS if self.text.startswith(c, self.pos)), None)
        if op is None:
            raise self.fail("expected a comparator (: = != < <= > >=)")
        self.pos += len(op)
        self.skip_space()
        value = self.parse_value()
        getter = self.getter
        getter(_PROBES[getter], path)  # reject unknown fields now, not per item
        return lambda item: _compare(getter(item, path), op, value, self)

    def parse_value(self) -> str:
        if self.text.startswith('"', self.pos):
            end = self.text.find('"', self.pos + 1)
            if end < 0:
                raise self.fail("unterminated string")
            value = self.text[self.pos + 1 : end]
            self.pos = end + 1
            return value
        match = re.compile(r"[^\s()]+").match(self.text, self.pos)
        if not match:
            raise self.fail("expected a value")
        self.pos = match.end()
        return match.group()


_PROBES: dict[Any, Any] = {
    _secret_field: resources.Secret(),
    _version_field: resources.SecretVersion(),
}


def _parse_time(value: str, parser: _FilterParser) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise parser.fail(f"[{value}] is not an RFC 3339 timestamp") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _compare(actual: Any, op: str, value: str, parser: _FilterParser) -> bool:
    if op == ":" and value == "*":
        return actual not in (None, "")  # presence
    if actual is None:
        return op == "!="
    if isinstance(actual, State):
        if op not in {":", "=", "!="}:
            raise parser.fail(f"'{op}' does not apply to state")
        return bool(actual.name == value.upper()) == (op != "!=")
    if isinstance(actual, datetime):
        return _ordered(actual, "=" if op == ":" else op, _parse_time(value, parser))
    return _compare_text(str(actual), op, value)


def _compare_text(text: str, op: str, value: str) -> bool:
    if op == ":":
        # [FILTER] ``name:mysecret`` is "Secrets whose name contains the "mysecret" substring";
        # ``*`` matches any run of characters.
        pattern = ".*".join(re.escape(part) for part in value.split("*"))
        return re.search(pattern, text) is not None
    if op in {"=", "!="}:
        # A name also equals its last segment: ``name=my-secret``, ``name=3``.
        equal = value in {text, text.rsplit("/", 1)[-1]}
        return equal == (op == "=")
    return _ordered(text, op, value)


def _ordered(actual: Any, op: str, value: Any) -> bool:
    return bool(
        {
            "=": actual == value,
            "!=": actual != value,
            "<": actual < value,
            "<=": actual <= value,
            ">": actual > value,
            ">=": actual >= value,
        }[op]
    )


def compile_filter(text: str, getter: FieldGetter) -> Predicate:
    return _FilterParser(text or "", getter).parse()


# -- gRPC server ----------------------------------------------------------------------------------

_METHODS: dict[str, tuple[str, Any, Any]] = {
    # method: (store attribute, request type, response serializer)
    "CreateSecret": ("create_secret", service.CreateSecretRequest, resources.Secret.serialize),
    "GetSecret": ("get_secret", service.GetSecretRequest, resources.Secret.serialize),
    "UpdateSecret": ("update_secret", service.UpdateSecretRequest, resources.Secret.serialize),
    "DeleteSecret": (
        "delete_secret",
        service.DeleteSecretRequest,
        empty_pb2.Empty.SerializeToString,
    ),
    "ListSecrets": (
        "list_secrets",
        service.ListSecretsRequest,
        service.ListSecretsResponse.serialize,
    ),
    "AddSecretVersion": (
        "add_secret_version",
        service.AddSecretVersionRequest,
        resources.SecretVersion.serialize,
    ),
    "GetSecretVersion": (
        "get_secret_version",
        service.GetSecretVersionRequest,
        resources.SecretVersion.serialize,
    ),
    "AccessSecretVersion": (
        "access_secret_version",
        service.AccessSecretVersionRequest,
        service.AccessSecretVersionResponse.serialize,
    ),
    "ListSecretVersions": (
        "list_secret_versions",
        service.ListSecretVersionsRequest,
        service.ListSecretVersionsResponse.serialize,
    ),
    "EnableSecretVersion": (
        "enable_secret_version",
        service.EnableSecretVersionRequest,
        resources.SecretVersion.serialize,
    ),
    "DisableSecretVersion": (
        "disable_secret_version",
        service.DisableSecretVersionRequest,
        resources.SecretVersion.serialize,
    ),
    "DestroySecretVersion": (
        "destroy_secret_version",
        service.DestroySecretVersionRequest,
        resources.SecretVersion.serialize,
    ),
}


#: The IAM permission each method needs [PERMS].
PERMISSIONS = {
    "CreateSecret": "secretmanager.secrets.create",
    "GetSecret": "secretmanager.secrets.get",
    "UpdateSecret": "secretmanager.secrets.update",
    "DeleteSecret": "secretmanager.secrets.delete",
    "ListSecrets": "secretmanager.secrets.list",
    "AddSecretVersion": "secretmanager.versions.add",
    "GetSecretVersion": "secretmanager.versions.get",
    "AccessSecretVersion": "secretmanager.versions.access",
    "ListSecretVersions": "secretmanager.versions.list",
    "EnableSecretVersion": "secretmanager.versions.enable",
    "DisableSecretVersion": "secretmanager.versions.disable",
    "DestroySecretVersion": "secretmanager.versions.destroy",
}
#: The request header naming the test principal (see the module docstring, IAM).
PRINCIPAL_HEADER = "x-test-principal"


class _Principal(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds :data:`PRINCIPAL_HEADER` to every call."""

    def __init__(self, name: str) -> None:
        self.name = name

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), (PRINCIPAL_HEADER, self.name)]
        return continuation(details._replace(metadata=metadata), request)


def make_client(
    address: str, principal: str | None = None
) -> secretmanager_v1.SecretManagerServiceClient:
    """The official client over an insecure channel to ``address`` (``host:port``), calling
    as ``principal`` when one is given (see the module docstring, IAM).

    The credentials go to the transport: the client refuses ``credentials=`` together with a
    transport instance ("When providing a transport instance, provide its credentials
    directly."), and the transport ignores them when given a channel.
    """
    channel = grpc.insecure_channel(address)
    if principal is not None:
        channel = grpc.intercept_channel(channel, _Principal(principal))
    transport = SecretManagerServiceGrpcTransport(
        channel=channel, credentials=AnonymousCredentials()
    )
    return secretmanager_v1.SecretManagerServiceClient(transport=transport)


def _resource_of(request: Any) -> str:
    for field_name in ("name", "parent"):
        value = getattr(request, field_name, "")
        if value:
            return str(value)
    secret = getattr(request, "secret", None)
    return str(getattr(secret, "name", "") or "")


class SecretManagerTestServer(GrpcTestServer):
    """The gRPC server around a :class:`SecretStore`; ``start()`` binds a free port of
    127.0.0.1. Counts calls per method (failed calls included) in :attr:`calls`."""

    service = SERVICE

    def __init__(
        self,
        *,
        port: int = 0,
        project_numbers: Mapping[str, str] | None = None,
        max_workers: int = 16,
    ) -> None:
        super().__init__(port=port, max_workers=max_workers)
        self.store = SecretStore(project_numbers)
        self._calls: collections.Counter[str] = collections.Counter()
        self._calls_lock = threading.Lock()
        #: Called as ``observer(method, request, response)`` after every successful call, in
        #: the handler thread (the fault suite times when each answer first reached a write).
        self.observers: list[Callable[[str, Any, Any], None]] = []
        #: Restricted principals and the permissions each holds (:meth:`restrict`).
        self._granted: dict[str, frozenset[str]] = {}

    def restrict(self, principal: str, permissions: set[str] | frozenset[str]) -> None:
        """From now on ``principal`` may only use methods whose permission is in
        ``permissions`` (:data:`PERMISSIONS`); the rest answer PERMISSION_DENIED."""
        unknown = set(permissions) - set(PERMISSIONS.values())
        if unknown:
            raise ValueError(f"unknown permissions: {sorted(unknown)}")
        self._granted[principal] = frozenset(permissions)

    @property
    def calls(self) -> collections.Counter[str]:
        """A snapshot of the calls received so far, by method name (``AccessSecretVersion``)."""
        with self._calls_lock:
            return collections.Counter(self._calls)

    def reset_calls(self) -> None:
        with self._calls_lock:
            self._calls.clear()

    def _handler(self, method: str, attribute: str) -> Callable[[Any, grpc.ServicerContext], Any]:
        implementation = getattr(self.store, attribute)

        permission = PERMISSIONS[method]

        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            with self._calls_lock:
                self._calls[method] += 1
            principal = dict(context.invocation_metadata()).get(PRINCIPAL_HEADER)
            granted = self._granted.get(principal) if principal is not None else None
            if granted is not None and permission not in granted:
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"Permission '{permission}' denied for resource "
                    f"'{_resource_of(request)}' (or it may not exist).",
                )
            try:
                response = implementation(request)
            except RpcError as error:
                context.abort(error.code, error.message)
            for observer in self.observers:
                observer(method, request, response)
            return response

        return handle

    def _methods(self) -> dict[str, UnaryMethod]:
        return {
            method: UnaryMethod(
                self._handler(method, attribute), request_type.deserialize, serializer
            )
            for method, (attribute, request_type, serializer) in _METHODS.items()
        }

    def client(self, principal: str | None = None) -> secretmanager_v1.SecretManagerServiceClient:
        """The official client, connected to this server (as ``principal``, when given);
        closed by :meth:`stop`."""
        return self._connect(lambda address: make_client(address, principal), _close_client)


def _close_client(client: secretmanager_v1.SecretManagerServiceClient) -> None:
    with contextlib.suppress(Exception):
        client.transport.close()


def serve_stats(server: SecretManagerTestServer, port: int = 0) -> http.server.HTTPServer:
    """A plain-HTTP side endpoint on 127.0.0.1 for another process to read the call counters:
    ``GET /stats`` answers ``{"calls": {method: n}, "cpu_seconds": s, "uptime_seconds": s}``,
    ``POST /stats/reset`` zeroes the calls. Serves from a daemon thread; ``shutdown()`` stops it.
    """
    started = time.monotonic()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, body: dict[str, Any], status: int = 200) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path != "/stats":
                self._answer({"error": "not found"}, 404)
                return
            cpu = os.times()
            self._answer(
                {
                    "calls": dict(server.calls),
                    "cpu_seconds": cpu.user + cpu.system,
                    "uptime_seconds": time.monotonic() - started,
                }
            )

        def do_POST(self) -> None:
            if self.path != "/stats/reset":
                self._answer({"error": "not found"}, 404)
                return
            server.reset_calls()
            self._answer({"ok": True})

        def log_message(self, *_: Any) -> None:  # no access log on stderr
            return

    stats = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=stats.serve_forever, name="stats", daemon=True).start()
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = standalone_parser("A local Secret Manager v1 gRPC server.")
    parser.add_argument(
        "--stats-port",
        type=int,
        default=None,
        help="also serve GET /stats (calls per method, CPU) over HTTP here (0: a free one)",
    )
    parser.add_argument(
        "--project-number",
        action="append",
        default=[],
        metavar="ID=NUMBER",
        help="answer with projects/NUMBER for requests naming projects/ID (repeatable)",
    )
    args = parser.parse_args(argv)
    numbers = dict(item.split("=", 1) for item in args.project_number)
    server = SecretManagerTestServer(
        port=args.port, project_numbers=numbers, max_workers=args.max_workers
    ).start()
    stats = serve_stats(server, args.stats_port) if args.stats_port is not None else None
    ready = f"READY {server.address}"
    if stats is not None:
        ready += f" STATS 127.0.0.1:{stats.server_address[1]}"
    announce_and_wait(ready)
    if stats is not None:
        stats.shutdown()
        stats.server_close()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
