"""``tokenbroker``: the operator's command line.

Secrets are read from a file, standard input (``-``) or a named environment variable, never
from a command-line argument (arguments are visible in ``ps`` and shell history).
Exit codes: 0 ok, 1 a failure (a refresh failed, a connection was not found), 2 bad usage or
configuration.

Bad input never gets further than the message that names it: every option and secret is
checked (sizes bounded, control characters refused, token endpoints https) before anything is
opened, and no error, expected or not, prints a traceback. Only ``add`` creates state: every
other command opens an existing state directory or says that there is none, so a mistyped
``--state-dir`` creates neither a directory nor a key.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import click

from tokenbroker.entrypoints.answers import EXIT_FAILURE, exit_code
from tokenbroker.entrypoints.settings import named_variable
from tokenbroker.kernel.clock import isoformat
from tokenbroker.kernel.errors import (
    AccessDenied,
    ConfigError,
    ExpiredToken,
    TokenBrokerError,
)
from tokenbroker.kernel.log import get_logger
from tokenbroker.kernel.model import (
    ClientAuthMethod,
    Connection,
    ConnectionRecord,
    ConnectionStatus,
    Credential,
    GrantType,
    recovery_step,
    validate_connection_id,
)
from tokenbroker.kernel.secret import Secret

if TYPE_CHECKING:
    from tokenbroker.entrypoints.compose import Runtime
    from tokenbroker.entrypoints.settings import Settings
    from tokenbroker.oauth.profiles import ProviderProfile
    from tokenbroker.refresh.authorize import Connected
    from tokenbroker.refresh.fleet import FleetHealth
    from tokenbroker.refresh.registry import ConnectionRegistry

#: A refresh token or client secret is far smaller (Google's are ~100 bytes, a JWT-shaped token
#: a few KB); a Google service-account key file is ~2.4 KB. Input beyond is refused unread.
MAX_TOKEN_BYTES = 16 * 1024
MAX_KEY_FILE_BYTES = 64 * 1024
MAX_TEXT_CHARS = 1024
MAX_URL_CHARS = 2048
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})
#: RFC 6749 appendix A: client_id, client_secret and refresh tokens are ``*VSCHAR``
#: (``%x20-7E``); a scope token is ``1*( %x21 / %x23-5B / %x5D-7E )`` (section 3.3).
_VSCHAR = re.compile(r"[\x20-\x7e]*")
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


@dataclass
class _Context:
    json: bool
    options: dict[str, Any]
    _settings: Settings | None = None
    _runtime: Runtime | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from tokenbroker.entrypoints.settings import Settings  # noqa: PLC0415

            self._settings = Settings.from_env(**self.options)
        return self._settings

    def profiles(self) -> Mapping[str, ProviderProfile]:
        """The provider profiles, without opening (or creating) any state."""
        from tokenbroker.oauth.profiles import load_profiles  # noqa: PLC0415

        return load_profiles(self.settings.profiles_file)

    @property
    def runtime(self) -> Runtime:
        """The runtime over existing state (never created here: see :meth:`open`)."""
        return self.open(create=False)

    def open(self, *, create: bool) -> Runtime:
        if self._runtime is None:
            from tokenbroker.entrypoints.compose import build_runtime  # noqa: PLC0415

            self._runtime = build_runtime(self.settings, create=create)
        return self._runtime

    def registry(self, *, create: bool = False) -> ConnectionRegistry:
        return self.open(create=create).registry()


pass_ctx = click.make_pass_decorator(_Context)


@contextmanager
def _errors() -> Iterator[None]:
    """Map every error to a message and an exit code: never a traceback. Library errors carry
    their own message (it names the field); anything else is a bug, said in one line, with the
    traceback in the log at debug level (``--log-level debug``)."""
    try:
        yield
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise  # click's own: usage errors (2), aborts (1), explicit exits
    except TokenBrokerError as error:
        click.echo(f"error: {error.message}", err=True)
        sys.exit(exit_code(error))
    except Exception as bug:  # a bug: one line here, the traceback in the log  # noqa: BLE001
        get_logger(component="cli").debug(
            "unexpected exception", exception_type=type(bug).__name__,
            traceback=traceback.format_exc(),
        )  # fmt: skip
        click.echo(
            f"error: unexpected {type(bug).__name__} (a bug in tokenbroker; run again with "
            "--log-level debug for the details)",
            err=True,
        )
        sys.exit(EXIT_FAILURE)


class _Commands(click.Group):
    """The command group, with every command run inside the one error mapping."""

    def invoke(self, ctx: click.Context) -> Any:
        with _errors():
            return super().invoke(ctx)


class _Seconds(click.ParamType[float]):
    """A finite number of seconds within bounds: ``inf``, ``nan`` and ``-1`` are refused
    (click's ``FloatRange`` lets ``nan`` through, and ``--interval 0`` ticked without pause)."""

    name = "seconds"

    def __init__(self, low: float, high: float, *, open_low: bool = False) -> None:
        self.low, self.high, self.open_low = low, high, open_low

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            number = value
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                self.fail(f"{_shown(value)} is not a number of seconds", param, ctx)
        low = "more than" if self.open_low else "at least"
        too_low = number <= self.low if self.open_low else number < self.low
        if not math.isfinite(number) or too_low or number > self.high:
            self.fail(
                f"{_shown(value)}: must be a finite number of seconds, {low} {self.low:g} and "
                f"at most {self.high:g}",
                param,
                ctx,
            )
        return number


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _option_error(option: str, problem: str) -> click.BadParameter:
    return click.BadParameter(problem, param_hint=f"'{option}'")


def _expires_in(expires_at: datetime | None, now: datetime) -> str:
    if expires_at is None:
        return "-"
    seconds = int((expires_at - now).total_seconds())
    if seconds < 0:
        return "expired"
    if seconds >= 3600:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([line.rstrip(), *(b.rstrip() for b in body)])


def _record_json(record: ConnectionRecord) -> dict[str, Any]:
    return {
        "connection": record.connection.to_json(),
        "state": record.state.to_json(),
        "next_step": _next_step(record),
    }


def _emit(ctx: _Context, data: Any, human: Callable[[], str]) -> None:
    click.echo(json.dumps(data, indent=2) if ctx.json else human())


@dataclass(frozen=True)
class _SecretInput:
    """Where one secret may come from, and what shape it must have."""

    what: str
    file_option: str
    env_option: str | None = None
    #: A service-account key file (JSON, several lines) rather than a one-line token.
    key_file: bool = False


_REFRESH_TOKEN = _SecretInput("the refresh token", "--refresh-token-file", "--refresh-token-env")
_CLIENT_SECRET = _SecretInput("the client secret", "--client-secret-file", "--client-secret-env")
_KEY_FILE = _SecretInput("the service account key", "--service-account-key-file", key_file=True)


def _read_secret(source: _SecretInput, file: str | None, env: str | None) -> Secret | None:
    """The secret from its file, stdin or named variable, checked: bounded in size, UTF-8, and
    for a token one line of printable ASCII (RFC 6749 appendix A: ``VSCHAR``). Messages name
    the option and the problem, never the value."""
    if file and env:
        raise click.UsageError(f"give {source.what} by file or by environment variable, not both")
    limit = MAX_KEY_FILE_BYTES if source.key_file else MAX_TOKEN_BYTES
    if env:
        option = f"{source.env_option} {env}"
        value = named_variable(env)
        if not value:
            raise click.UsageError(f"environment variable {env} (for {source.what}) is not set")
        try:
            raw = value.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes in the environment (surrogate escapes)
            raise _option_error(option, f"{source.what} is not UTF-8 text") from None
    elif file:
        option = f"{source.file_option} {file}"
        raw = _read_bounded(file, limit, option, source.what)
    else:
        return None
    return Secret(_checked_secret(raw, limit, option, source))


def _read_bounded(file: str, limit: int, option: str, what: str) -> bytes:
    if file == "-":
        return sys.stdin.buffer.read(limit + 1)
    try:
        with Path(file).open("rb") as handle:
            return handle.read(limit + 1)
    except OSError as exc:
        raise _option_error(option, f"cannot read {what}: {exc.strerror or exc}") from None


def _checked_secret(raw: bytes, limit: int, option: str, source: _SecretInput) -> str:
    what = source.what
    if len(raw) > limit:
        raise _option_error(option, f"{what} is larger than {limit // 1024} KiB; refused unread")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _option_error(option, f"{what} is not UTF-8 text (binary input?)") from None
    value = text.strip()
    if not value:
        raise _option_error(option, f"{what} is empty")
    if source.key_file:
        if any(not c.isprintable() and c not in "\n\r\t" for c in value):
            raise _option_error(option, f"{what} contains control characters")
        from tokenbroker.oauth.grants import service_account_info  # noqa: PLC0415

        try:
            service_account_info(Secret(value))
        except ConfigError as error:
            raise _option_error(option, error.message) from None
        return value
    if "\n" in value or "\r" in value:
        raise _option_error(option, f"{what} spans several lines; give the value alone")
    if not _VSCHAR.fullmatch(value):
        raise _option_error(
            option,
            f"{what} contains control or non-ASCII characters (RFC 6749 appendix A allows "
            "printable ASCII only); the value is not shown",
        )
    return value


def _checked_text(option: str, value: str | None, pattern: re.Pattern[str]) -> str | None:
    """A non-secret option: bounded, and matching its grammar (messages may quote it, escaped)."""
    if value is None:
        return None
    if not value or len(value) > MAX_TEXT_CHARS:
        raise _option_error(option, f"must be 1 to {MAX_TEXT_CHARS} characters")
    if not pattern.fullmatch(value):
        raise _option_error(option, f"{_shown(value)} has characters it may not contain")
    return value


def _checked_token_url(url: str | None) -> str | None:
    """The token endpoint: ``https`` (RFC 6749 section 3.2 requires TLS: it receives client
    secrets and refresh tokens), plain ``http`` only to a loopback address; no user info (it
    would be stored and shown as a credential in the clear) and no fragment (section 3.2)."""
    option = "--token-url"
    if url is None:
        return None
    if len(url) > MAX_URL_CHARS or not url.isprintable() or any(c.isspace() for c in url):
        raise _option_error(
            option, f"must be a URL of at most {MAX_URL_CHARS} characters, without spaces"
        )
    try:
        parts = urlsplit(url)  # raises for a malformed IPv6 literal ("https://[::1/")
        host, _ = parts.hostname, parts.port
    except ValueError as error:
        raise _option_error(option, f"{_shown(url)} is not a valid URL ({error})") from None
    if parts.scheme not in ("https", "http") or not host:
        raise _option_error(option, f"{_shown(url)} is not an http(s) URL with a host")
    if parts.scheme == "http" and not _is_loopback(host):
        raise _option_error(option, "must use https (http is allowed for loopback hosts only)")
    if parts.username is not None or parts.password is not None:
        raise _option_error(option, "must not carry user info (a credential in the URL)")
    if parts.fragment or url.endswith("#"):
        raise _option_error(option, "must not have a fragment (RFC 6749 section 3.2)")
    return url


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--state-dir", type=click.Path(path_type=Path), help="Embedded state directory.")
@click.option(
    "--backend",
    type=click.Choice(["embedded", "gcp", "aws", "memory"]),
    help="Backend preset (see docs/gcp.md).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default=None,
    help="Log level for the JSON log lines on stderr (default: warning).",
)
@click.pass_context
def main(
    click_ctx: click.Context,
    state_dir: Path | None,
    backend: str | None,
    as_json: bool,
    log_level: str | None,
) -> None:
    """tokenbroker: keeps OAuth connections refreshed and hands out short-lived tokens."""
    from tokenbroker.entrypoints.compose import start_logging  # noqa: PLC0415

    start_logging(level=log_level, default_level="warning")
    options = {"state_dir": state_dir, "backend": backend}
    click_ctx.obj = _Context(json=as_json, options={k: v for k, v in options.items() if v})
    click_ctx.call_on_close(lambda: click_ctx.obj._runtime and click_ctx.obj._runtime.close())


@main.command()
@click.argument("connection_id")
@click.option("--profile", default="generic", show_default=True, help="Provider profile.")
@click.option(
    "--grant",
    type=click.Choice([g.value for g in GrantType]),
    required=True,
    help="How the broker obtains tokens.",
)
@click.option("--client-id")
@click.option("--scope", "scopes", multiple=True, help="A scope (repeat, or space-separated).")
@click.option("--token-url", help="Token endpoint (overrides the profile's).")
@click.option("--auth-method", type=click.Choice([m.value for m in ClientAuthMethod]))
@click.option("--param", "params", multiple=True, help="Profile parameter NAME=VALUE.")
@click.option("--client-secret-file", help="File holding the client secret ('-' for stdin).")
@click.option("--client-secret-env", help="Environment variable holding the client secret.")
@click.option("--refresh-token-file", help="File holding the refresh token ('-' for stdin).")
@click.option("--refresh-token-env", help="Environment variable holding the refresh token.")
@click.option("--service-account-key-file", help="Google service-account key JSON ('-': stdin).")
@click.option("--no-refresh", is_flag=True, help="Register only; do not refresh now.")
@pass_ctx
def add(ctx: _Context, /, connection_id: str, **opts: Any) -> None:
    """Register a connection and refresh it once, to prove it works: if that refresh fails,
    the connection is removed again (nothing is registered); --no-refresh registers only."""
    stdin_uses = [
        k
        for k in ("client_secret_file", "refresh_token_file", "service_account_key_file")
        if opts[k] == "-"
    ]
    if len(stdin_uses) > 1:
        raise click.UsageError("only one secret can be read from standard input")
    connection = _connection_from_options(connection_id, opts)
    credential = Credential(
        client_secret=_read_secret(
            _CLIENT_SECRET, opts["client_secret_file"], opts["client_secret_env"]
        ),
        refresh_token=_read_secret(
            _REFRESH_TOKEN, opts["refresh_token_file"], opts["refresh_token_env"]
        ),
        private_key=_read_secret(_KEY_FILE, opts["service_account_key_file"], None),
    )
    _check_registration(ctx.profiles(), connection, credential)
    # Everything is checked: only now is state opened, and created if there is none.
    record = ctx.registry(create=True).register(connection, credential)
    if opts["no_refresh"]:
        _emit(
            ctx,
            {**_record_json(record), "registered": True},
            lambda: _describe(record, ctx.runtime.clock.now()),
        )
        return
    _first_refresh(ctx, record)


def _connection_from_options(connection_id: str, opts: Mapping[str, Any]) -> Connection:
    """The connection the options describe, every field checked before anything is opened."""
    if len(connection_id) > 63:
        raise _option_error("CONNECTION_ID", "must be at most 63 characters")
    validate_connection_id(connection_id)
    params: dict[str, str] = {}
    for item in opts["params"]:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.UsageError(f"--param expects NAME=VALUE, got {_shown(item)}")
        if not _PARAM_NAME.fullmatch(name):
            raise _option_error("--param", f"{_shown(name)} is not a parameter name")
        if len(value) > MAX_TEXT_CHARS or not value.isprintable() or value != value.strip():
            raise _option_error(
                f"--param {name}", f"the value must be printable text of at most {MAX_TEXT_CHARS}"
                " characters, without surrounding spaces",
            )  # fmt: skip
        params[name] = value
    scopes = tuple(s for chunk in opts["scopes"] for s in chunk.split())
    if len(scopes) > 100:
        raise _option_error("--scope", "at most 100 scopes")
    for scope in scopes:
        _checked_text("--scope", scope, _SCOPE_TOKEN)
    return Connection(
        id=connection_id,
        profile=_checked_text("--profile", opts["profile"], _PARAM_NAME) or "generic",
        grant=GrantType(opts["grant"]),
        client_id=_checked_text("--client-id", opts["client_id"], _VSCHAR),
        scopes=scopes,
        token_url=_checked_token_url(opts["token_url"]),
        auth_method=ClientAuthMethod(opts["auth_method"]) if opts["auth_method"] else None,
        params=params,
    )


def _check_registration(
    profiles: Mapping[str, ProviderProfile], connection: Connection, credential: Credential
) -> ProviderProfile:
    """What the registry checks, done before any state is opened, so refused input leaves a
    state directory as it was, or absent."""
    from tokenbroker.oauth.acquire import check_material  # noqa: PLC0415

    profile = profiles.get(connection.profile)
    if profile is None:
        known = ", ".join(sorted(profiles))
        raise ConfigError(
            f"profile: {connection.profile!r} is not a known profile (known: {known})"
        )
    profile.check_connection(connection)
    check_material(connection, credential)
    return profile


def _first_refresh(ctx: _Context, record: ConnectionRecord) -> None:
    """The proof that a new connection works, and what happens when it does not.

    A refresh that the provider refused (or could not answer) removes the connection again:
    ``add`` either proves the material or registers nothing, so the corrected command can simply
    be run again (keeping it would answer that with ``already_exists``, and a wrong token URL or
    client id cannot be fixed by ``reauth``). The operator still holds the material given, so
    removing it loses nothing. It is kept whenever it may hold something the operator does not:
    a new credential version was committed (the provider rotated the refresh token), or another
    refresher holds its lease and is refreshing it now."""
    cid = record.connection.id
    registered = record.state.current_version
    runtime = ctx.runtime
    try:
        summary = asyncio.run(runtime.tick(connection_ids=[cid]))
    except TokenBrokerError as error:
        _undo_add(ctx, cid, registered, error.code)
        raise
    after = runtime.state.get(cid)
    data: dict[str, Any] = {**_record_json(after), "refresh": summary.to_json()}
    if not summary.failed or after.state.current_version != registered:
        _emit(ctx, {**data, "registered": True}, lambda: _describe(after, runtime.clock.now()))
        if summary.skipped_leased:
            click.echo(f"{cid}: another refresher holds it and is refreshing it now", err=True)
        if not summary.ok:
            sys.exit(EXIT_FAILURE)
        return
    reason = after.state.last_error or "refresh failed"
    removed = _undo_add(ctx, cid, registered, reason)
    if ctx.json:
        click.echo(json.dumps({**data, "registered": not removed}, indent=2))
    if removed:
        click.echo(
            f"error: the first refresh of {cid} failed ({reason}), so nothing was registered. "
            "Check the credentials and settings and run add again (add --no-refresh registers "
            "without this proof).",
            err=True,
        )
    sys.exit(EXIT_FAILURE)


def _undo_add(ctx: _Context, cid: str, registered: int | None, reason: str) -> bool:
    """Remove the connection ``add`` just registered, unless a newer credential version than
    the registered one exists (which only a refresh can have written). True when removed."""
    runtime = ctx.runtime
    try:
        if runtime.secrets.get(cid).version != registered:
            click.echo(f"{cid}: a refreshed credential exists; the connection is kept", err=True)
            return False
        ctx.registry().remove(cid)
    except TokenBrokerError as error:
        click.echo(
            f"error: the first refresh of {cid} failed ({reason}) and the connection could not "
            f"be removed again ({error.code}): run `tokenbroker remove {cid}`",
            err=True,
        )
        return False
    return True


def _describe(record: ConnectionRecord, now: datetime) -> str:
    c, s = record.connection, record.state
    lines = [
        f"connection      {c.id}",
        f"profile         {c.profile}",
        f"grant           {c.grant.value}",
        f"client_id       {c.client_id or '-'}",
        f"scopes          {' '.join(c.scopes) or '-'}",
        f"token_url       {c.token_url or '(from profile)'}",
        f"params          {', '.join(f'{k}={v}' for k, v in c.params.items()) or '-'}",
        f"status          {s.status.value}",
        f"version         {s.current_version or '-'}",
        f"expires in      {_expires_in(s.expires_at, now)} ({isoformat(s.expires_at) or '-'})",
        f"next refresh    {isoformat(s.next_refresh_at) or '-'}",
        f"last refresh    {isoformat(s.last_refresh_at) or '-'}",
        f"failures        {s.consecutive_failures}"
        + (f" (last: {s.last_error})" if s.last_error else ""),
    ]
    if (step := _next_step(record)) is not None:
        lines.append(f"next step       {step}")
    return "\n".join(lines)


@main.command("list")
@pass_ctx
def list_(ctx: _Context) -> None:
    """List connections."""
    records = ctx.runtime.state.list()
    _emit(
        ctx,
        [_record_json(r) for r in records],
        lambda: _table(
            ["connection", "profile", "grant", "status"],
            [
                [
                    r.connection.id,
                    r.connection.profile,
                    r.connection.grant.value,
                    r.state.status.value,
                ]
                for r in records
            ],
        ),
    )


@main.command()
@click.argument("connection_id")
@pass_ctx
def show(ctx: _Context, connection_id: str) -> None:
    """Show one connection (never its secrets)."""
    record = ctx.runtime.state.get(connection_id)
    _emit(ctx, _record_json(record), lambda: _describe(record, ctx.runtime.clock.now()))


@main.command()
@click.argument("connection_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def remove(ctx: _Context, connection_id: str, yes: bool) -> None:
    """Remove a connection and destroy its stored credentials."""
    if not yes and not click.confirm(f"Remove {connection_id} and destroy its credentials?"):
        sys.exit(EXIT_FAILURE)
    ctx.registry().remove(connection_id)
    _emit(ctx, {"removed": connection_id}, lambda: f"removed {connection_id}")


@main.command()
@click.argument("connection_id")
@click.option("--refresh-token-file")
@click.option("--refresh-token-env")
@click.option("--client-secret-file")
@click.option("--client-secret-env")
@click.option("--service-account-key-file")
@pass_ctx
def reauth(ctx: _Context, /, connection_id: str, **opts: Any) -> None:
    """Store new credential material for a connection (e.g. after needs_reauth)."""
    stdin_uses = [k for k in opts if k.endswith("_file") and opts[k] == "-"]
    if len(stdin_uses) > 1:
        raise click.UsageError("only one secret can be read from standard input")
    changes = {
        "refresh_token": _read_secret(
            _REFRESH_TOKEN, opts["refresh_token_file"], opts["refresh_token_env"]
        ),
        "client_secret": _read_secret(
            _CLIENT_SECRET, opts["client_secret_file"], opts["client_secret_env"]
        ),
        "private_key": _read_secret(_KEY_FILE, opts["service_account_key_file"], None),
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        raise click.UsageError("give at least one new secret")
    record = ctx.registry().reauthorize(connection_id, **changes)
    summary = asyncio.run(ctx.runtime.tick(connection_ids=[connection_id]))
    record = ctx.runtime.state.get(connection_id)
    _emit(
        ctx,
        {**_record_json(record), "refresh": summary.to_json()},
        lambda: _describe(record, ctx.runtime.clock.now()),
    )
    if not summary.ok:
        sys.exit(EXIT_FAILURE)


@main.command()
@click.argument("connection_id")
@click.option("--profile", help="New connection: the provider profile (default generic).")
@click.option("--client-id", help="New connection: the OAuth client id.")
@click.option("--scope", "scopes", multiple=True, help="New connection: a scope (repeat).")
@click.option("--token-url", help="New connection: token endpoint (overrides the profile's).")
@click.option("--auth-method", type=click.Choice([m.value for m in ClientAuthMethod]))
@click.option("--param", "params", multiple=True, help="New connection: NAME=VALUE.")
@click.option("--client-secret-file", help="New connection: file with the client secret.")
@click.option("--client-secret-env", help="New connection: variable with the client secret.")
@click.option("--no-browser", is_flag=True, help="Print the URL only; do not open a browser.")
@click.option(
    "--device",
    is_flag=True,
    help="Headless: the device authorization grant (RFC 8628). Prints a URL and a code to "
    "enter on any device with a browser; nothing listens here.",
)
@click.option(
    "--timeout",
    type=_Seconds(1, 3600),
    default=300.0,
    show_default=True,
    help="Seconds to wait for the provider's answer.",
)
@click.option(
    "--accept-narrower-scopes",
    is_flag=True,
    help="Store the connection even when the provider grants fewer scopes than declared.",
)
@pass_ctx
def authorize(ctx: _Context, /, connection_id: str, **opts: Any) -> None:
    """Connect an account: the authorization-code flow with PKCE, through your browser.

    For an existing connection (e.g. one in needs_reauth) give its id alone; for a new one
    add --client-id (and the options of `add`). Prints the URL to open (and opens a browser
    when one is available), then waits for the provider's answer on a loopback address
    (http://127.0.0.1:PORT/callback: register that redirect URI, any port, with the client).

    With --device (where the provider supports RFC 8628: the profile's
    device_authorization_url), prints a verification URL and a user code instead, to open and
    enter on any device, and polls the provider until the account holder has answered."""
    new_options = [
        k
        for k in ("profile", "client_id", "token_url", "auth_method", "client_secret_file",
                  "client_secret_env")
        if opts[k]
    ] + [k for k in ("scopes", "params") if opts[k]]  # fmt: skip
    new = bool(new_options)
    client_secret: Secret | None = None
    connection: Connection | None = None
    if new:
        if not opts["client_id"]:
            raise click.UsageError("a new connection needs --client-id")
        connection = _connection_from_options(
            connection_id,
            {
                **opts,
                "grant": GrantType.REFRESH_TOKEN.value,
                "profile": opts["profile"] or "generic",
            },
        )
        client_secret = _read_secret(
            _CLIENT_SECRET, opts["client_secret_file"], opts["client_secret_env"]
        )
        profile = _check_registration(
            ctx.profiles(),
            connection,
            Credential(refresh_token=Secret("-"), client_secret=client_secret),
        )
        if (
            client_secret is None
            and profile.auth_method_for(connection) is not ClientAuthMethod.NONE
        ):
            raise click.UsageError(
                "a new connection needs its client secret (--client-secret-env or "
                "--client-secret-file), unless --auth-method none (a public client)"
            )
        from tokenbroker.oauth.authorization import check_endpoint_url  # noqa: PLC0415

        # The flow is possible at all, at an endpoint that may be used: checked before any
        # state is opened (or created).
        if opts["device"]:
            check_endpoint_url(
                profile.device_authorization_url_for(connection), "device_authorization_url"
            )
        else:
            check_endpoint_url(profile.authorization_url_for(connection), "authorization_url")
    else:
        validate_connection_id(connection_id)
    runtime = ctx.open(create=new)
    flow = _authorize_device if opts["device"] else _authorize
    outcome = asyncio.run(
        flow(
            runtime,
            connection_id,
            connection=connection,
            client_secret=client_secret,
            browser=not opts["no_browser"],
            wait_seconds=opts["timeout"],
            accept_narrower=opts["accept_narrower_scopes"],
        )
    )
    record = outcome.record
    _emit(
        ctx,
        {**_record_json(record), "authorized": outcome.to_json()},
        lambda: (
            _describe(record, runtime.clock.now())
            + (
                f"\nnot granted     {' '.join(outcome.missing_scopes)}"
                if outcome.missing_scopes
                else ""
            )
        ),
    )


async def _authorize(
    runtime: Runtime,
    connection_id: str,
    *,
    connection: Connection | None,
    client_secret: Secret | None,
    browser: bool,
    wait_seconds: float,
    accept_narrower: bool,
) -> Connected:
    """Start the flow on a fresh loopback port, show the URL, serve the one callback."""
    import getpass  # noqa: PLC0415

    from tokenbroker.entrypoints.loopback import (  # noqa: PLC0415
        bind_loopback,
        redirect_uri_for,
        serve_one_callback,
    )

    flow = runtime.authorization_flow()
    operator = f"local:{getpass.getuser()}"
    sock = bind_loopback()
    try:
        redirect_uri = redirect_uri_for(sock)
        if connection is not None:
            start = flow.start_new(connection, operator=operator, redirect_uri=redirect_uri)
        else:
            start = flow.start_existing(connection_id, operator=operator, redirect_uri=redirect_uri)
        click.echo(
            f"Open this URL to authorize {connection_id} (waiting up to {wait_seconds:g} s):\n"
            f"{start.url}",
            err=True,
        )
        if browser and _browser_available():
            import webbrowser  # noqa: PLC0415

            webbrowser.open(start.url)
        async with runtime.token_endpoint() as endpoint:

            async def complete(params: Sequence[tuple[str, str]]) -> Connected:
                return await flow.complete(
                    endpoint,
                    params,
                    connection_id=connection_id,
                    operator=operator,
                    client_secret=client_secret,
                    accept_narrower=accept_narrower,
                )

            try:
                return await serve_one_callback(sock, complete, wait_seconds=wait_seconds)
            except AccessDenied as denied:
                # The page sends the account holder back here for the next step.
                again = (
                    "the same `tokenbroker authorize` command"
                    if connection is not None
                    else f"`tokenbroker authorize {connection_id}`"
                )
                raise AccessDenied(
                    f"{denied.message}; nothing was stored: to connect {connection_id}, run "
                    f"{again} again and allow access"
                ) from None
    finally:
        sock.close()


async def _authorize_device(
    runtime: Runtime,
    connection_id: str,
    *,
    connection: Connection | None,
    client_secret: Secret | None,
    browser: bool,  # noqa: ARG001 - the device flow opens nothing here
    wait_seconds: float,
    accept_narrower: bool,
) -> Connected:
    """RFC 8628: show the verification URI and the user code, poll until answered."""
    import getpass  # noqa: PLC0415

    flow = runtime.authorization_flow()
    async with runtime.token_endpoint() as endpoint:
        start = await flow.start_device(
            endpoint,
            connection_id=connection_id,
            operator=f"local:{getpass.getuser()}",
            connection=connection,
            client_secret=client_secret,
        )
        device = start.authorization
        waiting = min(wait_seconds, device.expires_in)
        lines = [
            f"To authorize {connection_id}, open {device.verification_uri} on any device and "
            f"enter the code {device.user_code}",
        ]
        if device.verification_uri_complete:
            lines.append(f"(or open {device.verification_uri_complete})")
        lines.append(f"Waiting up to {waiting:g} s for the account holder...")
        click.echo("\n".join(lines), err=True)
        again = (
            "the same `tokenbroker authorize --device` command"
            if connection is not None
            else f"`tokenbroker authorize --device {connection_id}`"
        )
        try:
            return await flow.complete_device(
                endpoint, start, accept_narrower=accept_narrower, wait_seconds=wait_seconds
            )
        except AccessDenied as denied:
            raise AccessDenied(
                f"{denied.message}; nothing was stored: to connect {connection_id}, run "
                f"{again} again and allow access"
            ) from None
        except ExpiredToken as expired:
            raise ExpiredToken(
                f"{expired.message}; nothing was stored: run {again} again"
            ) from None


def _browser_available() -> bool:
    """A graphical browser can be opened: macOS, Windows, or a display on other systems
    (without one, ``webbrowser`` falls back to a text browser that would take the terminal)."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(named_variable("DISPLAY") or named_variable("WAYLAND_DISPLAY"))


@main.command()
@click.argument("connection_id")
@pass_ctx
def disable(ctx: _Context, connection_id: str) -> None:
    """Stop refreshing a connection (its credentials are kept)."""
    record = ctx.registry().set_enabled(connection_id, False)
    _emit(ctx, _record_json(record), lambda: f"disabled {connection_id}")


@main.command()
@click.argument("connection_id")
@pass_ctx
def enable(ctx: _Context, connection_id: str) -> None:
    """Resume refreshing a disabled connection (due at once)."""
    record = ctx.registry().set_enabled(connection_id, True)
    _emit(ctx, _record_json(record), lambda: f"enabled {connection_id}")


@main.command()
@click.argument("connection_ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Refresh every connection, due or not.")
@click.option("--due", is_flag=True, help="Refresh what is due (the default).")
@pass_ctx
def refresh(ctx: _Context, connection_ids: tuple[str, ...], all_: bool, due: bool) -> None:
    """Refresh what is due, everything (--all), or the named connections."""
    if sum([bool(connection_ids), all_, due]) > 1:
        raise click.UsageError("give connection ids, --all or --due, not several")
    ids: list[str] | None = list(connection_ids) or None
    if all_:
        ids = [r.connection.id for r in ctx.runtime.state.list()]
    show_bar = not ctx.json and sys.stderr.isatty()
    with click.progressbar(length=0, label="refreshing", file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            if show_bar:
                bar.length = total
                bar.update(done - bar.pos)

        summary = asyncio.run(ctx.runtime.tick(connection_ids=ids, progress=progress))
    data = summary.to_json()
    inactive = ", ".join(f"{cid} ({status})" for cid, status in data["inactive"].items())
    _emit(
        ctx,
        data,
        lambda: (
            f"due {data['due']}, refreshed {data['refreshed']}, failed "
            f"{data['failed']['transient']} transient / {data['failed']['permanent']} permanent"
            + (f" / {data['failed']['internal']} internal" if data["failed"]["internal"] else "")
            + f", skipped (leased elsewhere) {data['skipped_leased']}"
            + (f", not found: {', '.join(data['missing'])}" if data["missing"] else "")
            + (f", not active (not refreshed): {inactive}" if inactive else "")
            + f" in {data['seconds']}s"
        ),
    )
    # Status is law: a named connection that is disabled or needs re-authorisation is not
    # refreshed (enable or reauth it first), and asking for it by name is a failure; --all
    # means "every connection that may be refreshed" and skips them quietly.
    if not summary.ok or (connection_ids and summary.inactive):
        sys.exit(EXIT_FAILURE)


@main.command()
@pass_ctx
def status(ctx: _Context) -> None:
    """The fleet's health, as the metrics show it: the outage budget (how long consumers keep
    working if the broker stopped now), then every connection, failing ones first."""
    from tokenbroker.refresh.fleet import fleet_health  # noqa: PLC0415

    records = ctx.runtime.state.list()
    now = ctx.runtime.clock.now()
    fleet = fleet_health(records, now)
    by_id = {r.connection.id: r for r in records}
    ranked = [by_id[c.connection_id] for c in fleet.ranked]
    rows = [
        [
            r.connection.id,
            r.state.status.value + (" (at risk)" if r.state.at_risk else ""),
            _expires_in(r.state.expires_at, now),
            isoformat(r.state.last_refresh_at) or "-",
            str(r.state.consecutive_failures),
            r.state.last_error or "-",
        ]
        for r in ranked
    ]
    summary = fleet.to_json()
    del summary["ranked"]
    data = {
        "fleet": summary,
        "connections": [
            {"connection": r.connection.id, "seconds_to_expiry": c.to_json()["seconds_to_expiry"],
             **r.state.to_json(), "next_step": _next_step(r)}
            for r, c in zip(ranked, fleet.ranked, strict=True)
        ],
    }  # fmt: skip

    def human() -> str:
        table = _table(
            ["connection", "status", "expires in", "last refresh", "failures", "last error"], rows
        )
        steps = [
            f"next step for {r.connection.id}: {step}" for r in ranked if (step := _next_step(r))
        ]
        return "\n".join([_fleet_line(fleet, now), table, *steps])

    _emit(ctx, data, human)


def _next_step(record: ConnectionRecord) -> str | None:
    """What brings a connection in needs_reauth back (issue 12): the event's ``next_step``."""
    if record.state.status is not ConnectionStatus.NEEDS_REAUTH:
        return None
    return recovery_step(record.connection.id, record.connection.grant)


def _fleet_line(fleet: FleetHealth, now: datetime) -> str:
    """One line: the outage budget (and the connection that sets it), the counts by status,
    how many are failing."""
    budget = fleet.outage_budget_seconds
    if budget is None:
        first = "outage budget: none (no connection serves a token that expires)"
    else:
        soonest = min(
            (c for c in fleet.ranked if c.seconds_to_expiry is not None
             and c.seconds_to_expiry == budget),
            key=lambda c: c.connection_id,
        )  # fmt: skip
        left = _expires_in(now + timedelta(seconds=budget), now)
        first = f"outage budget: {left} ({soonest.connection_id} expires first)"
    counts = ", ".join(f"{n} {status}" for status, n in fleet.by_status.items())
    return f"{first}; {counts}; {len(fleet.failing)} failing"


@main.command()
@click.option("--connection", "connection_id", help="Only this connection's events.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@pass_ctx
def events(ctx: _Context, connection_id: str | None, limit: int) -> None:
    """Events from the local outbox (embedded backend)."""
    outbox = ctx.runtime.events
    if not hasattr(outbox, "read"):
        raise ConfigError("this backend has no local outbox to read")
    rows = outbox.read(connection_id=connection_id, limit=1_000_000)[-limit:]
    _emit(
        ctx,
        [e.to_json() for _, e in rows],
        lambda: _table(
            ["seq", "occurred", "type", "connection", "version", "detail"],
            [
                [
                    str(seq),
                    isoformat(e.occurred_at) or "",
                    e.type.value,
                    e.connection_id,
                    str(e.version or "-"),
                    e.error_code or "",
                ]
                for seq, e in rows
            ],
        ),
    )


@main.command()
@pass_ctx
def profiles(ctx: _Context) -> None:
    """The provider profiles available."""
    found = ctx.profiles()  # opens no state: there may be none yet
    _emit(
        ctx,
        {
            n: {"grants": [g.value for g in p.grants], "token_url": p.token_url}
            for n, p in found.items()
        },
        lambda: _table(
            ["profile", "grants", "token url"],
            [
                [n, ",".join(g.value for g in p.grants), p.token_url or "(per connection)"]
                for n, p in found.items()
            ],
        ),
    )


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="TCP port (0: any free port).",
)
@click.option(
    "--interval",
    type=_Seconds(1, 86_400),
    default=60.0,
    show_default=True,
    help="Seconds between ticks (1 to 86400).",
)
@click.option(
    "--max-tick-age",
    type=_Seconds(1, 7 * 86_400),
    help="GET /healthz answers 503 once the last successful tick is older (default: 3 intervals).",
)
@click.option(
    "--duration",
    type=_Seconds(0, 366 * 86_400, open_low=True),
    help="Stop after this many seconds.",
)
@pass_ctx
def serve(
    ctx: _Context,
    *,
    host: str,
    port: int,
    interval: float,
    max_tick_age: float | None,
    duration: float | None,
) -> None:
    """Run locally: the refresh loop on a schedule and the HTTP endpoints.

    Exits 1 if the refresh loop ever stops; GET /healthz reports whether it keeps succeeding."""
    from tokenbroker.entrypoints.serve import serve as run  # noqa: PLC0415

    if max_tick_age is not None and max_tick_age < interval:
        raise _option_error("--max-tick-age", "must be at least --interval")
    if not host or len(host) > 255 or not host.isprintable():
        raise _option_error("--host", "must be a host name or address")
    runtime = ctx.runtime
    from tokenbroker.entrypoints.compose import metrics_exporter  # noqa: PLC0415

    runtime.exporter = metrics_exporter(runtime.settings, "serve")  # a long-lived refresher
    asyncio.run(
        run(
            runtime,
            host=host,
            port=port,
            interval=interval,
            duration=duration,
            max_tick_age=max_tick_age,
            on_ready=lambda addr: click.echo(f"serving on http://{addr[0]}:{addr[1]}", err=True),
        )
    )


# --- policy -------------------------------------------------------------------------------------


@main.group("policy")
def policy_group() -> None:
    """Check and explain an issuer policy file (see docs/policy.md)."""


@policy_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@pass_ctx
def policy_check(ctx: _Context, file: Path, as_json: bool) -> None:
    """Validate a policy file: exit 0 when valid, 2 with the line/field at fault otherwise."""
    from tokenbroker.issue.policy_file import load_policy  # noqa: PLC0415

    loaded = load_policy(file)
    summary, notes = loaded.summary(), loaded.lifetime_notes()
    ctx.json = ctx.json or as_json
    _emit(
        ctx,
        {"ok": True, "file": str(file), **summary.to_json(), "notes": list(notes)},
        lambda: "\n".join(
            [
                f"ok: {summary.grants} grants, {summary.relays} relays, {summary.callers} callers",
                *(f"note: {note}" for note in notes),
            ]
        ),
    )


@policy_group.command("explain")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--caller", required=True, help="The caller's email (its Google identity).")
@click.option("--connection", "connection_id", help="Only this connection.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@pass_ctx
def policy_explain(
    ctx: _Context, file: Path, caller: str, connection_id: str | None, as_json: bool
) -> None:
    """What a caller may do: its connections, scopes, lifetimes and relays."""
    from tokenbroker.issue.policy_file import load_policy  # noqa: PLC0415

    loaded = load_policy(file)
    if "@" not in caller:
        raise click.BadParameter("expected an email address", param_hint="--caller")
    explained = loaded.explain(caller, connection_id)
    allowances, relays = explained.connections, explained.relays
    connections: list[dict[str, Any]] = [
        {
            "connection": a.connection_id,
            "scopes": (["*"] if a.full_scope_allowed else []) + sorted(a.scopes),
            "max_lifetime_seconds": a.max_lifetime_seconds,
            # Each scope for as long as its own grants allow; a token of several scopes for
            # the shortest of them.
            "scope_lifetimes": {s: a.lifetime_for((s,)) for s in sorted(a.scopes)},
            "full_scope_lifetime_seconds": a.full_scope_lifetime or None,
        }
        for a in allowances
    ]
    data = {
        "caller": explained.caller,
        "connections": connections,
        "relays": [
            {
                "name": r.name,
                "connection": r.connection,
                "base_url": r.base_url,
                "methods": sorted(r.methods),
                "path_prefixes": list(r.path_prefixes),
                "inject": r.inject.value,
            }
            for r in relays
        ],
    }

    def human() -> str:
        if not allowances and not relays:
            return f"{caller}: nothing is allowed (deny by default)"
        parts = []
        if connections:
            rows = [
                [c["connection"], " ".join(c["scopes"]), f"{c['max_lifetime_seconds']}s"]
                for c in connections
            ]
            parts.append(_table(["connection", "scopes", "max lifetime"], rows))
        if relays:
            rows = [
                [
                    r.name,
                    r.connection,
                    ",".join(sorted(r.methods)),
                    " ".join(r.base_url + p for p in r.path_prefixes),
                    r.inject.value,
                ]
                for r in relays
            ]
            parts.append(_table(["relay", "connection", "methods", "urls", "inject"], rows))
        return "\n\n".join(parts)

    ctx.json = ctx.json or as_json
    _emit(ctx, data, human)
