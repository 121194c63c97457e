"""The issuer's policy: which callers may use which connections, scopes, lifetimes and relays.

This module holds the rules as values (:class:`GrantRule`, :class:`RelayRoute`, gathered in an
:class:`IssuePolicy`) and the decisions taken on them (:meth:`IssuePolicy.authorize` answers a
:class:`TokenGrant`, :meth:`IssuePolicy.relay` a :class:`RelayRoute`, :meth:`IssuePolicy.explain`
an :class:`Explanation`): values in, values out, no I/O. Reading the policy file (format:
``docs/policy.md``) is :mod:`tokenbroker.issue.policy_file`, which produces these values; the
rules are precomputed into lookups when built, so a decision on the hot path is a couple of
dictionary reads.

Deny by default: a caller, connection, scope, method or path that no rule names is refused.
Refusals for connections and relays do not say whether the connection or relay exists (the
same :data:`DENIED` / :data:`RELAY_DENIED` message for both), so callers cannot enumerate them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from urllib.parse import quote, unquote_to_bytes, urlsplit

from tokenbroker.kernel.errors import BadRequest, PolicyDenied
from tokenbroker.kernel.fields import ascii_lower

#: Upper bound on any token lifetime the policy can grant (and the default): one hour, which
#: is also the most Google's ``generateAccessToken`` issues without an org-policy exception.
MAX_LIFETIME_SECONDS = 3600
MIN_LIFETIME_SECONDS = 60
MAX_RELAY_BODY_BYTES = 32 * 1024 * 1024  # Cloud Functions / Cloud Run request size limit
DEFAULT_RELAY_BODY_BYTES = 1024 * 1024
MAX_RELAY_TIMEOUT_SECONDS = 300
DEFAULT_RELAY_TIMEOUT_SECONDS = 30
MAX_RELAY_PATH_CHARS = 2048

#: The one refusal for a connection the caller may not use, whether or not it exists.
DENIED = "caller is not allowed this connection"
#: The one refusal for a relay the caller may not use, whether or not it exists.
RELAY_DENIED = "caller is not allowed this relay"

#: The scope that stands for the connection's full scope (a token that was not narrowed).
FULL_SCOPE = "*"


class HttpMethod(StrEnum):
    """Methods a relay may forward. Compared exactly: methods are case-sensitive (RFC 9110
    §9.1)."""

    GET = "GET"
    POST = "POST"
    PUT = "PUT"
    PATCH = "PATCH"
    DELETE = "DELETE"


#: The methods whose requests carry a body (RFC 9110 §9.3): the only ones ``inject = "body"``
#: can put a credential into.
BODY_METHODS = frozenset({HttpMethod.POST, HttpMethod.PUT, HttpMethod.PATCH})


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
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"  # RFC 1035 §2.3.1, lower-cased
#: A lower-case DNS name of two labels or more: the domain of a caller, or of a ``*@`` pattern.
DOMAIN_RE = re.compile(rf"(?:{_LABEL}\.)+{_LABEL}")
_EMAIL_RE = re.compile(rf"({_LOCAL})@({DOMAIN_RE.pattern})")
_MAX_EMAIL = 254  # RFC 5321 §4.5.3.1.3 path limit, less the angle brackets


def caller_key(email: object) -> tuple[str, str] | None:
    """``(email, domain)`` for a well-formed caller email (lower-cased), else ``None``.

    Checked on every request too: ``a@b@acme.com`` must not match ``*@acme.com``.
    """
    if not isinstance(email, str) or len(email) > _MAX_EMAIL:
        return None
    email = ascii_lower(email)
    match = _EMAIL_RE.fullmatch(email)
    return (email, match.group(2)) if match else None


def _split_callers(patterns: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
    """(exact emails, wildcard domains) of lower-cased caller patterns."""
    exact = {p for p in patterns if not p.startswith("*@")}
    domains = {p[2:] for p in patterns if p.startswith("*@")}
    return frozenset(exact), frozenset(domains)


def is_scope(value: object) -> bool:
    """RFC 6749 §3.3 scope-token: printable ASCII except space, ``"`` and ``\\``."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= 512
        and all("!" <= ch <= "~" and ch not in '"\\' for ch in value)
    )


# --- relay paths ---------------------------------------------------------------------------------

#: RFC 3986 §3.3 ``pchar`` characters besides unreserved ones; kept as they are when requoting.
SUB_DELIMS = "!$&'()*+,;=:@"
_PATH_SAFE = SUB_DELIMS + "-._~"
_REQUOTE_SAFE = _PATH_SAFE + "%"
_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
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


# --- the rules ------------------------------------------------------------------------------------


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
    """Everything one caller may do with one connection: the union of the grants that match.

    Lifetimes stay with the scopes they were granted for: ``scope_lifetimes`` is, per named
    scope, the longest lifetime among the grants naming it, and ``full_scope_lifetime`` the
    longest among the ``"*"`` grants (0: none). Merging two grants never lends one grant's
    lifetime to the other's scopes (:meth:`lifetime_for`)."""

    connection_id: str
    scopes: frozenset[str]
    full_scope_allowed: bool
    #: The longest lifetime any of the grants allows (for display; decisions use
    #: :meth:`lifetime_for`).
    max_lifetime_seconds: int
    scope_lifetimes: Mapping[str, int] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    full_scope_lifetime: int = 0

    def lifetime_for(self, scopes: tuple[str, ...] | None) -> int:
        """The longest lifetime a token of ``scopes`` (``None``: the full scope) may have:
        every one of its scopes must be granted for that long, by a grant naming it or a
        ``"*"`` grant."""
        if scopes is None:
            return self.full_scope_lifetime
        full = self.full_scope_lifetime
        return min((max(self.scope_lifetimes.get(s, 0), full) for s in scopes), default=full)

    def merged(self, other: ConnectionAllowance) -> ConnectionAllowance:
        lifetimes = dict(self.scope_lifetimes)
        for scope, seconds in other.scope_lifetimes.items():
            lifetimes[scope] = max(lifetimes.get(scope, 0), seconds)
        return ConnectionAllowance(
            connection_id=self.connection_id,
            scopes=self.scopes | other.scopes,
            full_scope_allowed=self.full_scope_allowed or other.full_scope_allowed,
            max_lifetime_seconds=max(self.max_lifetime_seconds, other.max_lifetime_seconds),
            scope_lifetimes=MappingProxyType(lifetimes),
            full_scope_lifetime=max(self.full_scope_lifetime, other.full_scope_lifetime),
        )


@dataclass(frozen=True)
class GrantRule:
    """One ``[[grants]]`` entry: ``callers`` are lower-cased patterns (an exact email, or
    ``*@domain``), ``scopes`` the scopes they may ask for, or ``("*",)`` for the full scope."""

    callers: tuple[str, ...]
    connections: tuple[str, ...]
    scopes: tuple[str, ...]
    max_lifetime_seconds: int = MAX_LIFETIME_SECONDS
    description: str = ""

    def allowance(self, connection_id: str) -> ConnectionAllowance:
        named = frozenset(s for s in self.scopes if s != FULL_SCOPE)
        full = FULL_SCOPE in self.scopes
        return ConnectionAllowance(
            connection_id=connection_id,
            scopes=named,
            full_scope_allowed=full,
            max_lifetime_seconds=self.max_lifetime_seconds,
            scope_lifetimes=MappingProxyType(dict.fromkeys(named, self.max_lifetime_seconds)),
            full_scope_lifetime=self.max_lifetime_seconds if full else 0,
        )


@dataclass(frozen=True)
class RelayRoute:
    """One ``[[relays]]`` entry: a fixed upstream base URL the broker calls for a caller, with
    the connection's credential injected, limited to some methods and path prefixes.

    ``base_url`` is canonical (lower-case scheme and host, a path ending with ``/``) and
    ``path_prefixes`` are literal paths relative to it, as the file reader produces them.
    """

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
    max_body_bytes: int = DEFAULT_RELAY_BODY_BYTES
    timeout_seconds: int = DEFAULT_RELAY_TIMEOUT_SECONDS
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
        key = caller_key(caller_email)
        return key is not None and (key[0] in self._exact or key[1] in self._domains)

    def check(self, method: str, path: str) -> str:
        """The decoded relative path when ``method`` and ``path`` are allowed; else
        :class:`PolicyDenied`. ``path`` is the raw (percent-encoded) path below the relay,
        without the query string."""
        if method not in self.methods:
            raise PolicyDenied(f"method not allowed: {method[:16]!r}")
        return self._allowed_path(path)[1]

    def url_for(self, path: str, query: str | None = None) -> str:
        """The upstream URL for a relative ``path`` (raw, percent-encoded) and optional raw
        ``query``. Checks the path prefix again and refuses any result whose scheme, host or
        port differs from ``base_url``, or whose path left it."""
        raw, _ = self._allowed_path(path)
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

    def _allowed_path(self, path: str) -> tuple[tuple[str, ...], str]:
        """(raw segments, decoded path) of a path below one of the prefixes; else a refusal."""
        raw, decoded = _segments(path)
        joined = "/".join(decoded)
        if not any(_within(joined, prefix) for prefix in self.path_prefixes):
            raise PolicyDenied(_PATH_NOT_ALLOWED)
        return raw, joined


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


@dataclass(frozen=True)
class Explanation:
    """What one caller may do (``tokenbroker policy explain``): its allowances, sorted by
    connection id, and its relays in policy order. Both empty: nothing (deny by default)."""

    caller: str
    connections: tuple[ConnectionAllowance, ...]
    relays: tuple[RelayRoute, ...]


_NO_ALLOWANCES: Mapping[str, ConnectionAllowance] = MappingProxyType({})


@dataclass(frozen=True)
class IssuePolicy:
    """The rules as written plus precomputed, read-only lookups. Immutable; ``source`` names
    where the rules came from (the policy file, for messages)."""

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
        by_caller: dict[str, dict[str, ConnectionAllowance]] = {}
        by_domain: dict[str, dict[str, ConnectionAllowance]] = {}
        for rule in self.grants:
            exact, domains = _split_callers(rule.callers)
            for table, keys in ((by_caller, exact), (by_domain, domains)):
                for key in keys:
                    allowances = table.setdefault(key, {})
                    for connection_id in rule.connections:
                        _add(allowances, rule.allowance(connection_id))
        # Grants that match one caller add up, exact and domain ones alike: merge them now so
        # a request is one lookup.
        for email, allowances in by_caller.items():
            for allowance in by_domain.get(email.rpartition("@")[2], {}).values():
                _add(allowances, allowance)
        object.__setattr__(self, "_by_caller", _freeze(by_caller))
        object.__setattr__(self, "_by_domain", _freeze(by_domain))
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

    @classmethod
    def deny_all(cls) -> IssuePolicy:
        """The policy with no entries: every request is refused."""
        return cls()

    # -- decisions -----------------------------------------------------------------------------

    def allowances(self, caller_email: str) -> Mapping[str, ConnectionAllowance]:
        """Connection -> what this caller may do with it (empty when nothing)."""
        key = caller_key(caller_email)
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
        lifetime = allowance.lifetime_for(scopes)
        if min_ttl_seconds is not None:
            if isinstance(min_ttl_seconds, bool) or not isinstance(min_ttl_seconds, int):
                raise BadRequest("min_ttl_seconds: must be an integer")
            if min_ttl_seconds < 0:
                raise BadRequest("min_ttl_seconds: must not be negative")
            if min_ttl_seconds > lifetime:
                raise PolicyDenied(
                    f"min_ttl_seconds {min_ttl_seconds} is longer than this caller's maximum "
                    f"token lifetime for these scopes ({lifetime}s)"
                )
        return TokenGrant(
            connection_id=connection_id,
            scopes=scopes,
            full_scope_allowed=allowance.full_scope_allowed,
            max_lifetime_seconds=lifetime,
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

    def explain(self, caller_email: str, connection_id: str | None = None) -> Explanation:
        """What ``caller_email`` may do; with ``connection_id``, only with that connection (or
        the relay of that name)."""
        return Explanation(
            caller=ascii_lower(caller_email),
            connections=tuple(
                allowance
                for cid, allowance in sorted(self.allowances(caller_email).items())
                if connection_id is None or cid == connection_id
            ),
            relays=tuple(
                route
                for route in self.relays_for(caller_email)
                if connection_id is None or connection_id in (route.connection, route.name)
            ),
        )

    def lifetime_notes(self) -> tuple[str, ...]:
        """What ``max_lifetime_seconds`` cannot promise, per grant that sets one shorter than
        an hour (``tokenbroker policy check`` prints these). The broker caps the lifetime it
        reports (``expires_in``) and how long it serves a token, but only a service-account
        token minted through IAM Credentials is *made* that short: a connection's own token
        (full-scope pass-through) or a narrowed one stays valid at the provider for as long
        as the provider issued it."""
        return tuple(
            f"grants[{n}] ({', '.join(rule.callers)} on {', '.join(rule.connections)}):"
            f" max_lifetime_seconds = {rule.max_lifetime_seconds} is the lifetime callers are"
            " told and served; tokens passed through or narrowed at the provider stay valid"
            " there as long as the provider made them (only service-account tokens are minted"
            " that short)"
            for n, rule in enumerate(self.grants)
            if rule.max_lifetime_seconds < MAX_LIFETIME_SECONDS
        )

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


def _add(table: dict[str, ConnectionAllowance], allowance: ConnectionAllowance) -> None:
    known = table.get(allowance.connection_id)
    table[allowance.connection_id] = known.merged(allowance) if known else allowance


def _freeze(
    table: dict[str, dict[str, ConnectionAllowance]],
) -> Mapping[str, Mapping[str, ConnectionAllowance]]:
    return MappingProxyType({k: MappingProxyType(v) for k, v in table.items()})


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
        if not is_scope(scope) or scope == FULL_SCOPE:
            raise BadRequest(f"scopes: {str(scope)[:64]!r} is not a scope")
        wanted.add(scope)
    if not allowance.full_scope_allowed:
        for scope in sorted(wanted):
            if scope not in allowance.scopes:
                raise PolicyDenied(f"scope not allowed: {scope}")
    return tuple(sorted(wanted))
