"""Reading the issuer's policy file into the rule values of :mod:`tokenbroker.issue.policy`.

A policy is a TOML file versioned with the deployment (format: ``docs/policy.md``), read once at
start-up. It is validated strictly: an unknown field is an error, every error names the field
by its path and, when it can be found, the line (tomllib keeps no positions, so the line is
looked up afterwards), and a field that would allow nothing (an empty list) is an error rather
than a silent refusal. What the file does not grant stays denied: the rules are deny by default.

The rules module never imports this one: the decisions do not depend on where rules come from.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from tokenbroker.issue.policy import (
    BODY_METHODS,
    DEFAULT_RELAY_BODY_BYTES,
    DEFAULT_RELAY_TIMEOUT_SECONDS,
    DOMAIN_RE,
    FULL_SCOPE,
    MAX_LIFETIME_SECONDS,
    MAX_RELAY_BODY_BYTES,
    MAX_RELAY_TIMEOUT_SECONDS,
    MIN_LIFETIME_SECONDS,
    SUB_DELIMS,
    CredentialField,
    GrantRule,
    HttpMethod,
    Inject,
    IssuePolicy,
    RelayRoute,
    caller_key,
    is_scope,
)
from tokenbroker.kernel.errors import ConfigError
from tokenbroker.kernel.fields import FieldReader, ascii_lower, parse_enum
from tokenbroker.kernel.model import CONNECTION_ID_RE

POLICY_VERSION = 1


def load_policy(path: Path | str) -> IssuePolicy:
    """Read and validate the policy file at ``path``; a :class:`ConfigError` names the file,
    the field and the line at fault."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"policy file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"policy file {path}: not UTF-8 text") from None
    return parse_policy_text(text, source=str(path))


def parse_policy_text(text: str, source: str = "policy.toml") -> IssuePolicy:
    """Parse and validate. Errors read ``<source>: <field path>: <problem> (line N)``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message carries "(at line L, column C)"
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    try:
        return parse_policy(data, source=source)
    except ConfigError as error:
        line = _locate(text, error.message)
        suffix = f" (line {line})" if line else ""
        raise ConfigError(f"{source}: {error.message}{suffix}") from None


def parse_policy(data: Mapping[str, object], source: str = "policy") -> IssuePolicy:
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
    return IssuePolicy(grants=grants, relays=relays, source=source)


# --- fields -------------------------------------------------------------------------------------


def _tables(data: Mapping[str, object], name: str) -> list[tuple[str, object]]:
    value = data.get(name, [])
    if not isinstance(value, list):
        raise ConfigError(f"{name}: expected an array of tables ([[{name}]])")
    return [(f"{name}[{i}]", body) for i, body in enumerate(value)]


def _strings(data: Mapping[str, object], name: str, where: str) -> list[tuple[str, str]]:
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


def _bounded(reader: FieldReader, name: str, default: int, minimum: int, maximum: int) -> int:
    """An optional integer field, from ``minimum`` to ``maximum``."""
    value: int = reader.integer(name, default, minimum=minimum)
    if value > maximum:
        raise ConfigError(f"{reader.path(name)}: must be at most {maximum}")
    return value


def _connection_id(value: str, where: str) -> str:
    if not CONNECTION_ID_RE.match(value):
        raise ConfigError(
            f"{where}: {value!r} is not a valid id (1-63 lowercase letters, digits, '-' or '_',"
            " starting with a letter or digit)"
        )
    return value


def _parse_caller(value: str, where: str) -> str:
    """An exact email, or ``*@domain`` for every identity in that domain. Lower-cased."""
    pattern = ascii_lower(value)
    if pattern.startswith("*@"):
        if not DOMAIN_RE.fullmatch(pattern[2:]):
            raise ConfigError(f"{where}: {value!r} is not '*@' followed by a domain")
        return pattern
    if "*" in pattern:
        raise ConfigError(
            f"{where}: {value!r}: the only wildcard is a whole domain, written '*@domain'"
        )
    if caller_key(pattern) is None:
        raise ConfigError(f"{where}: {value!r} is not an email address")
    return pattern


def _callers(data: Mapping[str, object], where: str) -> tuple[str, ...]:
    patterns: dict[str, str] = {}
    for path, value in _strings(data, "callers", where):
        pattern = _parse_caller(value, path)
        if pattern in patterns:
            raise ConfigError(f"{path}: {value!r} is already listed at {patterns[pattern]}")
        patterns[pattern] = path
    return tuple(patterns)


# --- [[grants]] ---------------------------------------------------------------------------------

_GRANT_LISTS = ("callers", "connections", "scopes")


def _parse_grant(body: object, where: str) -> GrantRule:
    if not isinstance(body, Mapping):
        raise ConfigError(f"{where}: expected a table ([[grants]])")
    reader = FieldReader({k: v for k, v in body.items() if k not in _GRANT_LISTS}, where)
    lifetime = _bounded(
        reader,
        "max_lifetime_seconds",
        MAX_LIFETIME_SECONDS,
        minimum=MIN_LIFETIME_SECONDS,
        maximum=MAX_LIFETIME_SECONDS,
    )
    description: str = reader.text("description", "")
    reader.finish()
    callers = _callers(body, where)
    connections = tuple(
        _connection_id(value, path) for path, value in _strings(body, "connections", where)
    )
    scopes: list[str] = []
    for path, value in _strings(body, "scopes", where):
        if not is_scope(value):
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


# --- [[relays]] ---------------------------------------------------------------------------------

_RELAY_LISTS = ("callers", "methods", "path_prefixes")
_LITERAL_PATH_RE = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/]+")
_HOST_RE = re.compile(
    rf"localhost|{DOMAIN_RE.pattern}|\d{{1,3}}(?:\.\d{{1,3}}){{3}}|\[[0-9a-f:.]+\]"
)
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
    max_body = _bounded(
        reader, "max_body_bytes", DEFAULT_RELAY_BODY_BYTES, minimum=0, maximum=MAX_RELAY_BODY_BYTES
    )
    timeout = _bounded(
        reader,
        "timeout_seconds",
        DEFAULT_RELAY_TIMEOUT_SECONDS,
        minimum=1,
        maximum=MAX_RELAY_TIMEOUT_SECONDS,
    )
    description: str = reader.text("description", "")
    reader.finish()

    callers = _callers(body, where)
    methods = frozenset(
        parse_enum(HttpMethod, value, path) for path, value in _strings(body, "methods", where)
    )
    prefixes = tuple(
        _parse_prefix(value, path) for path, value in _strings(body, "path_prefixes", where)
    )
    body_fields = _body_fields(body_raw, f"{where}.body_fields", inject)
    if inject is Inject.BODY and not methods <= BODY_METHODS:
        bodiless = ", ".join(sorted(m.value for m in methods - BODY_METHODS))
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


def _parse_prefix(value: str, where: str) -> str:
    if value.startswith("/"):
        raise ConfigError(f"{where}: {value!r}: write the path relative to base_url, no leading /")
    if not _LITERAL_PATH_RE.fullmatch(value):
        raise ConfigError(
            f"{where}: {value!r}: use literal path characters (letters, digits, - . _ ~ "
            f"{SUB_DELIMS} /); no percent-encoding, spaces, ?, # or \\"
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
    """Relay names are unique, and no name is another relay's connection id:
    :meth:`IssuePolicy.relay` looks a relay up by either, so the two must not collide."""
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
