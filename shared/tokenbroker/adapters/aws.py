"""Credentials in AWS Secrets Manager: one secret per connection, one version per refresh.

Layout
------
* Secret ``{prefix}{connection_id}``, tagged ``managed-by=tokenbroker`` and
  ``connection={connection_id}``, encrypted with ``kms_key_id`` (or the account's
  ``aws/secretsmanager`` key).
* Version *n* has the ``VersionId`` :func:`version_token` ``(connection_id, n)``. Secrets
  Manager uses the ``ClientRequestToken`` of ``PutSecretValue`` as the ``VersionId``, so
  version *n* is one ``GetSecretValue(VersionId=...)`` away, and a retried write (by
  botocore after a timeout, or by us after a crash) is idempotent: "If you call this
  operation with a ClientRequestToken that matches an existing version's VersionId, and you
  specify the same secret data, the operation succeeds but does nothing. However, if the
  secret data is different, then the operation fails"
  (https://docs.aws.amazon.com/secretsmanager/latest/apireference/API_PutSecretValue.html).
  That failure is the compare-and-set: two writers that both saw version *n* both ask for
  the id of *n + 1*, and only the first one's data is stored.
* The value is a JSON envelope ``{"schema", "v": n, "sha256": ..., "credential": base64}``
  of :meth:`Credential.to_plaintext`; the digest is checked, and ``v`` must match the
  ``VersionId``, on every read. A mismatch raises :class:`CorruptCredential`. The envelope
  is a pure function of (credential, n): no timestamps, so a retry sends identical data.

Staging labels
--------------
* ``AWSCURRENT``: the current version; ``AWSPREVIOUS``: the one before (moved by Secrets
  Manager itself whenever ``AWSCURRENT`` moves).
* ``AWSPENDING``: a version written but not yet promoted (rotation in progress).
* ``tokenbroker-latest``: the newest version written, promoted or not. Reads start from it,
  so one ``GetSecretValue`` both answers and detects an unfinished rotation (the version it
  names lacks ``AWSCURRENT``).
* ``tokenbroker-retain-{n mod r}-of-{r}`` (``r = retained_versions``): a ring of *r* labels.
  Each write attaches label ``n mod r`` to version *n*; ``PutSecretValue`` moves a label
  that is already attached elsewhere, so the same atomic call takes it from version
  *n - r*, which then carries no label and is *deprecated*: Secrets Manager deletes
  deprecated versions by itself once a secret has more than 100 versions, keeping those
  younger than 24 hours (https://docs.aws.amazon.com/secretsmanager/latest/userguide/reference_limits.html).
  A version is readable while it carries a retain label (or ``AWSCURRENT``). With ``r = 1``
  the old version also loses ``AWSPREVIOUS``, so nothing but the current one is kept.
* ``tokenbroker-next-{m:012d}``, on the current version only: the next version is numbered
  *m*, not current + 1 -- the numbers between belong to versions that were discarded (see
  *crash safety*), whose VersionIds are spent for good. The port allows such gaps.

A put is AWS's documented rotation (https://docs.aws.amazon.com/secretsmanager/latest/userguide/rotate-secrets_how.html),
driven here rather than by a Lambda (``RotateSecret`` is for Lambda-driven rotation):

1. read ``tokenbroker-latest``: it must be the current version, numbered ``expected_version``;
2. **createSecret**: ``PutSecretValue`` of version *n + 1* with ``AWSPENDING``,
   ``tokenbroker-latest`` and its retain label;
3. **testSecret**: read ``AWSPENDING`` back by version id and decode it;
4. **finishSecret**: ``UpdateSecretVersionStage`` moves ``AWSCURRENT`` from *n* to *n + 1*
   (``RemoveFromVersionId`` makes it a compare-and-set: it fails unless ``AWSCURRENT`` is
   still on *n*), then ``AWSPENDING`` is removed, the end state ``RotateSecret`` expects
   (https://docs.aws.amazon.com/secretsmanager/latest/apireference/API_RotateSecret.html).
   (setSecret, "change the credential in the service", has no counterpart: the provider
   already issued the new refresh token before we store it.)

Crash safety: the provider has consumed the old refresh token by the time step 2 runs, so a
version written in step 2 holds the only usable one and must never be lost. Whoever next
reads or writes the connection and finds ``tokenbroker-latest`` on a version without
``AWSCURRENT`` *settles* it first: if it decodes, its digest matches and it is numbered
current + 1, it is promoted (step 4); otherwise ``tokenbroker-latest`` goes back to the
current version (a compare-and-set too) and the failed version loses its labels. Its
VersionId stays taken (versions are immutable), so before ``tokenbroker-latest`` comes back,
the current version gets the ``tokenbroker-next-`` marker of the number after it: the next
write -- whose refresh token the provider has already consumed -- goes to a free VersionId on
its first try. (A spent VersionId met without a marker, e.g. from before markers existed, is
recognised at the refused ``PutSecretValue``: the marker is set then and the write repeated.)

The version quota is met the same way, before anything is presented: :meth:`write_budget`
gives the versions one secret may take in 24 hours (``version_budget``, by default
:data:`MAX_VERSIONS` less the labelled ones and a margin), and the refresher spends one
through the state store before it presents a refresh token, deferring the refresh when
none is left.

API calls (each is one billed request, https://aws.amazon.com/secrets-manager/pricing/):
per read (``get``) 1 GetSecretValue; ``versions`` 1 ListSecretVersionIds;
per refresh (``put``) 2 GetSecretValue + 1 PutSecretValue + 2 UpdateSecretVersionStage
(+1 with ``retained_versions=1``); first version: CreateSecret + PutSecretValue +
GetSecretValue; ``delete``: DescribeSecret + DeleteSecret. A writer that loses a race pays
one more GetSecretValue; the first read after a crash settles it in 3 GetSecretValue + 2
UpdateSecretVersionStage. Writes share a per-region quota
(PutSecretValue and UpdateSecretVersionStage combined), and AWS advises against writing one
secret more than once every 10 minutes: shorter token lifetimes outrun version clean-up.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import contextlib
import hashlib
import hmac
import json
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from tokenbroker.adapters.secret_store import DEFAULT_RETAINED_VERSIONS, VersionedSecretStore
from tokenbroker.kernel.errors import (
    ConfigError,
    CorruptCredential,
    NotFound,
    StoreUnavailable,
    TokenBrokerError,
    VersionConflict,
)
from tokenbroker.kernel.log import get_logger
from tokenbroker.kernel.model import Credential, StoredCredential
from tokenbroker.ports import Promotion, SecretWrite, WriteBudget

T = TypeVar("T")
R = TypeVar("R")

CURRENT = "AWSCURRENT"
PREVIOUS = "AWSPREVIOUS"
PENDING = "AWSPENDING"
LATEST = "tokenbroker-latest"
NEXT = "tokenbroker-next-"
RETAIN = "tokenbroker-retain-"
ENVELOPE_SCHEMA = "tokenbroker.credential.v1"
TAGS = {"managed-by": "tokenbroker"}
#: Secrets Manager allows 20 staging labels per secret: r retain labels, the three AWS
#: ones, ``tokenbroker-latest``, a ``tokenbroker-next-`` marker, and room for one older ring
#: left by a change of r.
MAX_RETAINED_VERSIONS = 7
#: "Secrets Manager removes unlabeled versions when there are more than 100, but it does not
#: remove versions created less than 24 hours ago" -- past that, "you will reach the quota for
#: secret versions" (https://docs.aws.amazon.com/secretsmanager/latest/userguide/reference_limits.html).
MAX_VERSIONS = 100
VERSION_WINDOW = timedelta(hours=24)
#: Settle-and-reread rounds before giving up on a connection that keeps changing.
_ROUNDS = 5
#: Concurrent requests in get_many / put_many (botocore keeps 10 connections by default).
_WORKERS = 8
_TOKEN = re.compile(r"^tokenbroker-(\d{12})-([0-9a-f]{20})$")
#: Characters Secrets Manager allows in a secret name.
_NAME = re.compile(r"^[A-Za-z0-9/_+=.@-]*$")
#: ``InvalidParameterException``/``InvalidRequestException`` on UpdateSecretVersionStage or
#: a VersionId+VersionStage read: the label is not where the request said it was.
_PRECONDITION = frozenset({"InvalidParameterException", "InvalidRequestException"})
_THROTTLED = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "InternalServiceError",
        "InternalFailure",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
_MISCONFIGURED = frozenset(
    {
        "AccessDeniedException",
        "AccessDenied",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "ExpiredTokenException",
        "DecryptionFailure",
        "EncryptionFailure",
        "KMSAccessDeniedException",
        "KMSDisabledException",
        "KMSInvalidStateException",
        "KMSNotFoundException",
    }
)


class SecretsManagerRefused(StoreUnavailable):
    """Secrets Manager refused a request for a reason no rule here covers. Not retryable;
    ``aws_code`` is the error code AWS sent (e.g. ``InvalidParameterException``)."""

    default_retryable = False

    def __init__(self, message: str, *, aws_code: str) -> None:
        super().__init__(message)
        self.aws_code = aws_code


def version_token(connection_id: str, version: int) -> str:
    """The ``ClientRequestToken`` (hence ``VersionId``) of ``version``: 45 characters, within
    the 32-64 AWS requires, and bound to the connection so that a value copied from another
    secret fails the VersionId check."""
    digest = hashlib.sha256(connection_id.encode()).hexdigest()[:20]
    return f"tokenbroker-{version:012d}-{digest}"


def _version_of(connection_id: str, version_id: str) -> int | None:
    """The version number a VersionId stands for, or None when it is not ours."""
    found = _TOKEN.match(version_id)
    if found is None:
        return None
    version = int(found.group(1))
    return version if version_token(connection_id, version) == version_id else None


def _next_number(current: _Version, number: int) -> int:
    """The number the version after ``current`` (numbered ``number``) takes: ``number + 1``,
    or past the spent ones its ``tokenbroker-next-`` markers name."""
    marked = [
        int(label[len(NEXT) :])
        for label in current.stages
        if label.startswith(NEXT) and label[len(NEXT) :].isdigit()
    ]
    return max([number + 1, *marked])


def retain_label(version: int, retained: int) -> str:
    return f"{RETAIN}{version % retained}-of-{retained}"


def encode_envelope(version: int, credential: Credential) -> str:
    plaintext = credential.to_plaintext()
    return json.dumps(
        {
            "schema": ENVELOPE_SCHEMA,
            "v": version,
            "sha256": hashlib.sha256(plaintext).hexdigest(),
            "credential": base64.b64encode(plaintext).decode(),
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def make_client(region: str | None = None, endpoint_url: str | None = None) -> Any:
    """A boto3 Secrets Manager client on its own session (sessions are not thread-safe),
    with botocore's standard retry mode: throttling and 5xx answers are retried with
    backoff before this adapter sees them, which is safe because every write here is
    idempotent or a compare-and-set."""
    try:
        import boto3  # noqa: PLC0415 - heavy, lazily
        from botocore.config import Config  # noqa: PLC0415
        from botocore.exceptions import BotoCoreError  # noqa: PLC0415
    except ImportError:
        raise ConfigError(
            "the AWS Secrets Manager store needs boto3: pip install 'tokenbroker[aws]'"
        ) from None
    config = Config(
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=5,
        read_timeout=15,
        max_pool_connections=_WORKERS + 2,
    )
    try:
        return boto3.session.Session().client(
            "secretsmanager", region_name=region, endpoint_url=endpoint_url, config=config
        )
    except BotoCoreError as exc:
        raise ConfigError(f"AWS Secrets Manager client: {type(exc).__name__}") from None


_LOCAL_PROBLEMS = frozenset(
    {
        "NoCredentialsError",
        "PartialCredentialsError",
        "NoRegionError",
        "ParamValidationError",
        "UnknownServiceError",
    }
)


def _translate(exc: BaseException, operation: str, secret_id: str | None) -> TokenBrokerError:
    """A tokenbroker error for a botocore exception. Messages carry the operation, the
    secret name and AWS's error code and message, never request parameters (botocore's own
    validation messages quote them, and SecretString is one)."""
    where = f"AWS Secrets Manager {operation}" + (f" on {secret_id!r}" if secret_id else "")
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):  # BotoCoreError: no answer, or a local problem
        name = type(exc).__name__
        if name in _LOCAL_PROBLEMS:
            return ConfigError(f"{where}: {name}")
        return StoreUnavailable(f"{where}: {name}")
    error = response.get("Error") or {}
    code = str(error.get("Code") or "Unknown")
    status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    message = f"{where}: {code}: {str(error.get('Message') or '')[:300]}"
    by_code: dict[str, type[TokenBrokerError]] = {
        "ResourceNotFoundException": NotFound,
        "ResourceExistsException": VersionConflict,
    }
    if code in by_code:
        return by_code[code](message)
    if code in _THROTTLED or status >= 500:
        return StoreUnavailable(message)
    if code in _MISCONFIGURED:
        return ConfigError(f"{message} (check the IAM policy and the KMS key)")
    return SecretsManagerRefused(message, aws_code=code)


@dataclass(frozen=True)
class _Version:
    """One secret version as GetSecretValue or ListSecretVersionIds shows it."""

    version_id: str
    stages: frozenset[str]
    secret_string: str | None = None
    created_at: datetime | None = None

    @property
    def retained(self) -> bool:
        return any(stage.startswith(RETAIN) for stage in self.stages)

    @property
    def committed(self) -> bool:
        """Promoted at some point: current, or older than the newest version written."""
        return CURRENT in self.stages or (LATEST not in self.stages and self.retained)


class AwsSecretsManagerStore(VersionedSecretStore):
    """The SecretStore port on AWS Secrets Manager (see the module docstring for the layout).

    The commit protocol (a rotation whose every label move is a compare-and-set) is this
    class's own ``_commit``; the decisions and ``get``/``get_many``/``put_many`` come from
    :class:`VersionedSecretStore`, the latter two on a short-lived thread pool.

    ``delete`` destroys the secret at once (``ForceDeleteWithoutRecovery``): the contract
    says every version is gone. A deployment that prefers AWS's 7-30 day recovery window
    can delete secrets itself instead; the name is then taken until the window ends.
    """

    def __init__(
        self,
        client: Any = None,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        prefix: str = "tokenbroker/",
        retained_versions: int = DEFAULT_RETAINED_VERSIONS,
        kms_key_id: str | None = None,
        version_budget: int | None = None,
    ) -> None:
        if not 1 <= retained_versions <= MAX_RETAINED_VERSIONS:
            raise ConfigError(
                f"retained_versions must be 1-{MAX_RETAINED_VERSIONS} on AWS Secrets Manager"
                f" (20 staging labels per secret), got {retained_versions}"
            )
        if not _NAME.match(prefix):
            raise ConfigError(
                f"AWS secret prefix {prefix!r} may only contain letters, digits and /_+=.@-"
            )
        # Room for the labelled versions (the ring, AWSPREVIOUS) and a discarded one or two.
        budget = MAX_VERSIONS - retained_versions - 4 if version_budget is None else version_budget
        if not 1 <= budget <= MAX_VERSIONS:
            raise ConfigError(
                f"version_budget must be 1-{MAX_VERSIONS} versions per secret per 24 hours on"
                f" AWS Secrets Manager, got {version_budget}"
            )
        super().__init__(retained_versions)
        self.version_budget = budget
        self.prefix = prefix
        self.kms_key_id = kms_key_id
        self._client = client
        self._region = region
        self._endpoint_url = endpoint_url
        self._lock = threading.Lock()
        self.log = get_logger(component="aws-secrets-manager")

    @property
    def client(self) -> Any:
        """Built on first use, not at construction: a cold start that never touches
        credentials does not pay for botocore's service model."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = make_client(self._region, self._endpoint_url)
        return self._client

    def secret_name(self, connection_id: str) -> str:
        return f"{self.prefix}{connection_id}"

    def write_budget(self, connection_id: str) -> WriteBudget:
        """The versions the connection's secret may take per 24 hours (the module docstring);
        keyed by a digest of the secret's name, so every handle on it shares one count."""
        digest = hashlib.sha256(
            b"tokenbroker aws secret versions v1\x00" + self.secret_name(connection_id).encode()
        ).hexdigest()[:32]
        return WriteBudget(f"secret_versions:{digest}", self.version_budget, VERSION_WINDOW)

    # -- plumbing ------------------------------------------------------------------------------

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        from botocore.exceptions import (  # noqa: PLC0415
            BotoCoreError,
            ClientError,
        )

        try:
            response: dict[str, Any] = getattr(self.client, operation)(**params)
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, operation, params.get("SecretId") or params.get("Name")) from None
        return response

    def _read(
        self, name: str, *, stage: str | None = None, version_id: str | None = None
    ) -> _Version:
        """GetSecretValue by label and/or VersionId, never neither: moto answers a bare
        read with the version that was current before the last label move."""
        params: dict[str, str] = {"SecretId": name}
        if stage is not None:
            params["VersionStage"] = stage
        if version_id is not None:
            params["VersionId"] = version_id
        answer = self._call("get_secret_value", **params)
        return _Version(
            answer["VersionId"],
            frozenset(answer.get("VersionStages") or ()),
            answer.get("SecretString"),
            answer.get("CreatedDate"),
        )

    def _list(self, name: str) -> builtins.list[_Version]:
        """Every version still carrying a staging label (ListSecretVersionIds leaves out
        deprecated ones unless IncludeDeprecated; moto lists them anyway, with no labels)."""
        found: builtins.list[_Version] = []
        params: dict[str, Any] = {"SecretId": name, "IncludeDeprecated": False}
        while True:
            page = self._call("list_secret_version_ids", **params)
            found += [
                _Version(v["VersionId"], frozenset(v.get("VersionStages") or ()))
                for v in page.get("Versions") or ()
            ]
            if not page.get("NextToken"):
                return found
            params["NextToken"] = page["NextToken"]

    def _move_label(self, name: str, label: str, *, to: str, away_from: str | None) -> bool:
        """UpdateSecretVersionStage as a compare-and-set: False when ``label`` is no longer
        on ``away_from`` (someone else moved it first)."""
        params = {"SecretId": name, "VersionStage": label, "MoveToVersionId": to}
        if away_from is not None:
            params["RemoveFromVersionId"] = away_from
        try:
            self._call("update_secret_version_stage", **params)
        except SecretsManagerRefused as refused:
            if refused.aws_code in _PRECONDITION:
                return False
            raise
        return True

    def _drop_label(self, name: str, label: str, version_id: str) -> None:
        """Housekeeping that must not fail a committed write; a later pass repeats it."""
        with contextlib.suppress(NotFound, StoreUnavailable):  # Refused is a StoreUnavailable
            self._call(
                "update_secret_version_stage",
                SecretId=name,
                VersionStage=label,
                RemoveFromVersionId=version_id,
            )

    def _decode(self, connection_id: str, found: _Version) -> StoredCredential:
        """The credential in ``found``, after checking the envelope against its VersionId."""
        version = _version_of(connection_id, found.version_id)
        where = f"connection {connection_id!r} version {found.version_id}"
        if version is None or found.secret_string is None:
            raise CorruptCredential(f"{where}: not a version written by tokenbroker")
        try:
            envelope = json.loads(found.secret_string)
            plaintext = base64.b64decode(envelope["credential"], validate=True)
            intact = (
                envelope["schema"] == ENVELOPE_SCHEMA
                and envelope["v"] == version
                and hmac.compare_digest(
                    hashlib.sha256(plaintext).hexdigest(), str(envelope["sha256"])
                )
            )
            if not intact:
                raise CorruptCredential(f"{where}: checksum or version number mismatch")
            credential = Credential.from_plaintext(plaintext)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise CorruptCredential(f"{where}: not a valid credential envelope") from None
        return StoredCredential(connection_id, version, credential, found.created_at)

    # -- settling an unfinished rotation -------------------------------------------------------

    def _head(self, connection_id: str) -> tuple[_Version, StoredCredential]:
        """The current version, read through ``tokenbroker-latest`` (one call when no
        rotation is unfinished). Raises NotFound."""
        name = self.secret_name(connection_id)
        for _ in range(_ROUNDS):
            latest = self._read(name, stage=LATEST)
            if CURRENT in latest.stages:
                stored = self._decode(connection_id, latest)
                if PENDING in latest.stages:  # a writer stopped inside finishSecret
                    self._drop_label(name, PENDING, latest.version_id)
                return latest, stored
            self._settle(connection_id, latest)
        raise StoreUnavailable(f"connection {connection_id!r} kept changing while it was read")

    def _settle(self, connection_id: str, pending: _Version) -> None:
        """Finish or abandon the rotation that wrote ``pending`` (``tokenbroker-latest``
        without ``AWSCURRENT``). Every label move is a compare-and-set, so any number of
        readers and writers may settle the same version at once; the caller re-reads."""
        name = self.secret_name(connection_id)
        current = self._read(name, stage=CURRENT)
        if current.version_id == pending.version_id:
            return  # promoted by someone else meanwhile
        base = self._decode(connection_id, current)
        try:
            newest = self._decode(connection_id, pending)
            passes = newest.version == _next_number(current, base.version)
        except CorruptCredential:
            passes = False
        if passes:
            if self._finish(name, pending.version_id, current.version_id):
                # A writer that stopped after createSecret, or one still running: either way
                # its version is complete and tested, and promoting it twice is harmless.
                self.log.info(
                    "finished a pending credential rotation",
                    connection_id=connection_id,
                    version=base.version + 1,
                )
            return
        self._discard(name, pending, current, connection_id)

    def _finish(
        self, name: str, new_id: str, old_id: str, old_stages: frozenset[str] = frozenset()
    ) -> bool:
        """finishSecret: move AWSCURRENT (Secrets Manager moves AWSPREVIOUS to ``old_id``,
        https://docs.aws.amazon.com/secretsmanager/latest/apireference/API_UpdateSecretVersionStage.html),
        then take AWSPENDING off (and a ``tokenbroker-next-`` marker the old version had, when
        its labels are known; ``versions`` removes those left). False when AWSCURRENT had
        already left ``old_id``."""
        if not self._move_label(name, CURRENT, to=new_id, away_from=old_id):
            return False
        self._drop_label(name, PENDING, new_id)
        if self.retained_versions == 1:
            self._drop_label(name, PREVIOUS, old_id)
        for label in sorted(old_stages):
            if label.startswith(NEXT):
                self._drop_label(name, label, old_id)
        return True

    def _mark_next(self, name: str, current: _Version, number: int) -> None:
        """Put the ``tokenbroker-next-`` marker of ``number`` on the current version (the next
        write skips the spent VersionIds below it). Moving a label onto the version that has
        it already changes nothing, so settlers may all do it."""
        label = f"{NEXT}{number:012d}"
        if label not in current.stages:
            self._call(
                "update_secret_version_stage",
                SecretId=name,
                VersionStage=label,
                MoveToVersionId=current.version_id,
            )

    def _discard(self, name: str, failed: _Version, current: _Version, connection_id: str) -> None:
        """Mark the failed version's number spent on the current version (when it is the one
        the next write would take), point ``tokenbroker-latest`` back at the current version,
        then strip the failed version's labels so it is deprecated. The move only succeeds
        while the label is still on ``failed``, which is never a promoted version; the marker
        comes first, so no reader sees the discard without it."""
        spent = _version_of(connection_id, failed.version_id)
        base = _version_of(connection_id, current.version_id)
        if spent is not None and base is not None and spent == _next_number(current, base):
            self._mark_next(name, current, spent + 1)
        if not self._move_label(name, LATEST, to=current.version_id, away_from=failed.version_id):
            return
        self.log.warning(
            "discarded an unreadable pending credential version",
            connection_id=connection_id,
            version_id=failed.version_id,
        )
        for label in sorted(failed.stages):
            if label == PENDING or label.startswith(RETAIN):
                self._drop_label(name, label, failed.version_id)

    # -- reads ---------------------------------------------------------------------------------

    def _read_current(self, connection_id: str) -> StoredCredential:
        return self._head(connection_id)[1]

    def _map(self, fn: Callable[[T], R], items: Sequence[T]) -> builtins.list[R]:
        """``fn`` over ``items`` on a short-lived pool (boto3 clients are thread-safe); the
        first exception propagates once all have run."""
        if len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(
            min(_WORKERS, len(items)), thread_name_prefix="aws-secrets"
        ) as pool:
            return list(pool.map(fn, items))

    def versions(self, connection_id: str) -> builtins.list[int]:
        """Readable versions: the current one and those older that still carry a retain
        label, within ``retained_versions`` of the current. Labels left on older versions
        (a crash between steps, or a smaller ``retained_versions`` than before) are removed
        here."""
        name = self.secret_name(connection_id)
        for _ in range(_ROUNDS):
            try:
                listed = self._list(name)
            except NotFound:
                return []
            latest = next((v for v in listed if LATEST in v.stages), None)
            if latest is not None and CURRENT not in latest.stages:
                self._settle(connection_id, self._read(name, version_id=latest.version_id))
                continue
            current = next((v for v in listed if CURRENT in v.stages), None)
            if current is None:
                return []  # created, but its first version was never written
            top = _version_of(connection_id, current.version_id)
            if top is None:
                raise CorruptCredential(
                    f"connection {connection_id!r}: the current version was not written by"
                    " tokenbroker"
                )
            readable: builtins.list[int] = []
            for found in listed:
                number = _version_of(connection_id, found.version_id)
                stale = self._stale_labels(found, number, top)
                for label in stale:
                    self._drop_label(name, label, found.version_id)
                if number is None or (not found.retained and number != top):
                    continue
                if self._is_retained(number, top) and found.committed:
                    readable.append(number)
            return sorted(readable)
        raise StoreUnavailable(f"connection {connection_id!r} kept changing while it was read")

    def _stale_labels(self, found: _Version, number: int | None, top: int) -> list[str]:
        """Labels of ours left where they no longer mean anything: retain labels below the
        retention floor, ``tokenbroker-next-`` markers once another version is current."""
        stale = [s for s in found.stages if s.startswith(NEXT) and CURRENT not in found.stages]
        if number is not None and found.retained and number <= self._retention_floor(top):
            stale += [s for s in found.stages if s.startswith(RETAIN)]
        return sorted(stale)

    # -- writes --------------------------------------------------------------------------------

    def _commit(self, write: SecretWrite) -> int:
        if write.expected_version is None:
            return self._create(write.connection_id, write.credential)
        connection_id = write.connection_id
        name = self.secret_name(connection_id)
        head, new, body, done = self._put_next(write)
        if done:
            return new
        new_id = version_token(connection_id, new)
        try:
            done = self._test_step(connection_id, new_id, body, head) and self._finish(
                name, new_id, head.version_id, head.stages
            )
        except NotFound:
            raise VersionConflict(f"connection {connection_id!r} was deleted") from None
        return new if done else self._outcome(connection_id, new, body)

    def _stage(self, write: SecretWrite) -> int:
        """createSecret alone: the new version with ``AWSPENDING`` and ``tokenbroker-latest``,
        durable once it returns; reads settle it from then on (see the module docstring)."""
        if write.expected_version is None:
            return self._create(write.connection_id, write.credential)  # current at once
        return self._put_next(write)[1]

    def _put_next(self, write: SecretWrite) -> tuple[_Version, int, str, bool]:
        """createSecret on top of ``write.expected_version`` (a compare-and-set): the head it
        was written on, the new version's number and body, and whether this very write was
        found current already (finished by a reader after an earlier try). A spent VersionId
        in the way (a discarded version, and no marker saying so) is marked and skipped."""
        connection_id, expected = write.connection_id, write.expected_version
        name = self.secret_name(connection_id)
        for _ in range(_ROUNDS):
            try:
                head, stored = self._head(connection_id)
            except NotFound:
                raise self._conflict(connection_id, None, expected) from None
            if expected is not None and stored.version > expected:
                mine = encode_envelope(stored.version, write.credential)
                if head.secret_string == mine:
                    return head, stored.version, mine, True
            self._check_expected(connection_id, stored.version, expected)
            new = _next_number(head, stored.version)
            body = encode_envelope(new, write.credential)
            new_id = version_token(connection_id, new)
            stages = [PENDING, LATEST, retain_label(new, self.retained_versions)]
            try:
                self._create_step(name, new_id, body, stages)
            except VersionConflict:
                if not self._spent(name, new_id):
                    raise  # a lost race: the version there is another writer's
                self.log.warning(
                    "the next version id was spent by a discarded version: skipping it",
                    connection_id=connection_id,
                    version=new,
                )
                self._mark_next(name, head, new + 1)
                continue
            return head, new, body, False
        raise StoreUnavailable(f"connection {connection_id!r} kept changing while it was written")

    def _promote(self, promotion: Promotion) -> int:
        """testSecret and finishSecret: read the staged version back by its VersionId and
        decode it, then move ``AWSCURRENT`` from its parent (a compare-and-set)."""
        connection_id, new = promotion.connection_id, promotion.version
        name = self.secret_name(connection_id)
        new_id = version_token(connection_id, new)
        if promotion.parent is None:
            return self._outcome(connection_id, new, None)  # a first version is current at once
        parent_id = version_token(connection_id, promotion.parent)
        try:
            found = self._read(name, version_id=new_id)
        except NotFound:
            raise VersionConflict(f"connection {connection_id!r}: v{new} is gone") from None
        if CURRENT in found.stages:
            return new  # settled by a reader meanwhile
        self._decode(connection_id, found)
        if self._finish(name, new_id, parent_id):
            return new
        return self._outcome(connection_id, new, found.secret_string)

    def _create_step(self, name: str, version_id: str, body: str, stages: list[str]) -> None:
        """createSecret: the new version, labelled. Raises VersionConflict when another
        writer already stored different data under the same VersionId."""
        try:
            self._call(
                "put_secret_value",
                SecretId=name,
                ClientRequestToken=version_id,
                SecretString=body,
                VersionStages=stages,
            )
        except NotFound:
            raise VersionConflict(f"secret {name!r} was deleted during the write") from None

    def _spent(self, name: str, version_id: str) -> bool:
        """After a refused createSecret over the current version: whether the version under
        ``version_id`` is a discarded one (neither current nor the newest written: a live
        writer's version keeps ``tokenbroker-latest`` until it is promoted or discarded), so
        its VersionId can never be written again."""
        try:
            found = self._read(name, version_id=version_id)
        except (NotFound, SecretsManagerRefused):
            return False
        return CURRENT not in found.stages and LATEST not in found.stages

    def _test_step(self, connection_id: str, version_id: str, body: str, current: _Version) -> bool:
        """testSecret: read the pending version back and decode it. False when it is no
        longer pending (settled by a reader meanwhile: the caller looks at the outcome)."""
        name = self.secret_name(connection_id)
        try:
            found = self._read(name, stage=PENDING, version_id=version_id)
        except NotFound:
            return False
        except SecretsManagerRefused as refused:
            if refused.aws_code in _PRECONDITION:
                return False
            raise
        try:
            self._decode(connection_id, found)
        except CorruptCredential:
            self._discard(name, found, current, connection_id)
            raise
        return found.secret_string == body

    def _outcome(self, connection_id: str, new: int, body: str | None) -> int:
        """After losing track of our write: did it become the current version? (``body``:
        what we wrote, when we know it.)"""
        try:
            head, stored = self._head(connection_id)
        except NotFound:
            raise VersionConflict(f"connection {connection_id!r} was deleted") from None
        if stored.version == new and body in (None, head.secret_string):
            return new
        raise self._conflict(connection_id, stored.version, new - 1)

    def _create(self, connection_id: str, credential: Credential) -> int:
        """The first version. An empty secret first, then its first value: PutSecretValue
        attaches AWSCURRENT to a secret's first version by itself, so version 1 is current
        and labelled in one atomic call, and racing creators meet at its VersionId."""
        name = self.secret_name(connection_id)
        body = encode_envelope(1, credential)
        params: dict[str, Any] = {
            "Name": name,
            "Description": f"tokenbroker OAuth credential of connection {connection_id}",
            "Tags": [
                {"Key": key, "Value": value}
                for key, value in {**TAGS, "connection": connection_id}.items()
            ],
        }
        if self.kms_key_id:
            params["KmsKeyId"] = self.kms_key_id
        try:
            self._call("create_secret", **params)
        except VersionConflict:  # the secret exists: maybe only the empty one
            try:
                head, stored = self._head(connection_id)
            except NotFound:
                pass  # empty: a creator stopped between its two calls, or is between them
            else:
                if stored.version == 1 and head.secret_string == body:
                    return 1
                raise self._conflict(connection_id, stored.version, None) from None
        except SecretsManagerRefused as refused:
            if refused.aws_code == "InvalidRequestException":  # name still being deleted
                raise StoreUnavailable(refused.message, retryable=True) from None
            raise
        version_id = version_token(connection_id, 1)
        self._create_step(name, version_id, body, [LATEST, retain_label(1, self.retained_versions)])
        found = self._read(name, version_id=version_id)
        self._decode(connection_id, found)
        if CURRENT not in found.stages or found.secret_string != body:
            raise VersionConflict(f"connection {connection_id!r} was created concurrently")
        return 1

    def delete(self, connection_id: str) -> None:
        """DescribeSecret first: a forced DeleteSecret of a missing secret succeeds
        (https://docs.aws.amazon.com/secretsmanager/latest/apireference/API_DeleteSecret.html)."""
        name = self.secret_name(connection_id)
        try:
            described = self._call("describe_secret", SecretId=name)
        except NotFound:
            raise self._missing(connection_id) from None
        if described.get("DeletedDate"):
            raise NotFound(f"connection {connection_id!r} is already scheduled for deletion")
        self._call("delete_secret", SecretId=name, ForceDeleteWithoutRecovery=True)
