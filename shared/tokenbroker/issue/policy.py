"""The issuer's policy: which callers may use which connections, scopes, lifetimes and relays.

A policy is a TOML file versioned with the deployment (format: ``docs/policy.md``). It is read
once, validated strictly (unknown fields are errors; every error names the field path and, when
it can be found, the line), and turned into precomputed lookups, so a decision on the hot path
is a couple of dictionary reads.

Deny by default: a caller, connection, scope, method or path that no entry names is refused.
Refusals for connections and relays do not say whether the connection or relay exists (the
same :data:`DENIED` / :data:`RELAY_DENIED` message for both), so callers cannot enumerate them.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urlsplit

from tokenbroker.kernel.errors import BadRequest, ConfigError, PolicyDenied
from tokenbroker.kernel.fields import FieldReader, parse_enum
from tokenbroker.kernel.model import CONNECTION_ID_RE

POLICY_VERSION = 1
#: Upper bound on any token lifetime the policy can grant (and the default): one hour, which
#: is also the most Google's ``generateAccessToken`` issues without an org-policy exception.
MAX_LIFETIME_SECONDS = 3600
MIN_LIFETIME_SECONDS = 60
MAX_RELAY_BODY_BYTES = 32 * 1024 * 1024  # Cloud Functions / Cloud Run request size limit
MAX_RELAY_TIMEOUT_SECONDS = 300
MAX_RELAY_PATH_CHARS = 2048

#: The one refusal for a connection the caller may not use, whether or not it exists.
DENIED = "caller is not allowed this connection"
#: The one refusal for a relay the caller may not use, whether or not it exists.
RELAY_DENIED = "caller is not allowed this relay"

FULL_SCOPE = "*"


class HttpMethod(StrEnum):
    """Methods a relay may forward. Compared exactly: methods are case-sensitive (RFC 9110
    §9.1)."""

    GET = "GET"
    POST = "POST"
    PUT = "PUT"
    PATCH = "PATCH"
    DELETE = "DELETE"


_BODY_METHODS = frozenset({HttpMethod.POST, HttpMethod.PUT, HttpMethod.PATCH})


class Inject(StrEnum):
    """How a relay puts the connection's credential into the upstream request."""

    BEARER = "bearer"  # Authorization: Bearer <access token> (RFC 6750 §2.1)
    HEADER = "header"  # named headers, each carrying one credential attribute
    BODY = "body"  # top-level fields of the JSON request body (e.g. Omie's app_key/app_secret)


class CredentialField(StrEnum):
    """The credential attributes a relay may inject. Refresh tokens and private keys never
    leave the broker, not even towards the provider's API."""

    ACCESS_TOKEN = "access_token"  # noqa: S105 - an attribute name, not a secret
    CLIENT_ID = "client_id"
    CLIENT_SECRET = "client_secret"  # noqa: S105 - an attribute name, not a secret


# --- caller identities -------------------------------------------------------------------------

_LOCAL = r"[a-z0-9_+-]+(?:\.[a-z0-9_+-]+)*"
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = rf"(?:{_LABEL}\.)+{_LABEL}"
_EMAIL_RE = re.compile(rf"({_LOCAL})@({_DOMAIN})")
_DOMAIN_RE = re.compile(_DOMAIN)
_MAX_EMAIL = 254  # RFC 5321 §4.5.3.1.3 path limit, less the angle brackets


def _caller_key(email: object) -> tuple[str, str] | None:
    """``(email, domain)`` for a well-formed caller email (lower-cased), else ``None``.

    Checked on every request too: ``a@b@acme.com`` must not match ``*@acme.com``.
    """
    if not isinstance(email, str) or len(email) > _MAX_EMAIL:
        return None
    email = email.lower()
    match = _EMAIL_RE.fullmatch(email)
    return (email, match.group(2)) if match else None


def _parse_caller(value: str, where: str) -> str:
    """An exact email, or ``*@domain`` for every identity in that domain. Lower-cased."""
    pattern = value.lower()
    if pattern.startswith("*@"):
        if not _DOMAIN_RE.fullmatch(pattern[2:]):
            raise ConfigError(f"{where}: {value!r} is not '*@' followed by a domain")
        return pattern
    if "*" in pattern:
        raise ConfigError(
            f"{where}: {value!r}: the only wildcard is a whole domain, written '*@domain'"
        )
    if len(pattern) > _MAX_EMAIL or not _EMAIL_RE.fullmatch(pattern):
        raise ConfigError(f"{where}: {value!r} is not an email address")
    return pattern


def _split_callers(patterns: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
    """(exact emails, wildcard domains)."""
    exact = {p for p in patterns if not p.startswith("*@")}
    domains = {p[2:] for p in patterns if p.startswith("*@")}
    return frozenset(exact), frozenset(domains)


# --- relay paths and URLs ------------------------------------------------------------------------

#: RFC 3986 §3.3 ``pchar`` characters besides unreserved ones; kept as they are when requoting.
_SUB_DELIMS = "!$&'()*+,;=:@"
_PATH_SAFE = _SUB_DELIMS + "-._~"
_REQUOTE_SAFE = _PATH_SAFE + "%"
_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_LITERAL_PATH_RE = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/]+")
_HOST_RE = re.compile(rf"localhost|{_DOMAIN}|\d{{1,3}}(?:\.\d{{1,3}}){{3}}|\[[0-9a-f:.]+\]")
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2 token
#: Headers a relay must never set from a credential: framing, routing and hop-by-hop ones.
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-authenticate",
        "cookie",
        "forwarded",
    }
)
_BODY_FIELD_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PATH_NOT_ALLOWED = "path not allowed"


def _segments(path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split a raw (percent-encoded) relay path into (raw segments, decoded segments).

    Refuses, rather than repairs, anything that could change which resource is addressed
    once the upstream server decodes it: dot segments, encoded or raw ``/`` and ``\\`` inside
    a segment, double encoding, empty segments (``//host`` would be a network-path reference,
    RFC 3986 §4.2), a scheme (an absolute URL), control characters and raw non-ASCII.
    """
    if not isinstance(path, str) or len(path) > MAX_RELAY_PATH_CHARS:
        raise PolicyDenied(_PATH_NOT_ALLOWED)
    if any(not ("!" <= ch <= "~") or ch in "\\?#" for ch in path):
        raise PolicyDenied(_PATH_NOT_ALLOWED)
    if path.startswith("/"):
        path = path[1:]
    raw = tuple(path.split("/"))
    # RFC 3986 §4.2: the first segment of a relative-path reference cannot hold a colon, else
    # it reads as a scheme ("http:", "javascript:").
    if ":" in raw[0]:
        raise PolicyDenied(_PATH_NOT_ALLOWED)
    decoded: list[str] = []
    for index, segment in enumerate(raw):
        if not segment and index != len(raw) - 1:  # "a//b", or a leading "//"
            raise PolicyDenied(_PATH_NOT_ALLOWED)
        if _PERCENT_RE.search(segment):
            raise PolicyDenied(_PATH_NOT_ALLOWED)
        try:
            text = unquote_to_bytes(segment).decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyDenied(_PATH_NOT_ALLOWED) from None
        if text in (".", "..") or any(ch in "/\\%" or ch < " " or ch == "\x7f" for ch in text):
            raise PolicyDenied(_PATH_NOT_ALLOWED)
        decoded.append(text)
    return raw, tuple(decoded)


def _within(decoded_path: str, prefix: str) -> bool:
    """Prefix match on segment boundaries: ``a/b`` covers ``a/b`` and ``a/b/...``, not
    ``a/bc``; ``a/b/`` covers ``a/b/`` and ``a/b/...``."""
    if prefix.endswith("/"):
        return decoded_path.startswith(prefix)
    return decoded_path == prefix or decoded_path.startswith(prefix + "/")


def _parse_prefix(value: str, where: str) -> str:
    if value.startswith("/"):
        raise ConfigError(f"{where}: {value!r}: write the path relative to base_url, no leading /")
    if not _LITERAL_PATH_RE.fullmatch(value):
        raise ConfigError(
            f"{where}: {value!r}: use literal path characters (letters, digits, - . _ ~ "
            f"{_SUB_DELIMS} /); no percent-encoding, spaces, ?, # or \\"
        )
    parts = value.split("/")
    if any(p in (".", "..") for p in parts):
        raise ConfigError(f"{where}: {value!r}: dot segments ('.', '..') are not allowed")
    if any(not p for p in parts[:-1]):
        raise ConfigError(f"{where}: {value!r}: empty segments ('//') are not allowed")
    if ":" in parts[0]:
        raise ConfigError(f"{where}: {value!r}: the first segment cannot contain ':'")
    return value


def _parse_base_url(value: str, where: str) -> str:
    """The canonical base URL: lower-case scheme and host, a path ending with ``/``."""
    if any(not ("!" <= ch <= "~") or ch == "\\" for ch in value):
        raise ConfigError(f"{where}: spaces, control, non-ASCII characters and \\ are not allowed")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{where}: {value!r} is not a URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise ConfigError(f"{where}: {value!r}: must be an https:// URL")
    if "@" in parts.netloc:
        raise ConfigError(f"{where}: must not contain user information (user:password@)")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise ConfigError(f"{where}: must not have a query or fragment")
    host = (parts.netloc.rsplit(":", 1)[0] if port is not None else parts.netloc).lower()
    if not host or not _HOST_RE.fullmatch(host):
        raise ConfigError(f"{where}: {value!r} has no valid host name")
    if scheme == "http" and host not in _LOOPBACK_HOSTS:
        raise ConfigError(f"{where}: {value!r}: must be https (http only for localhost)")
    path = parts.path or "/"
    if path != "/":
        _parse_prefix(path[1:], where)  # literal characters only, no dot or empty segments
    if not path.endswith("/"):
        path += "/"
    netloc = f"{host}:{port}" if port is not None else host
    return f"{scheme}://{netloc}{path}"


# --- the parsed policy ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenGrant:
    """What the policy allows one token request.

    ``scopes`` is ``None`` for the connection's full scope (only when ``full_scope_allowed``),
    otherwise the exact scopes to issue, sorted.
    """

    connection_id: str
    scopes: tuple[str, ...] | None
    full_scope_allowed: bool
    max_lifetime_seconds: int


@dataclass(frozen=True)
class ConnectionAllowance:
    """Everything one caller may do with one connection: the union of the grants that match."""

    connection_id: str
    scopes: frozenset[str]
    full_scope_allowed: bool
    max_lifetime_seconds: int

    def merged(self, other: ConnectionAllowance) -> ConnectionAllowance:
        return ConnectionAllowance(
            connection_id=self.connection_id,
            scopes=self.scopes | other.scopes,
            full_scope_allowed=self.full_scope_allowed or other.full_scope_allowed,
            max_lifetime_seconds=max(self.max_lifetime_seconds, other.max_lifetime_seconds),
        )


@dataclass(frozen=True)
class GrantRule:
    """One ``[[grants]]`` entry as written."""

    callers: tuple[str, ...]
    connections: tuple[str, ...]
    scopes: tuple[str, ...]
    max_lifetime_seconds: int = MAX_LIFETIME_SECONDS
    description: str = ""

    def allowance(self, connection_id: str) -> ConnectionAllowance:
        return ConnectionAllowance(
            connection_id=connection_id,
            scopes=frozenset(s for s in self.scopes if s != FULL_SCOPE),
            full_scope_allowed=FULL_SCOPE in self.scopes,
            max_lifetime_seconds=self.max_lifetime_seconds,
        )


@dataclass(frozen=True)
class RelayRoute:
    """One ``[[relays]]`` entry: a fixed upstream base URL the broker calls for a caller, with
    the connection's credential injected, limited to some methods and path prefixes."""

    name: str
    connection: str
    callers: tuple[str, ...]
    base_url: str
    methods: frozenset[HttpMethod]
    path_prefixes: tuple[str, ...]
    inject: Inject
    #: For ``inject = "header"``: the header's name, and the credential attribute it carries.
    header: str | None = None
    header_value: CredentialField | None = None
    body_fields: Mapping[str, CredentialField] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    max_body_bytes: int = 1024 * 1024
    timeout_seconds: int = 30
    description: str = ""
    _exact: frozenset[str] = field(init=False, repr=False, compare=False)
    _domains: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        exact, domains = _split_callers(self.callers)
        object.__setattr__(self, "_exact", exact)
        object.__setattr__(self, "_domains", domains)
        object.__setattr__(self, "body_fields", MappingProxyType(dict(self.body_fields)))

    @property
    def credential_headers(self) -> frozenset[str]:
        """Lower-cased names of the headers this relay sets from the credential: the relay
        must drop any the caller sent, so a caller cannot pre-empt or duplicate them."""
        if self.inject is Inject.BEARER:
            return frozenset({"authorization"})
        return frozenset({self.header.lower()}) if self.header else frozenset()

    def allows_caller(self, caller_email: str) -> bool:
        key = _caller_key(caller_email)
        return key is not None and (key[0] in self._exact or key[1] in self._domains)

    def check(self, method: str, path: str) -> str:
        """The decoded relative path when ``method`` and ``path`` are allowed; else
        :class:`PolicyDenied`. ``path`` is the raw (percent-encoded) path below the relay,
        without the query string."""
        if method not in self.methods:
            raise PolicyDenied(f"method not allowed: {method[:16]!r}")
        _, decoded = _segments(path)
        joined = "/".join(decoded)
        if not any(_within(joined, prefix) for prefix in self.path_prefixes):
            raise PolicyDenied(_PATH_NOT_ALLOWED)
        return joined

    def url_for(self, path: str, query: str | None = None) -> str:
        """The upstream URL for a relative ``path`` (raw, percent-encoded) and optional raw
        ``query``. Checks the path prefix again and refuses any result whose scheme, host or
        port differs from ``base_url``, or whose path left it."""
        raw, decoded = _segments(path)
        if not any(_within("/".join(decoded), prefix) for prefix in self.path_prefixes):
            raise PolicyDenied(_PATH_NOT_ALLOWED)
        url = self.base_url + "/".join(quote(s, safe=_REQUOTE_SAFE) for s in raw)
        if query:
            if any(not ("!" <= ch <= "~") or ch in "#\\" for ch in query) or _PERCENT_RE.search(
                query
            ):
                raise PolicyDenied("query not allowed")
            url += "?" + quote(query, safe=_REQUOTE_SAFE + "/?")
        base, result = urlsplit(self.base_url), urlsplit(url)
        if (
            result.scheme != base.scheme
            or result.netloc != base.netloc
            or not result.path.startswith(base.path)
            or result.fragment
        ):
            raise PolicyDenied(_PATH_NOT_ALLOWED)
        return url


@dataclass(frozen=True)
class PolicySummary:
    grants: int
    relays: int
    callers: int
    connections: int

    def to_json(self) -> dict[str, int]:
        return {
            "grants": self.grants,
            "relays": self.relays,
            "callers": self.callers,
            "connections": self.connections,
        }


_NO_ALLOWANCES: Mapping[str, ConnectionAllowance] = MappingProxyType({})


@dataclass(frozen=True)
class IssuePolicy:
    """A loaded policy: the rules as written plus precomputed, read-only lookups."""

    grants: tuple[GrantRule, ...] = ()
    relays: tuple[RelayRoute, ...] = ()
    source: str = "policy"
    #: exact caller email -> connection -> allowance (its domain's wildcard grants merged in)
    _by_caller: Mapping[str, Mapping[str, ConnectionAllowance]] = field(
        init=False, repr=False, compare=False
    )
    #: domain -> connection -> allowance, for callers no exact entry names
    _by_domain: Mapping[str, Mapping[str, ConnectionAllowance]] = field(
        init=False, repr=False, compare=False
    )
    _relay_by_name: Mapping[str, RelayRoute] = field(init=False, repr=False, compare=False)
    _relays_by_connection: Mapping[str, tuple[RelayRoute, ...]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        by_domain: dict[str, dict[str, ConnectionAllowance]] = {}
        by_caller: dict[str, dict[str, ConnectionAllowance]] = {}
        for rule in self.grants:
            exact, domains = _split_callers(rule.callers)
            for table, keys in ((by_caller, exact), (by_domain, domains)):
                for key in keys:
                    _merge_into(table.setdefault(key, {}), rule)
        for email, allowances in by_caller.items():
            for allowance in by_domain.get(email.rpartition("@")[2], {}).values():
                known = allowances.get(allowance.connection_id)
                allowances[allowance.connection_id] = (
                    known.merged(allowance) if known else allowance
                )
        freeze = _freeze_allowances
        object.__setattr__(self, "_by_caller", freeze(by_caller))
        object.__setattr__(self, "_by_domain", freeze(by_domain))
        object.__setattr__(
            self, "_relay_by_name", MappingProxyType({r.name: r for r in self.relays})
        )
        by_connection: dict[str, list[RelayRoute]] = {}
        for route in self.relays:
            by_connection.setdefault(route.connection, []).append(route)
        object.__setattr__(
            self,
            "_relays_by_connection",
            MappingProxyType({k: tuple(v) for k, v in by_connection.items()}),
        )

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def deny_all(cls) -> IssuePolicy:
        """The policy with no entries: every request is refused."""
        return cls()

    @classmethod
    def load(cls, path: Path | str) -> IssuePolicy:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"policy file {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"policy file {path}: not UTF-8 text") from None
        return cls.from_text(text, source=str(path))

    @classmethod
    def from_text(cls, text: str, source: str = "policy.toml") -> IssuePolicy:
        """Parse and validate. Errors read ``<source>: <field path>: <problem> (line N)``."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:  # its message carries "(at line L, column C)"
            raise ConfigError(f"{source}: invalid TOML: {exc}") from None
        try:
            return cls.from_mapping(data, source=source)
        except ConfigError as error:
            line = _locate(text, error.message)
            suffix = f" (line {line})" if line else ""
            raise ConfigError(f"{source}: {error.message}{suffix}") from None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "policy") -> IssuePolicy:
        """Validate already-parsed data; error messages name the field path only."""
        lists = ("grants", "relays")
        reader = FieldReader({k: v for k, v in data.items() if k not in lists}, "")
        version = reader.integer("version")
        if version != POLICY_VERSION:
            raise ConfigError(
                f"version: unsupported policy version {version} (this broker reads "
                f"version {POLICY_VERSION})"
            )
        reader.finish()
        grants = tuple(_parse_grant(body, where) for where, body in _tables(data, "grants"))
        relays = tuple(_parse_relay(body, where) for where, body in _tables(data, "relays"))
        _check_relay_names(relays)
        return cls(grants=grants, relays=relays, source=source)

    # -- decisions -----------------------------------------------------------------------------

    def allowances(self, caller_email: str) -> Mapping[str, ConnectionAllowance]:
        """Connection -> what this caller may do with it (empty when nothing)."""
        key = _caller_key(caller_email)
        if key is None:
            return _NO_ALLOWANCES
        email, domain = key
        found = self._by_caller.get(email)
        if found is None:
            found = self._by_domain.get(domain, _NO_ALLOWANCES)
        return found

    def authorize(
        self,
        caller_email: str,
        connection_id: str,
        requested_scopes: Sequence[str] | None,
        min_ttl_seconds: int | None,
    ) -> TokenGrant:
        """Decide a token request, or raise :class:`PolicyDenied` (or :class:`BadRequest` for
        a malformed scope or lifetime).

        ``requested_scopes`` empty or ``None`` asks for the default: the connection's full
        scope when the caller is granted ``"*"``, else exactly the scopes the caller is
        granted for it (so a scoped caller never silently receives a full-scope token).
        """
        allowance = self.allowances(caller_email).get(connection_id)
        if allowance is None:
            raise PolicyDenied(DENIED)
        scopes = _granted_scopes(allowance, requested_scopes)
        if min_ttl_seconds is not None:
            if isinstance(min_ttl_seconds, bool) or not isinstance(min_ttl_seconds, int):
                raise BadRequest("min_ttl_seconds: must be an integer")
            if min_ttl_seconds < 0:
                raise BadRequest("min_ttl_seconds: must not be negative")
            if min_ttl_seconds > allowance.max_lifetime_seconds:
                raise PolicyDenied(
                    f"min_ttl_seconds {min_ttl_seconds} is longer than this caller's maximum "
                    f"token lifetime ({allowance.max_lifetime_seconds}s)"
                )
        return TokenGrant(
            connection_id=connection_id,
            scopes=scopes,
            full_scope_allowed=allowance.full_scope_allowed,
            max_lifetime_seconds=allowance.max_lifetime_seconds,
        )

    def relays_for(self, caller_email: str) -> tuple[RelayRoute, ...]:
        return tuple(r for r in self.relays if r.allows_caller(caller_email))

    def relay(
        self, caller_email: str, name_or_connection: str, method: str, path: str
    ) -> RelayRoute:
        """The route for a relay call, or :class:`PolicyDenied`.

        ``name_or_connection`` is a relay name, else a connection id: then the first of the
        caller's relays for that connection that allows ``method`` and ``path`` is chosen.
        ``path`` is the raw (percent-encoded) path below the relay, without the query.
        """
        named = self._relay_by_name.get(name_or_connection)
        candidates = (
            (named,)
            if named is not None
            else self._relays_by_connection.get(name_or_connection, ())
        )
        allowed = [r for r in candidates if r.allows_caller(caller_email)]
        if not allowed:
            raise PolicyDenied(RELAY_DENIED)
        first_error: PolicyDenied | None = None
        for route in allowed:
            try:
                route.check(method, path)
            except PolicyDenied as error:
                first_error = first_error or error
                continue
            return route
        raise first_error or PolicyDenied(RELAY_DENIED)

    # -- reporting -----------------------------------------------------------------------------

    def summary(self) -> PolicySummary:
        callers = {c for g in self.grants for c in g.callers}
        callers.update(c for r in self.relays for c in r.callers)
        connections = {c for g in self.grants for c in g.connections}
        connections.update(r.connection for r in self.relays)
        return PolicySummary(
            grants=len(self.grants),
            relays=len(self.relays),
            callers=len(callers),
            connections=len(connections),
        )


def _merge_into(table: dict[str, ConnectionAllowance], rule: GrantRule) -> None:
    for connection_id in rule.connections:
        allowance = rule.allowance(connection_id)
        known = table.get(connection_id)
        table[connection_id] = known.merged(allowance) if known else allowance


def _granted_scopes(
    allowance: ConnectionAllowance, requested: Sequence[str] | None
) -> tuple[str, ...] | None:
    """The scopes to issue (sorted), ``None`` for the full scope; or a refusal."""
    if isinstance(requested, str):
        raise BadRequest("scopes: expected a list of scopes, not one string")
    if not requested:
        return None if allowance.full_scope_allowed else tuple(sorted(allowance.scopes))
    wanted: set[str] = set()
    for scope in requested:
        if not _is_scope(scope) or scope == FULL_SCOPE:
            raise BadRequest(f"scopes: {str(scope)[:64]!r} is not a scope")
        wanted.add(scope)
    if not allowance.full_scope_allowed:
        for scope in sorted(wanted):
            if scope not in allowance.scopes:
                raise PolicyDenied(f"scope not allowed: {scope}")
    return tuple(sorted(wanted))


def _freeze_allowances(
    table: dict[str, dict[str, ConnectionAllowance]],
) -> Mapping[str, Mapping[str, ConnectionAllowance]]:
    return MappingProxyType({k: MappingProxyType(v) for k, v in table.items()})


# --- parsing --------------------------------------------------------------------------------------


def _is_scope(value: object) -> bool:
    """RFC 6749 §3.3 scope-token: printable ASCII except space, ``"`` and ``\\``."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= 512
        and all("!" <= ch <= "~" and ch not in '"\\' for ch in value)
    )


def _tables(data: Mapping[str, Any], name: str) -> list[tuple[str, object]]:
    value = data.get(name, [])
    if not isinstance(value, list):
        raise ConfigError(f"{name}: expected an array of tables ([[{name}]])")
    return [(f"{name}[{i}]", body) for i, body in enumerate(value)]


def _strings(data: Mapping[str, Any], name: str, where: str) -> list[tuple[str, str]]:
    """A required, non-empty list of non-empty strings without duplicates, as (path, value)."""
    path = f"{where}.{name}"
    if name not in data:
        raise ConfigError(f"{path}: required field is missing")
    value = data[name]
    if not isinstance(value, list):
        raise ConfigError(f"{path}: expected a list of strings")
    if not value:
        raise ConfigError(f"{path}: list at least one (an empty list would allow nothing)")
    seen: dict[str, int] = {}
    items: list[tuple[str, str]] = []
    for index, item in enumerate(value):
        item_path = f"{path}[{index}]"
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{item_path}: expected a non-empty string")
        if item in seen:
            raise ConfigError(f"{item_path}: {item!r} is already listed at {path}[{seen[item]}]")
        seen[item] = index
        items.append((item_path, item))
    return items


def _connection_id(value: str, where: str) -> str:
    if not CONNECTION_ID_RE.match(value):
        raise ConfigError(
            f"{where}: {value!r} is not a valid id (1-63 lowercase letters, digits, '-' or '_',"
            " starting with a letter or digit)"
        )
    return value


def _callers(data: Mapping[str, Any], where: str) -> tuple[str, ...]:
    patterns: dict[str, str] = {}
    for path, value in _strings(data, "callers", where):
        pattern = _parse_caller(value, path)
        if pattern in patterns:
            raise ConfigError(f"{path}: {value!r} is already listed at {patterns[pattern]}")
        patterns[pattern] = path
    return tuple(patterns)


_GRANT_LISTS = ("callers", "connections", "scopes")


def _parse_grant(body: object, where: str) -> GrantRule:
    if not isinstance(body, Mapping):
        raise ConfigError(f"{where}: expected a table ([[grants]])")
    reader = FieldReader({k: v for k, v in body.items() if k not in _GRANT_LISTS}, where)
    lifetime = reader.integer(
        "max_lifetime_seconds", MAX_LIFETIME_SECONDS, minimum=MIN_LIFETIME_SECONDS
    )
    if lifetime > MAX_LIFETIME_SECONDS:
        raise ConfigError(f"{where}.max_lifetime_seconds: must be at most {MAX_LIFETIME_SECONDS}")
    description = reader.text("description", "")
    reader.finish()
    callers = _callers(body, where)
    connections = tuple(
        _connection_id(value, path) for path, value in _strings(body, "connections", where)
    )
    scopes: list[str] = []
    for path, value in _strings(body, "scopes", where):
        if not _is_scope(value):
            raise ConfigError(
                f"{path}: {value!r} is not a scope (printable ASCII, no spaces, quotes or "
                "backslashes; list each scope separately)"
            )
        scopes.append(value)
    if FULL_SCOPE in scopes and len(scopes) > 1:
        raise ConfigError(
            f"{where}.scopes: '*' already allows every scope; list it alone or not at all"
        )
    return GrantRule(
        callers=callers,
        connections=connections,
        scopes=tuple(scopes),
        max_lifetime_seconds=lifetime,
        description=description,
    )


_RELAY_LISTS = ("callers", "methods", "path_prefixes")


def _parse_relay(body: object, where: str) -> RelayRoute:
    if not isinstance(body, Mapping):
        raise ConfigError(f"{where}: expected a table ([[relays]])")
    reader = FieldReader({k: v for k, v in body.items() if k not in _RELAY_LISTS}, where)
    name = _connection_id(reader.text("name"), reader.path("name"))
    connection = _connection_id(reader.text("connection"), reader.path("connection"))
    base_url = _parse_base_url(reader.text("base_url"), reader.path("base_url"))
    inject: Inject = reader.choice("inject", Inject)
    header = _header(reader, inject)
    header_value: CredentialField | None = None
    if inject is Inject.HEADER:
        header_value = reader.choice("header_value", CredentialField, CredentialField.ACCESS_TOKEN)
    else:
        _unused(reader, "header_value", inject)
    body_raw = reader.strings("body_fields", None)
    max_body = reader.integer("max_body_bytes", 1024 * 1024, minimum=0)
    if max_body > MAX_RELAY_BODY_BYTES:
        raise ConfigError(f"{where}.max_body_bytes: must be at most {MAX_RELAY_BODY_BYTES}")
    timeout = reader.integer("timeout_seconds", 30, minimum=1)
    if timeout > MAX_RELAY_TIMEOUT_SECONDS:
        raise ConfigError(f"{where}.timeout_seconds: must be at most {MAX_RELAY_TIMEOUT_SECONDS}")
    description = reader.text("description", "")
    reader.finish()

    callers = _callers(body, where)
    methods = frozenset(
        parse_enum(HttpMethod, value, path) for path, value in _strings(body, "methods", where)
    )
    prefixes = tuple(
        _parse_prefix(value, path) for path, value in _strings(body, "path_prefixes", where)
    )
    body_fields = _body_fields(body_raw, f"{where}.body_fields", inject)
    if inject is Inject.BODY and not methods <= _BODY_METHODS:
        bodiless = ", ".join(sorted(m.value for m in methods - _BODY_METHODS))
        raise ConfigError(
            f'{where}.methods: inject = "body" needs a request body; {bodiless} has none'
        )
    return RelayRoute(
        name=name,
        connection=connection,
        callers=callers,
        base_url=base_url,
        methods=methods,
        path_prefixes=prefixes,
        inject=inject,
        header=header,
        header_value=header_value,
        body_fields=body_fields,
        max_body_bytes=max_body,
        timeout_seconds=timeout,
        description=description,
    )


def _unused(reader: FieldReader, name: str, inject: Inject) -> None:
    if reader.text(name, None) is not None:
        raise ConfigError(
            f"{reader.path(name)}: not used when inject = {inject.value!r}; remove it"
        )


def _header(reader: FieldReader, inject: Inject) -> str | None:
    if inject is not Inject.HEADER:
        _unused(reader, "header", inject)
        return None
    name: str = reader.text("header")
    where = reader.path("header")
    if not _HEADER_NAME_RE.fullmatch(name):
        raise ConfigError(f"{where}: {name!r} is not a valid header name")
    if name.lower() in _RESERVED_HEADERS:
        raise ConfigError(f"{where}: {name!r} cannot carry a credential")
    return name


def _body_fields(
    raw: dict[str, str] | None, where: str, inject: Inject
) -> dict[str, CredentialField]:
    if raw is None:
        if inject is Inject.BODY:
            raise ConfigError(f"{where}: required when inject = {inject.value!r}")
        return {}
    if inject is not Inject.BODY:
        raise ConfigError(f"{where}: not used when inject = {inject.value!r}; remove it")
    if not raw:
        raise ConfigError(f"{where}: list at least one")
    for name in raw:
        if not _BODY_FIELD_RE.fullmatch(name):
            raise ConfigError(f"{where}.{name}: field names are 1-64 letters, digits, '_' or '-'")
    return {k: parse_enum(CredentialField, v, f"{where}.{k}") for k, v in raw.items()}


def _check_relay_names(relays: Sequence[RelayRoute]) -> None:
    names: dict[str, int] = {}
    for index, route in enumerate(relays):
        if route.name in names:
            raise ConfigError(
                f"relays[{index}].name: {route.name!r} is already the name of "
                f"relays[{names[route.name]}]"
            )
        names[route.name] = index
    for index, route in enumerate(relays):
        for other in relays:
            if other is not route and other.connection == route.name:
                raise ConfigError(
                    f"relays[{index}].name: {route.name!r} is the connection of relay "
                    f"{other.name!r}; a relay name must not also be another relay's connection "
                    "id (relays are looked up by either)"
                )


# --- line numbers for semantic errors -------------------------------------------------------------

_PATH_RE = re.compile(
    r"^(?:unknown field\(s\): )?(?P<path>[A-Za-z_][\w-]*(?:\[\d+\])?(?:\.[\w-]+)?)"
)


def _locate(text: str, message: str) -> int | None:
    """Best-effort 1-based line of the field an error names (tomllib keeps no positions).

    Finds the ``[[grants]]``/``[[relays]]`` header of the indexed table, then the first line in
    it that assigns the field; falls back to the header line. ``None`` when not found (e.g. for
    tables written inline).
    """
    match = _PATH_RE.match(message)
    if not match:
        return None
    head, _, key = match.group("path").partition(".")
    table, _, index_text = head.partition("[")
    lines = text.splitlines()
    header_re = re.compile(r"^\s*\[")
    if not index_text:  # a top-level field: look before the first table header
        key = table
        start, end = 0, next((i for i, ln in enumerate(lines) if header_re.match(ln)), len(lines))
        header_line = None
    else:
        index = int(index_text.rstrip("]"))
        own = re.compile(rf"^\s*\[\[\s*{re.escape(table)}\s*\]\]")
        headers = [i for i, ln in enumerate(lines) if own.match(ln)]
        if index >= len(headers):
            return None
        start = headers[index] + 1
        end = next((i for i in range(start, len(lines)) if header_re.match(lines[i])), len(lines))
        header_line = headers[index] + 1
    if key:
        assign = re.compile(rf"""^\s*["']?{re.escape(key)}["']?\s*=""")
        for i in range(start, end):
            if assign.match(lines[i]):
                return i + 1
        if header_line is None:  # an unknown top-level table: its header
            own = re.compile(rf"^\s*\[\[?\s*{re.escape(key)}\s*[\].]")
            return next((i + 1 for i, ln in enumerate(lines) if own.match(ln)), None)
    return header_line
