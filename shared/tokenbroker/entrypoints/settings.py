"""Configuration, resolved one way everywhere: explicit argument, then environment, then default.

Settings are read once, when an entry point starts (cold start), never when a library module is
imported. Every variable name is a constant here and documented in the README.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from tokenbroker.kernel.errors import ConfigError
from tokenbroker.kernel.failpoints import check as arm_check
from tokenbroker.kernel.log import level_threshold
from tokenbroker.kernel.schedule import RefreshPolicy
from tokenbroker.kernel.secret import Secret

T = TypeVar("T")

ENV_BACKEND = "TOKENBROKER_BACKEND"
ENV_STATE_DIR = "TOKENBROKER_STATE_DIR"
ENV_ENCRYPTION_KEY = "TOKENBROKER_ENCRYPTION_KEY"
ENV_ENCRYPTION_KEY_FILE = "TOKENBROKER_ENCRYPTION_KEY_FILE"
ENV_PROFILES_FILE = "TOKENBROKER_PROFILES_FILE"
ENV_TICK_LIMIT = "TOKENBROKER_TICK_LIMIT"
ENV_CONCURRENCY = "TOKENBROKER_CONCURRENCY"
ENV_HTTP_TIMEOUT = "TOKENBROKER_HTTP_TIMEOUT_SECONDS"
ENV_LEASE_TTL = "TOKENBROKER_LEASE_TTL_SECONDS"
ENV_OVERLAP_FRACTION = "TOKENBROKER_OVERLAP_FRACTION"
ENV_MIN_LEAD = "TOKENBROKER_MIN_LEAD_SECONDS"
ENV_JITTER_FRACTION = "TOKENBROKER_JITTER_FRACTION"
ENV_RETRY_ATTEMPTS = "TOKENBROKER_RETRY_ATTEMPTS"
ENV_RETRY_BASE_DELAY = "TOKENBROKER_RETRY_BASE_DELAY_SECONDS"
ENV_RETAINED_VERSIONS = "TOKENBROKER_RETAINED_VERSIONS"
ENV_SECRET_STORE = "TOKENBROKER_SECRET_STORE"
ENV_STATE_STORE = "TOKENBROKER_STATE_STORE"
ENV_EVENT_BUS = "TOKENBROKER_EVENT_BUS"
ENV_GCP_PROJECT = "TOKENBROKER_GCP_PROJECT"
ENV_SECRET_PREFIX = "TOKENBROKER_SECRET_PREFIX"
ENV_FIRESTORE_DATABASE = "TOKENBROKER_FIRESTORE_DATABASE"
ENV_FIRESTORE_COLLECTION = "TOKENBROKER_FIRESTORE_COLLECTION"
ENV_PUBSUB_TOPIC = "TOKENBROKER_PUBSUB_TOPIC"
ENV_AWS_REGION = "TOKENBROKER_AWS_REGION"
ENV_AWS_ENDPOINT_URL = "TOKENBROKER_AWS_ENDPOINT_URL"
ENV_AWS_SECRET_PREFIX = "TOKENBROKER_AWS_SECRET_PREFIX"
#: Every URL of the issuer function, comma-separated: callers' ID tokens carry one as ``aud``
#: (a gen2 function answers on ``https://REGION-PROJECT.cloudfunctions.net/NAME`` and
#: ``https://NAME-HASH-REGION.a.run.app``).
ENV_ISSUER_AUDIENCE = "TOKENBROKER_ISSUER_AUDIENCE"
#: Who verifies callers' ID token signatures: ``platform`` (Cloud Run's IAM front end) or
#: ``verify`` (the issuer). docs/issuer.md, *Caller identity*.
ENV_CALLER_IDENTITY = "TOKENBROKER_CALLER_IDENTITY"
ENV_ID_TOKEN_ISSUERS = "TOKENBROKER_ID_TOKEN_ISSUERS"
ENV_ID_TOKEN_KEYS_URL = "TOKENBROKER_ID_TOKEN_KEYS_URL"
ENV_POLICY_FILE = "TOKENBROKER_POLICY_FILE"
ENV_IAM_CREDENTIALS_ENDPOINT = "TOKENBROKER_IAM_CREDENTIALS_ENDPOINT"
#: A static access token for the IAM Credentials API (local runs and tests), instead of
#: Application Default Credentials.
ENV_IAM_ACCESS_TOKEN = "TOKENBROKER_IAM_ACCESS_TOKEN"
#: The connect function (connecting accounts in the cloud): its public URL (the redirect URI
#: registered with providers is this + ``/callback``), how operators are identified
#: (``platform``: Cloud Run IAM; ``iap``: Identity-Aware Proxy's signed header), the ID
#: token audiences accepted in platform mode, IAP's audience and keys, who may connect
#: (emails or ``domain:NAME``), the key sealing sessions' verifiers (base64, 32 bytes; from
#: Secret Manager) and the sessions' collection.
ENV_CONNECT_URL = "TOKENBROKER_CONNECT_URL"
ENV_OPERATOR_IDENTITY = "TOKENBROKER_OPERATOR_IDENTITY"
ENV_CONNECT_AUDIENCE = "TOKENBROKER_CONNECT_AUDIENCE"
ENV_IAP_AUDIENCE = "TOKENBROKER_IAP_AUDIENCE"
ENV_IAP_KEYS_URL = "TOKENBROKER_IAP_KEYS_URL"
ENV_CONNECT_OPERATORS = "TOKENBROKER_CONNECT_OPERATORS"
ENV_SESSION_KEY = "TOKENBROKER_SESSION_KEY"
ENV_SESSIONS_COLLECTION = "TOKENBROKER_SESSIONS_COLLECTION"
ENV_LOG_LEVEL = "TOKENBROKER_LOG_LEVEL"
#: Test-only: failpoints to arm (``kernel/failpoints.py``); unset in production.
ENV_FAILPOINTS = "TOKENBROKER_FAILPOINTS"
ENV_LOG_FILE = "TOKENBROKER_LOG_FILE"
#: Where metrics go: ``cloud-monitoring`` (the gcp and aws presets' choice) or ``off``.
ENV_METRICS = "TOKENBROKER_METRICS"
#: ``host:port`` of a Cloud Monitoring test server (insecure channel); never in production.
ENV_MONITORING_ENDPOINT = "TOKENBROKER_MONITORING_ENDPOINT"
ENV_METRICS_INTERVAL = "TOKENBROKER_METRICS_INTERVAL_SECONDS"
ENV_METRICS_FLEET_INTERVAL = "TOKENBROKER_METRICS_FLEET_INTERVAL_SECONDS"
ENV_METRICS_CONNECTION_LIMIT = "TOKENBROKER_METRICS_CONNECTION_LIMIT"
#: The ``namespace`` and ``location`` labels of the metrics' monitored resource (Terraform
#: sets the module's name and the region).
ENV_METRICS_NAMESPACE = "TOKENBROKER_METRICS_NAMESPACE"
ENV_REGION = "TOKENBROKER_REGION"
#: Google's own variables, read here too so that nothing else reads the environment.
ENV_GOOGLE_CLOUD_PROJECT = "GOOGLE_CLOUD_PROJECT"
ENV_XDG_STATE_HOME = "XDG_STATE_HOME"
#: Cloud Run's revision name (https://cloud.google.com/run/docs/container-contract#env-vars):
#: part of each instance's metrics ``task_id``.
ENV_K_REVISION = "K_REVISION"
#: Cloud Run's service name (the function's name, same page): the ``function`` label of
#: every log line.
ENV_K_SERVICE = "K_SERVICE"
#: ``host:port`` of a Secret Manager test server (insecure channel); never in production.
ENV_SECRET_MANAGER_ENDPOINT = "TOKENBROKER_SECRET_MANAGER_ENDPOINT"
#: The Secret Manager request quotas the refresher paces itself by, per minute per project
#: (https://cloud.google.com/secret-manager/quotas: 600 each by default; set what the
#: project's quota page says when it was raised, less what other users of it spend).
ENV_SECRET_MANAGER_READS_PER_MINUTE = "TOKENBROKER_SECRET_MANAGER_READS_PER_MINUTE"
ENV_SECRET_MANAGER_WRITES_PER_MINUTE = "TOKENBROKER_SECRET_MANAGER_WRITES_PER_MINUTE"
#: The Firestore emulator's ``host:port``: Google's own variable, which the client library
#: also reads by itself (https://cloud.google.com/firestore/docs/emulator).
ENV_FIRESTORE_EMULATOR_HOST = "FIRESTORE_EMULATOR_HOST"
#: How messages name the embedded state directory: the variable, or the CLI's flag.
STATE_DIR_FIELD = f"state directory ({ENV_STATE_DIR} or --state-dir)"

#: Presets: which adapter serves each port.
BACKENDS: dict[str, tuple[str, str, str]] = {
    #          secret store      state store  event bus
    "embedded": ("embedded", "embedded", "outbox"),
    "memory": ("memory", "memory", "memory"),
    "gcp": ("secret-manager", "firestore", "pubsub"),
    # Credentials in AWS Secrets Manager; state and events stay on Firestore and Pub/Sub
    # (no DynamoDB/SNS adapters yet).
    "aws": ("aws-secrets-manager", "firestore", "pubsub"),
}
SECRET_STORES = ("embedded", "memory", "secret-manager", "aws-secrets-manager")
STATE_STORES = ("embedded", "memory", "firestore")
EVENT_BUSES = ("outbox", "memory", "pubsub")
CALLER_IDENTITIES = ("platform", "verify")
OPERATOR_IDENTITIES = ("platform", "iap")
METRICS_DESTINATIONS = ("off", "cloud-monitoring")
#: The metrics destination of each preset (``TOKENBROKER_METRICS`` overrides it).
BACKEND_METRICS = {"embedded": "off", "memory": "off", "gcp": "cloud-monitoring",
                   "aws": "cloud-monitoring"}  # fmt: skip
#: How many URLs the issuer may answer on (a gen2 function has two; custom domains add more).
MAX_AUDIENCES = 16


def default_state_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get(ENV_XDG_STATE_HOME) or str(Path.home() / ".local" / "state")
    return Path(base) / "tokenbroker"


def named_variable(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """The value of a variable the operator named (``--client-secret-env NAME``)."""
    env = os.environ if env is None else env
    return env.get(name)


@dataclass(frozen=True)
class LogSettings:
    """How the process starts: where the one logger writes (and, for the fault suite only, which
    failpoints are armed), resolved like everything else: explicit, env, default.

    Separate from :class:`Settings` so that a command that needs no backend (``tokenbroker
    profiles``, ``policy check``) can log before, and without, validating the backend's."""

    level: str
    file: Path | None = None
    #: Failpoints to arm (the fault suite only).
    failpoints: str | None = None
    #: The project traces are named in (``TOKENBROKER_GCP_PROJECT``, else
    #: ``GOOGLE_CLOUD_PROJECT``), and the function's name (``K_SERVICE``), for the log lines.
    project: str | None = None
    service: str | None = None

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        level: str | None = None,
        default_level: str = "info",
    ) -> LogSettings:
        env = os.environ if env is None else env
        chosen = level or env.get(ENV_LOG_LEVEL) or default_level
        try:
            level_threshold(chosen)
        except ValueError as error:
            raise ConfigError(f"{ENV_LOG_LEVEL}: {error}") from None
        file = env.get(ENV_LOG_FILE)
        failpoints = env.get(ENV_FAILPOINTS) or None
        try:
            arm_check(failpoints)
        except ValueError as error:
            raise ConfigError(f"{ENV_FAILPOINTS}: {error}") from None
        project = (env.get(ENV_GCP_PROJECT) or env.get(ENV_GOOGLE_CLOUD_PROJECT) or "").strip()
        service = (env.get(ENV_K_SERVICE) or "").strip()
        return cls(
            chosen.lower(),
            Path(file) if file else None,
            failpoints,
            project=project or None,
            service=service or None,
        )


@dataclass(frozen=True)
class Settings:
    backend: str = "embedded"
    state_dir: Path | None = None
    encryption_key: Secret | None = None
    encryption_key_file: Path | None = None
    profiles_file: Path | None = None
    tick_limit: int = 10_000
    concurrency: int = 256
    http_timeout: float = 10.0
    #: Short, renewed by heartbeat while in use, so a crashed holder's leases free quickly.
    lease_ttl_seconds: float = 30.0
    overlap_fraction: float = 0.5
    min_lead_seconds: float = 600.0
    jitter_fraction: float = 0.1
    retry_attempts: int = 3
    retry_base_delay: float = 0.5
    retained_versions: int = 3
    #: Per-port overrides of the preset (``None``: the preset's choice).
    secret_store: str | None = None
    state_store: str | None = None
    event_bus: str | None = None
    gcp_project: str | None = None
    secret_prefix: str = "tokenbroker-"
    firestore_database: str = "(default)"
    firestore_collection: str = "tokenbroker_connections"
    #: Test servers in place of the real services (``None``: the real ones).
    secret_manager_endpoint: str | None = None
    secret_manager_reads_per_minute: int = 600
    secret_manager_writes_per_minute: int = 600
    firestore_emulator_host: str | None = None
    pubsub_topic: str = "tokenbroker-events"
    aws_region: str | None = None
    aws_endpoint_url: str | None = None
    aws_secret_prefix: str = "tokenbroker/"
    #: The issuer: who may call it (Google ID tokens for one of these audiences: every URL of
    #: the function) and what they may do.
    issuer_audiences: tuple[str, ...] = ()
    #: ``platform`` (Cloud Run IAM verified the token) or ``verify`` (the issuer does).
    caller_identity: str = "verify"
    id_token_issuers: tuple[str, ...] = ("https://accounts.google.com", "accounts.google.com")
    id_token_keys_url: str = "https://www.googleapis.com/oauth2/v3/certs"
    policy_file: Path | None = None
    iam_credentials_endpoint: str = "https://iamcredentials.googleapis.com"
    iam_access_token: Secret | None = None
    #: The connect function (``ENV_CONNECT_URL`` and the variables after it).
    connect_url: str | None = None
    operator_identity: str = "platform"
    connect_audiences: tuple[str, ...] = ()
    iap_audiences: tuple[str, ...] = ()
    iap_keys_url: str = "https://www.gstatic.com/iap/verify/public_key-jwk"
    connect_operators: tuple[str, ...] = ()
    session_key: Secret | None = None
    #: ``None``: ``firestore_collection`` + ``_authorization_sessions``.
    sessions_collection: str | None = None
    #: Metrics: where (``None``: the preset's choice), how often the issuer writes, how often
    #: the refresher reads the whole fleet for its gauges (0: every tick), how many
    #: connections the per-connection gauges report; the resource's namespace and location.
    metrics: str | None = None
    monitoring_endpoint: str | None = None
    metrics_interval_seconds: float = 60.0
    metrics_fleet_interval_seconds: float = 300.0
    metrics_connection_limit: int = 200
    metrics_namespace: str = "tokenbroker"
    region: str = "global"
    k_revision: str | None = None
    #: ``GOOGLE_CLOUD_PROJECT``: the project when ``TOKENBROKER_GCP_PROJECT`` is not set.
    google_cloud_project: str | None = None
    #: ``XDG_STATE_HOME``: where the default state directory goes.
    xdg_state_home: Path | None = None

    @property
    def adapters(self) -> tuple[str, str, str]:
        """(secret store, state store, event bus) after overrides."""
        secrets, state, events = BACKENDS[self.backend]
        return (self.secret_store or secrets, self.state_store or state, self.event_bus or events)

    @property
    def metrics_destination(self) -> str:
        return self.metrics or BACKEND_METRICS[self.backend]

    @property
    def project(self) -> str:
        project = self.gcp_project or self.google_cloud_project
        if not project:
            raise ConfigError(f"{ENV_GCP_PROJECT} (or GOOGLE_CLOUD_PROJECT) is required")
        return project

    @property
    def topic_path(self) -> str:
        if self.pubsub_topic.startswith("projects/"):
            return self.pubsub_topic
        return f"projects/{self.project}/topics/{self.pubsub_topic}"

    @property
    def resolved_state_dir(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        if self.xdg_state_home is not None:
            return self.xdg_state_home / "tokenbroker"
        return default_state_dir({})

    def refresh_policy(self) -> RefreshPolicy:
        return RefreshPolicy(
            overlap_fraction=self.overlap_fraction,
            min_lead=timedelta(seconds=self.min_lead_seconds),
            jitter_fraction=self.jitter_fraction,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **explicit: Any) -> Settings:
        """Explicit keyword arguments win over the environment, which wins over defaults.
        A malformed variable raises :class:`ConfigError` naming it."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, variable, parse in _ENV_FIELDS:
            if explicit.get(name) is not None:
                values[name] = explicit[name]
            elif env.get(variable):
                values[name] = _parse(variable, env[variable], parse)
        unknown = set(explicit) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        choices: list[tuple[str | None, Iterable[str], str]] = [
            (self.backend, BACKENDS, ENV_BACKEND),
            (self.secret_store, SECRET_STORES, ENV_SECRET_STORE),
            (self.state_store, STATE_STORES, ENV_STATE_STORE),
            (self.event_bus, EVENT_BUSES, ENV_EVENT_BUS),
            (self.caller_identity, CALLER_IDENTITIES, ENV_CALLER_IDENTITY),
            (self.operator_identity, OPERATOR_IDENTITIES, ENV_OPERATOR_IDENTITY),
            (self.metrics, METRICS_DESTINATIONS, ENV_METRICS),
        ]
        for value, allowed, variable in choices:
            if value is not None and value not in allowed:
                known = ", ".join(allowed)
                raise ConfigError(f"{variable}: {_shown(value)} is not one of: {known}")
        for bound in BOUNDS:
            bound.check(getattr(self, bound.field))
        _check_audiences(self.issuer_audiences)
        for value, variable in ((self.metrics_namespace, ENV_METRICS_NAMESPACE),
                                (self.region, ENV_REGION)):  # fmt: skip
            if not _LABEL_VALUE.fullmatch(value):
                raise ConfigError(
                    f"{variable}: {_shown(value)} is not a label value (1-100 letters, digits,"
                    " '-', '_' or '.')"
                )


#: A metrics resource label value we write (Cloud Monitoring allows more; ours are names).
_LABEL_VALUE = re.compile(r"[A-Za-z0-9._-]{1,100}")


def _check_audiences(audiences: tuple[str, ...]) -> None:
    """Each an ``aud`` value callers' tokens carry: a URL (or a Cloud Run custom audience),
    without blanks or control characters; a handful at most."""
    if len(audiences) > MAX_AUDIENCES:
        raise ConfigError(f"{ENV_ISSUER_AUDIENCE}: at most {MAX_AUDIENCES} audiences")
    for audience in audiences:
        if (
            not isinstance(audience, str)
            or not audience
            or len(audience) > 512
            or not audience.isprintable()
            or any(c.isspace() for c in audience)
        ):
            raise ConfigError(f"{ENV_ISSUER_AUDIENCE}: {_shown(audience)} is not an audience")


def _listed(value: str) -> tuple[str, ...]:
    """A comma-separated list, blanks dropped."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _parse(variable: str, raw: str, parse: Callable[[str], T]) -> T:
    try:
        return parse(raw)
    except ValueError:
        raise ConfigError(f"{variable}: cannot parse {_shown(raw)}") from None


def _shown(raw: object) -> str:
    """A setting's value as an error message quotes it: a repr (control characters escaped),
    cut short, so a megabyte of garbage in a variable gives a one-line message."""
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Bound:
    """The range a numeric setting must lie in (closed unless ``open_low``), and why.

    Every numeric setting has one, upper bound included: a value parsed from the environment can
    be ``inf``, ``nan`` or ``1e308`` (Python's ``float`` accepts them all), and each of those
    turns into a loop that never ends, a sleep that never wakes or a lease nobody can take over.
    """

    field: str
    variable: str
    low: float
    high: float
    why: str
    open_low: bool = False
    open_high: bool = False

    def check(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self.variable}: must be a number, got {_shown(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{self.variable}: must be a finite number, got {_shown(value)}")
        below = value <= self.low if self.open_low else value < self.low
        above = value >= self.high if self.open_high else value > self.high
        if below or above:
            raise ConfigError(
                f"{self.variable}: must be in {self.range_text} ({self.why}), got {_shown(value)}"
            )

    @property
    def range_text(self) -> str:
        """The range in interval notation, as messages and the README write it: ``[1, 1024]``."""
        low = f"{'(' if self.open_low else '['}{_number(self.low)}"
        return f"{low}, {_number(self.high)}{')' if self.open_high else ']'}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


#: The documented range of every numeric setting (README, "Configuration").
BOUNDS: tuple[Bound, ...] = (
    Bound("tick_limit", ENV_TICK_LIMIT, 1, 100_000, "connections claimed per tick"),
    Bound("concurrency", ENV_CONCURRENCY, 1, 1024, "token requests in flight, one socket each"),
    Bound("http_timeout", ENV_HTTP_TIMEOUT, 0, 120, "seconds per token request", open_low=True),
    Bound(
        "lease_ttl_seconds",
        ENV_LEASE_TTL,
        20,
        3600,
        "longer than the 15 s kept before presenting; a crashed holder blocks this long",
    ),
    Bound(
        "overlap_fraction",
        ENV_OVERLAP_FRACTION,
        0,
        1,
        "of a token's lifetime",
        open_low=True,
        open_high=True,
    ),
    Bound("min_lead_seconds", ENV_MIN_LEAD, 0, 86_400, "at most a day before expiry"),
    Bound("jitter_fraction", ENV_JITTER_FRACTION, 0, 1, "of a token's lifetime", open_high=True),
    Bound("retry_attempts", ENV_RETRY_ATTEMPTS, 1, 10, "attempts per connection per tick"),
    Bound("retry_base_delay", ENV_RETRY_BASE_DELAY, 0, 60, "seconds of backoff base"),
    Bound("retained_versions", ENV_RETAINED_VERSIONS, 2, 100, "credential versions kept"),
    Bound(
        "secret_manager_reads_per_minute",
        ENV_SECRET_MANAGER_READS_PER_MINUTE,
        1,
        100_000,
        "Secret Manager read requests per minute the refresher may spend",
    ),
    Bound(
        "secret_manager_writes_per_minute",
        ENV_SECRET_MANAGER_WRITES_PER_MINUTE,
        1,
        100_000,
        "Secret Manager write requests per minute the refresher may spend",
    ),
    Bound(
        "metrics_interval_seconds",
        ENV_METRICS_INTERVAL,
        10,
        3600,
        "seconds between the issuer's metric writes (the API takes one point per 5 s)",
    ),
    Bound(
        "metrics_fleet_interval_seconds",
        ENV_METRICS_FLEET_INTERVAL,
        0,
        86_400,
        "seconds between fleet reads (one state read per connection)",
    ),
    Bound(
        "metrics_connection_limit",
        ENV_METRICS_CONNECTION_LIMIT,
        0,
        1000,
        "connections on the per-connection gauges",
    ),
)


_ENV_FIELDS: list[tuple[str, str, Callable[[str], Any]]] = [
    ("backend", ENV_BACKEND, str.strip),
    ("state_dir", ENV_STATE_DIR, Path),
    ("encryption_key", ENV_ENCRYPTION_KEY, Secret),
    ("encryption_key_file", ENV_ENCRYPTION_KEY_FILE, Path),
    ("profiles_file", ENV_PROFILES_FILE, Path),
    ("tick_limit", ENV_TICK_LIMIT, int),
    ("concurrency", ENV_CONCURRENCY, int),
    ("http_timeout", ENV_HTTP_TIMEOUT, float),
    ("lease_ttl_seconds", ENV_LEASE_TTL, float),
    ("overlap_fraction", ENV_OVERLAP_FRACTION, float),
    ("min_lead_seconds", ENV_MIN_LEAD, float),
    ("jitter_fraction", ENV_JITTER_FRACTION, float),
    ("retry_attempts", ENV_RETRY_ATTEMPTS, int),
    ("retry_base_delay", ENV_RETRY_BASE_DELAY, float),
    ("retained_versions", ENV_RETAINED_VERSIONS, int),
    ("secret_store", ENV_SECRET_STORE, str.strip),
    ("state_store", ENV_STATE_STORE, str.strip),
    ("event_bus", ENV_EVENT_BUS, str.strip),
    ("gcp_project", ENV_GCP_PROJECT, str.strip),
    ("secret_prefix", ENV_SECRET_PREFIX, str.strip),
    ("firestore_database", ENV_FIRESTORE_DATABASE, str.strip),
    ("firestore_collection", ENV_FIRESTORE_COLLECTION, str.strip),
    ("secret_manager_endpoint", ENV_SECRET_MANAGER_ENDPOINT, str.strip),
    ("secret_manager_reads_per_minute", ENV_SECRET_MANAGER_READS_PER_MINUTE, int),
    ("secret_manager_writes_per_minute", ENV_SECRET_MANAGER_WRITES_PER_MINUTE, int),
    ("firestore_emulator_host", ENV_FIRESTORE_EMULATOR_HOST, str.strip),
    ("pubsub_topic", ENV_PUBSUB_TOPIC, str.strip),
    ("aws_region", ENV_AWS_REGION, str.strip),
    ("aws_endpoint_url", ENV_AWS_ENDPOINT_URL, str.strip),
    ("aws_secret_prefix", ENV_AWS_SECRET_PREFIX, str.strip),
    (
        "issuer_audiences",
        ENV_ISSUER_AUDIENCE,
        lambda v: tuple(a.strip() for a in v.split(",") if a.strip()),
    ),
    ("caller_identity", ENV_CALLER_IDENTITY, lambda v: v.strip().lower()),
    (
        "id_token_issuers",
        ENV_ID_TOKEN_ISSUERS,
        lambda v: tuple(i.strip() for i in v.split(",") if i.strip()),
    ),
    ("id_token_keys_url", ENV_ID_TOKEN_KEYS_URL, str.strip),
    ("policy_file", ENV_POLICY_FILE, Path),
    ("iam_credentials_endpoint", ENV_IAM_CREDENTIALS_ENDPOINT, str.strip),
    ("iam_access_token", ENV_IAM_ACCESS_TOKEN, Secret),
    ("connect_url", ENV_CONNECT_URL, lambda v: v.strip().rstrip("/")),
    ("operator_identity", ENV_OPERATOR_IDENTITY, lambda v: v.strip().lower()),
    ("connect_audiences", ENV_CONNECT_AUDIENCE, _listed),
    ("iap_audiences", ENV_IAP_AUDIENCE, _listed),
    ("iap_keys_url", ENV_IAP_KEYS_URL, str.strip),
    ("connect_operators", ENV_CONNECT_OPERATORS, _listed),
    ("session_key", ENV_SESSION_KEY, Secret),
    ("sessions_collection", ENV_SESSIONS_COLLECTION, str.strip),
    ("metrics", ENV_METRICS, lambda v: v.strip().lower()),
    ("monitoring_endpoint", ENV_MONITORING_ENDPOINT, str.strip),
    ("metrics_interval_seconds", ENV_METRICS_INTERVAL, float),
    ("metrics_fleet_interval_seconds", ENV_METRICS_FLEET_INTERVAL, float),
    ("metrics_connection_limit", ENV_METRICS_CONNECTION_LIMIT, int),
    ("metrics_namespace", ENV_METRICS_NAMESPACE, str.strip),
    ("region", ENV_REGION, str.strip),
    ("k_revision", ENV_K_REVISION, str.strip),
    ("google_cloud_project", ENV_GOOGLE_CLOUD_PROJECT, str.strip),
    ("xdg_state_home", ENV_XDG_STATE_HOME, Path),
]
