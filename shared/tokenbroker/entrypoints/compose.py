"""Wiring: build the adapters the settings select, once, and hand out the services.

Entry points (functions, CLI, local server) build one :class:`Runtime` at cold start and reuse
it for every invocation (as aws-powertools builds long-lived clients at module scope).
Adapters are imported here lazily, per backend, so a function pays only for what it uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from tokenbroker.adapters.http import AiohttpTokenEndpoint
from tokenbroker.entrypoints.settings import (
    ENV_CONNECT_OPERATORS,
    ENV_CONNECT_URL,
    ENV_ISSUER_AUDIENCE,
    ENV_LOG_FILE,
    ENV_POLICY_FILE,
    ENV_SESSION_KEY,
    STATE_DIR_FIELD,
    LogSettings,
    Settings,
)
from tokenbroker.kernel import failpoints
from tokenbroker.kernel.clock import Clock, SystemClock
from tokenbroker.kernel.errors import ConfigError, TokenBrokerError
from tokenbroker.kernel.log import Logger, configure_logging, get_logger
from tokenbroker.kernel.metrics import Recorder
from tokenbroker.kernel.retry import RetryPolicy
from tokenbroker.oauth.profiles import ProviderProfile, load_profiles
from tokenbroker.ports import (
    AuthorizationSessions,
    EventBus,
    MetricsExporter,
    RefreshCommitter,
    SecretStore,
    StateStore,
    TokenEndpoint,
    VersionPointers,
)
from tokenbroker.refresh.registry import ConnectionRegistry
from tokenbroker.refresh.tick import Refresher, TickSummary

if TYPE_CHECKING:
    from tokenbroker.adapters.embedded import EmbeddedDatabase
    from tokenbroker.adapters.gcp.iam_credentials import IamCredentials
    from tokenbroker.entrypoints.operators import OperatorAllowList, OperatorIdentity
    from tokenbroker.issue.issuer import TokenIssuer
    from tokenbroker.issue.relay import Relay
    from tokenbroker.refresh.authorize import AuthorizationFlow

T = TypeVar("T")


#: Commit loops of a refresher on networked stores (docs/gcp.md, "The tick"): each batch's
#: round trips (Firestore's transaction, Secret Manager's retirements) overlap the others'.
#: Firestore commits on disjoint connections share no document (the outbox is ordered by
#: time, not by a sequence document: with one, 4 loops took the commits from 2 s to 78 s).
NETWORK_COMMITTERS = 4


@dataclass
class Runtime:
    settings: Settings
    secrets: SecretStore
    state: StateStore
    events: EventBus
    profiles: Mapping[str, ProviderProfile]
    clock: Clock = field(default_factory=SystemClock)
    #: Whatever must be closed on shutdown (the embedded database).
    resources: list[Any] = field(default_factory=list)
    #: Where this process counts (:mod:`tokenbroker.kernel.metrics`), and where it writes
    #: them (``None``: nowhere -- the CLI, or metrics off).
    metrics: Recorder = field(default_factory=lambda: Recorder(datetime.now(UTC)))
    exporter: MetricsExporter | None = None
    #: Authorization requests in flight (``tokenbroker authorize``): in the embedded database
    #: on the embedded state store, else in this process's memory (the loopback flow starts
    #: and ends in one process; a Firestore adapter comes with the cloud connect function).
    sessions: AuthorizationSessions | None = None
    #: Monotonic time of the last fleet read (``metrics_fleet_interval_seconds`` apart).
    _fleet_read_at: float | None = field(default=None, init=False, repr=False)

    def refresher(self, **overrides: Any) -> Refresher:
        options: dict[str, Any] = {
            "secrets": self.secrets,
            "state": self.state,
            "events": self.events,
            "profiles": self.profiles,
            "clock": self.clock,
            "policy": self.settings.refresh_policy(),
            "retry": RetryPolicy(
                attempts=self.settings.retry_attempts, base_delay=self.settings.retry_base_delay
            ),
            "lease_ttl": timedelta(seconds=self.settings.lease_ttl_seconds),
            "concurrency": self.settings.concurrency,
            "metrics": self.metrics if self.exporter is not None else None,
        }
        atomic = self._atomic_committer()
        # One commit loop where one database serialises commits anyway; several where each
        # commit waits on network round trips (Firestore, Secret Manager, Pub/Sub).
        options.update(committer=atomic, committers=1 if atomic is not None else NETWORK_COMMITTERS)
        options.update(overrides)
        return Refresher(**options)

    def _atomic_committer(self) -> RefreshCommitter | None:
        """One transaction for the whole refresh commit where both stores share one embedded
        database (the fencing token checked with the credential write); ``None`` otherwise:
        the refresher then promotes and completes in order (``refresh.commit``)."""
        if type(self.state).__module__ != "tokenbroker.adapters.embedded":
            return None
        from tokenbroker.adapters.embedded import refresh_committer  # noqa: PLC0415 - lazily

        return refresh_committer(self.secrets, self.state)

    def registry(self) -> ConnectionRegistry:
        """Operator actions on connections (add, reauth, enable/disable, remove)."""
        return ConnectionRegistry(
            secrets=self.secrets, state=self.state, profiles=self.profiles, clock=self.clock
        )

    def authorization_flow(self, **overrides: Any) -> AuthorizationFlow:
        """Connecting accounts (the authorization-code flow) over this runtime's stores."""
        from tokenbroker.refresh.authorize import AuthorizationFlow  # noqa: PLC0415

        if self.sessions is None:
            from tokenbroker.adapters.memory import MemoryAuthorizationSessions  # noqa: PLC0415

            self.sessions = MemoryAuthorizationSessions()
        options: dict[str, Any] = {
            "sessions": self.sessions,
            "registry": self.registry(),
            "events": self.events,
            "clock": self.clock,
        }
        options.update(overrides)
        return AuthorizationFlow(**options)

    def token_endpoint(self) -> AiohttpTokenEndpoint:
        return AiohttpTokenEndpoint(
            timeout=self.settings.http_timeout, max_connections=self.settings.concurrency
        )

    async def tick(
        self,
        *,
        connection_ids: Sequence[str] | None = None,
        endpoint: TokenEndpoint | None = None,
        refresher: Refresher | None = None,
        **options: Any,
    ) -> TickSummary:
        """One refresh tick with a fresh HTTP session (sessions belong to one event loop)."""
        refresher = refresher or self.refresher()
        limit = options.pop("limit", self.settings.tick_limit)
        if endpoint is not None:
            return await refresher.tick(
                endpoint, connection_ids=connection_ids, limit=limit, **options
            )
        async with self.token_endpoint() as http:
            return await refresher.tick(http, connection_ids=connection_ids, limit=limit, **options)

    async def observe_tick(self, summary: TickSummary | None, *, ok: bool) -> None:
        """After a tick: count it, read the fleet when due, write the metrics (off the event
        loop). Never raises: metrics never fail the tick they report on."""
        if self.exporter is None:
            return
        from tokenbroker.refresh.fleet import fleet_health, record_fleet, record_tick  # noqa: PLC0415

        record_tick(self.metrics, summary, ok=ok)
        interval = self.settings.metrics_fleet_interval_seconds
        now = self.clock.monotonic()
        if self._fleet_read_at is None or now - self._fleet_read_at >= interval:
            try:
                records = await asyncio.to_thread(self.state.list)
            except TokenBrokerError as error:
                _metrics_log().warning("fleet not read for metrics", error_code=error.code)
            else:
                self._fleet_read_at = now
                fleet = fleet_health(records, self.clock.now())
                record_fleet(self.metrics, fleet, limit=self.settings.metrics_connection_limit)
        await self.export_metrics()

    async def export_metrics(self) -> bool:
        """Write what the recorder holds now (the snapshot is taken on this thread, the write
        runs in a worker). ``False`` when nothing was written; the failure is logged."""
        exporter = self.exporter
        if exporter is None:
            return False
        snapshot = self.metrics.snapshot(self.clock.now())
        try:
            # Bounded: a Monitoring API that hangs must not hold the tick's answer (the write
            # goes on in its thread; the next one waits for it and carries the counts anyway).
            await asyncio.wait_for(asyncio.to_thread(exporter.write, snapshot), METRICS_WAIT)
        except TimeoutError:
            _metrics_log().warning("metrics not written in time", seconds=METRICS_WAIT)
            return False
        except TokenBrokerError as error:
            _metrics_log().warning("metrics not written", error_code=error.code, error=str(error))
            return False
        except Exception as bug:  # noqa: BLE001 - never into the work the metrics report on
            _metrics_log().exception(
                "metrics not written: an unexpected exception", exception_type=type(bug).__name__
            )
            return False
        return True

    def close(self) -> None:
        if self.exporter is not None:
            with contextlib.suppress(Exception):
                self.exporter.close()
            self.exporter = None
        for resource in self.resources:
            resource.close()
        self.resources.clear()


#: Seconds a tick's (or the issuer's) metrics write is waited for.
METRICS_WAIT = 15.0


def _metrics_log() -> Logger:
    return get_logger(component="metrics")


def start_logging(*, level: str | None = None, default_level: str = "info") -> LogSettings:
    """An entry point's first act: configure the one logger from the settings (and arm the
    fault suite's failpoints when, and only when, it asked for them)."""
    settings = LogSettings.from_env(level=level, default_level=default_level)
    try:
        configure_logging(
            settings.level,
            log_file=settings.file,
            project=settings.project,
            service=settings.service,
        )
    except OSError as error:  # a missing directory, a directory, no permission
        raise ConfigError(
            f"{ENV_LOG_FILE}: cannot append to {settings.file}: {error.strerror or error}"
        ) from None
    failpoints.arm(settings.failpoints)
    return settings


class _Closable(Protocol):
    async def aclose(self) -> None: ...


@dataclass
class IssuerService:
    """What the issuer function serves with, and what it must close on shutdown."""

    issuer: TokenIssuer
    relay: Relay
    runtime: Runtime
    #: HTTP sessions (IAM Credentials, the token endpoint, the relay's transport).
    sessions: list[_Closable] = field(default_factory=list)
    #: Writes the issuer's metrics every ``metrics_interval_seconds`` (never per request).
    metrics_task: asyncio.Task[None] | None = None

    def start_metrics(self) -> None:
        """Start the metrics writer on the running loop (once; nothing when metrics are off).
        Behind Cloud Run's request-based billing the CPU is throttled between requests, so a
        write may happen late: it carries the counts since the last one all the same."""
        if self.runtime.exporter is not None and self.metrics_task is None:
            self.metrics_task = asyncio.get_running_loop().create_task(self._write_metrics())

    async def _write_metrics(self) -> None:
        interval = self.runtime.settings.metrics_interval_seconds
        while True:
            await self.runtime.clock.sleep(interval)
            await self.runtime.export_metrics()

    async def aclose(self) -> None:
        task, self.metrics_task = self.metrics_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.runtime.export_metrics()  # the counts since the last write
        for session in self.sessions:
            await session.aclose()
        self.runtime.close()


def build_issuer(settings: Settings | None = None) -> IssuerService:
    """The issuer and the relay over the runtime's stores, the caller verifier (Google ID
    tokens in the configured identity mode; in ``verify`` mode the keys are fetched now, in
    this thread, not on the event loop), IAM Credentials and the
    HTTP transports. Requires an audience and a policy file: the policy denies by default."""
    from tokenbroker.adapters.http import (  # noqa: PLC0415
        AiohttpRelayTransport,
        AiohttpTokenEndpoint,
    )
    from tokenbroker.issue.idtoken import IdentityMode, IdTokenVerifier, KeySet  # noqa: PLC0415
    from tokenbroker.issue.issuer import TokenIssuer  # noqa: PLC0415
    from tokenbroker.issue.policy_file import load_policy  # noqa: PLC0415
    from tokenbroker.issue.relay import Relay  # noqa: PLC0415

    settings = settings or Settings.from_env()
    if not settings.issuer_audiences:
        raise ConfigError(f"{ENV_ISSUER_AUDIENCE} (the function's URLs) is required")
    if settings.policy_file is None:
        raise ConfigError(f"{ENV_POLICY_FILE} is required (deny-by-default policy)")
    policy = load_policy(settings.policy_file)
    runtime = build_runtime(settings, metrics_job="issuer")
    try:
        verifier = IdTokenVerifier(
            audience=settings.issuer_audiences,
            mode=IdentityMode(settings.caller_identity),
            issuers=settings.id_token_issuers,
            keys=KeySet(settings.id_token_keys_url, clock=runtime.clock),
            clock=runtime.clock,
        )
        if verifier.mode is IdentityMode.VERIFY:  # platform mode never needs the keys
            verifier.keys.refresh()
        # joserfc's JWS module now, in this (cold start) thread: not ~25 ms on the first
        # caller's request, on the event loop.
        import joserfc.jws  # noqa: F401, PLC0415
    except BaseException:
        runtime.close()
        raise
    impersonator = _iam_credentials(settings)
    endpoint = AiohttpTokenEndpoint(timeout=settings.http_timeout)
    transport = AiohttpRelayTransport()
    issuer = TokenIssuer(
        verifier=verifier,
        policy=policy,
        state=runtime.state,
        secrets=runtime.secrets,
        profiles=runtime.profiles,
        impersonator=impersonator,
        endpoint=endpoint,
        clock=runtime.clock,
        metrics=runtime.metrics,
    )
    relay = Relay(
        verifier=verifier,
        policy=policy,
        secrets=runtime.secrets,
        transport=transport,
        state=runtime.state,
        clock=runtime.clock,
    )
    return IssuerService(issuer, relay, runtime, [impersonator, endpoint, transport])


@dataclass
class ConnectService:
    """What the connect function serves with (:mod:`tokenbroker.entrypoints.connect`)."""

    runtime: Runtime
    flow: AuthorizationFlow
    identity: OperatorIdentity
    operators: OperatorAllowList
    #: The function's public URL (no trailing slash); the redirect URI is this + /callback.
    public_url: str
    #: Keys the start page's form tokens (derived from the session key, else per process).
    form_key: bytes

    @property
    def redirect_uri(self) -> str:
        return self.public_url + "/callback"

    def close(self) -> None:
        self.runtime.close()


def build_connect(settings: Settings | None = None) -> ConnectService:
    """The connect function: the runtime's stores, the sessions (Firestore with the gcp state
    store, sealed with the session key; the embedded database's, or memory, for local runs),
    the operator identity of the configured mode and the allow-list."""
    import hashlib  # noqa: PLC0415
    import hmac  # noqa: PLC0415
    import secrets  # noqa: PLC0415

    from tokenbroker.entrypoints.operators import (  # noqa: PLC0415
        GCLOUD_CLIENT_ID,
        IapOperators,
        OperatorAllowList,
        PlatformOperators,
    )
    from tokenbroker.oauth.authorization import check_endpoint_url  # noqa: PLC0415

    settings = settings or Settings.from_env()
    if not settings.connect_url:
        raise ConfigError(f"{ENV_CONNECT_URL} (the function's public URL) is required")
    public_url = check_endpoint_url(settings.connect_url, ENV_CONNECT_URL).rstrip("/")
    operators = OperatorAllowList.parse(settings.connect_operators, ENV_CONNECT_OPERATORS)
    identity: OperatorIdentity
    if settings.operator_identity == "iap":
        from tokenbroker.issue.iap import IapVerifier  # noqa: PLC0415

        identity = IapOperators(
            IapVerifier(audience=settings.iap_audiences, keys_url=settings.iap_keys_url)
        )
    else:
        from tokenbroker.issue.idtoken import IdentityMode, IdTokenVerifier  # noqa: PLC0415

        audiences = settings.connect_audiences or (public_url, GCLOUD_CLIENT_ID)
        identity = PlatformOperators(
            IdTokenVerifier(
                audience=audiences,
                mode=IdentityMode.PLATFORM,
                issuers=settings.id_token_issuers,
            )
        )
    key = settings.session_key
    on_firestore = settings.adapters[1] == "firestore"
    if on_firestore and key is None:
        raise ConfigError(f"{ENV_SESSION_KEY} is required: it seals the sessions' PKCE verifiers")
    runtime = build_runtime(settings)
    try:
        if on_firestore and key is not None:
            from tokenbroker.adapters.gcp.firestore_sessions import (  # noqa: PLC0415
                SESSIONS_SUFFIX,
                FirestoreAuthorizationSessions,
            )

            sessions = FirestoreAuthorizationSessions(
                session_key=key,
                project=settings.project,
                database=settings.firestore_database,
                collection=settings.sessions_collection
                or settings.firestore_collection + SESSIONS_SUFFIX,
                emulator_host=settings.firestore_emulator_host,
            )
            runtime.sessions = sessions
            runtime.resources.append(sessions)
        flow = runtime.authorization_flow()
    except BaseException:
        runtime.close()
        raise
    if key is not None:
        from tokenbroker.adapters.gcp.firestore_sessions import decode_session_key  # noqa: PLC0415

        raw = decode_session_key(key, ENV_SESSION_KEY)
        form_key = hmac.new(raw, b"tokenbroker:connect:form-token:v1", hashlib.sha256).digest()
    else:  # one process only (local runs): its forms are good for its own lifetime
        form_key = secrets.token_bytes(32)
    return ConnectService(runtime, flow, identity, operators, public_url, form_key)


def _iam_credentials(settings: Settings) -> IamCredentials:
    """IAM Credentials, authorised as the broker: Application Default Credentials, or (local
    runs and tests) the static token ``TOKENBROKER_IAM_ACCESS_TOKEN``."""
    from tokenbroker.adapters.gcp.iam_credentials import IamCredentials  # noqa: PLC0415

    static = settings.iam_access_token
    if static is None:
        return IamCredentials(endpoint=settings.iam_credentials_endpoint)

    async def authorizer() -> str:
        return static.reveal()

    return IamCredentials(endpoint=settings.iam_credentials_endpoint, authorizer=authorizer)


def build_runtime(
    settings: Settings | None = None,
    *,
    clock: Clock | None = None,
    create: bool = True,
    metrics_job: str | None = None,
) -> Runtime:
    """Build the adapters the settings select (a preset, then per-port overrides).

    ``create=False`` opens only state that exists: the embedded backend then refuses a state
    directory without a database (a mistyped ``--state-dir``) instead of creating one and a
    key. Only ``tokenbroker add`` creates state. ``metrics_job`` (``refresher``, ``issuer``,
    ``serve``): the process writes metrics under that job, when the settings send them
    anywhere; without it (the CLI), nothing is written."""
    settings = settings or Settings.from_env()
    profiles = load_profiles(settings.profiles_file)
    adapters = _Adapters(settings, create=create)
    secret_kind, state_kind, events_kind = settings.adapters
    try:
        state = adapters.state = _pick(STATE_STORES, "state store", state_kind)(adapters)
        secrets = _pick(SECRET_STORES, "secret store", secret_kind)(adapters)
        events = _pick(EVENT_BUSES, "event bus", events_kind)(adapters)
        sessions = adapters.embedded_sessions() if state_kind == "embedded" else None
    except BaseException:
        adapters.close()
        raise
    runtime = Runtime(
        settings, secrets, state, events, profiles, clock or SystemClock(), adapters.resources
    )
    runtime.sessions = sessions
    if metrics_job is not None:
        runtime.exporter = metrics_exporter(settings, metrics_job)
    return runtime


def metrics_exporter(settings: Settings, job: str) -> MetricsExporter | None:
    """The exporter the settings choose for a process of ``job`` (``None``: metrics off). The
    adapter module is light; the client library is imported at the first write."""
    if settings.metrics_destination == "off":
        return None
    from tokenbroker.adapters.gcp.monitoring import CloudMonitoringExporter  # noqa: PLC0415

    instance = uuid.uuid4().hex[:16]
    task_id = f"{settings.k_revision}-{instance}" if settings.k_revision else instance
    return CloudMonitoringExporter(
        project=settings.project,
        resource={
            "location": settings.region,
            "namespace": settings.metrics_namespace,
            "job": job,
            "task_id": task_id,
        },
        endpoint=settings.monitoring_endpoint,
    )


class _Adapters:
    """One factory method per (port, adapter), each importing its adapter only when chosen, so a
    function pays only for the backend it uses. The embedded database is opened once and shared
    by the embedded secret store, state store and outbox."""

    def __init__(self, settings: Settings, *, create: bool = True) -> None:
        self.settings = settings
        self.create = create
        self.resources: list[Any] = []
        self._db: EmbeddedDatabase | None = None
        #: The state store, built before the secret store: Secret Manager keeps its
        #: current-version pointer there when it can (``secret_manager``).
        self.state: StateStore | None = None

    def close(self) -> None:
        for resource in self.resources:
            resource.close()

    def embedded_db(self) -> EmbeddedDatabase:
        if self._db is None:
            from tokenbroker.adapters.embedded import EmbeddedDatabase  # noqa: PLC0415

            key = self.settings.encryption_key
            state_dir = self.settings.resolved_state_dir
            try:
                self._db = EmbeddedDatabase(
                    state_dir,
                    key=key.reveal() if key else None,
                    key_file=self.settings.encryption_key_file,
                    create=self.create,
                )
            except (OSError, sqlite3.Error) as error:
                # Whatever the store's own checks did not name (a state directory that is a
                # file or unreadable, a database that is not one): the field, never a traceback.
                reason = getattr(error, "strerror", None) or str(error)
                if isinstance(error, FileExistsError | NotADirectoryError):
                    reason = "it (or a parent) is a file, not a directory"
                raise ConfigError(
                    f"{STATE_DIR_FIELD}: cannot open the state in {state_dir}: {reason}"
                ) from None
            self.resources.append(self._db)
        return self._db

    def memory_secrets(self) -> SecretStore:
        from tokenbroker.adapters.memory import MemorySecretStore  # noqa: PLC0415

        return MemorySecretStore(self.settings.retained_versions)

    def embedded_secrets(self) -> SecretStore:
        from tokenbroker.adapters.embedded import EmbeddedSecretStore  # noqa: PLC0415

        return EmbeddedSecretStore(self.embedded_db(), self.settings.retained_versions)

    def secret_manager(self) -> SecretStore:
        """The pointer protocol (the current version in the state record: one access and two
        writes per refresh) whenever the state store can hold the pointer -- Firestore, as
        deployed; else the self-contained annotation protocol (docs/gcp.md)."""
        from tokenbroker.adapters.gcp.secret_manager import (  # noqa: PLC0415
            SecretManagerSecretStore,
        )

        options: dict[str, Any] = {
            "project": self.settings.project,
            "prefix": self.settings.secret_prefix,
            "retained_versions": self.settings.retained_versions,
            "endpoint": self.settings.secret_manager_endpoint,
            "reads_per_minute": self.settings.secret_manager_reads_per_minute,
            "writes_per_minute": self.settings.secret_manager_writes_per_minute,
        }
        if isinstance(self.state, VersionPointers):
            from tokenbroker.adapters.gcp.secret_manager_pointed import (  # noqa: PLC0415
                PointedSecretManagerStore,
            )

            return PointedSecretManagerStore(pointers=self.state, **options)
        return SecretManagerSecretStore(**options)

    def aws_secrets_manager(self) -> SecretStore:
        from tokenbroker.adapters.aws import AwsSecretsManagerStore  # noqa: PLC0415

        return AwsSecretsManagerStore(
            region=self.settings.aws_region,
            endpoint_url=self.settings.aws_endpoint_url,
            prefix=self.settings.aws_secret_prefix,
            retained_versions=self.settings.retained_versions,
        )

    def memory_state(self) -> StateStore:
        from tokenbroker.adapters.memory import MemoryStateStore  # noqa: PLC0415

        return MemoryStateStore()

    def embedded_state(self) -> StateStore:
        from tokenbroker.adapters.embedded import EmbeddedStateStore  # noqa: PLC0415

        return EmbeddedStateStore(self.embedded_db())

    def embedded_sessions(self) -> AuthorizationSessions:
        from tokenbroker.adapters.embedded import EmbeddedAuthorizationSessions  # noqa: PLC0415

        return EmbeddedAuthorizationSessions(self.embedded_db())

    def firestore(self) -> StateStore:
        from tokenbroker.adapters.gcp.firestore import FirestoreStateStore  # noqa: PLC0415

        return FirestoreStateStore(
            project=self.settings.project,
            database=self.settings.firestore_database,
            collection=self.settings.firestore_collection,
            emulator_host=self.settings.firestore_emulator_host,
        )

    def memory_events(self) -> EventBus:
        from tokenbroker.adapters.memory import MemoryEventBus  # noqa: PLC0415

        return MemoryEventBus()

    def outbox(self) -> EventBus:
        from tokenbroker.adapters.embedded import EmbeddedOutbox  # noqa: PLC0415

        return EmbeddedOutbox(self.embedded_db())

    def pubsub(self) -> EventBus:
        from tokenbroker.adapters.gcp.pubsub import PubSubEventBus  # noqa: PLC0415

        return PubSubEventBus(self.settings.topic_path)


#: Adapter names (as settings spell them) -> factories, per port.
SECRET_STORES: dict[str, Callable[[_Adapters], SecretStore]] = {
    "memory": _Adapters.memory_secrets,
    "embedded": _Adapters.embedded_secrets,
    "secret-manager": _Adapters.secret_manager,
    "aws-secrets-manager": _Adapters.aws_secrets_manager,
}
STATE_STORES: dict[str, Callable[[_Adapters], StateStore]] = {
    "memory": _Adapters.memory_state,
    "embedded": _Adapters.embedded_state,
    "firestore": _Adapters.firestore,
}
EVENT_BUSES: dict[str, Callable[[_Adapters], EventBus]] = {
    "memory": _Adapters.memory_events,
    "outbox": _Adapters.outbox,
    "pubsub": _Adapters.pubsub,
}


def _pick(factories: Mapping[str, T], port: str, kind: str) -> T:
    try:
        return factories[kind]
    except KeyError:
        raise ConfigError(f"{port} {kind!r} is not available") from None
