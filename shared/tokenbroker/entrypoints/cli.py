"""``tokenbroker``: the operator's command line.

Secrets are read from a file, standard input (``-``) or a named environment variable, never
from a command-line argument (arguments are visible in ``ps`` and shell history).
Exit codes: 0 ok, 1 a failure (a refresh failed, a connection was not found), 2 bad usage or
configuration.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tokenbroker.entrypoints.answers import EXIT_FAILURE, exit_code
from tokenbroker.entrypoints.settings import named_variable
from tokenbroker.kernel.clock import isoformat
from tokenbroker.kernel.errors import ConfigError, TokenBrokerError
from tokenbroker.kernel.model import (
    ClientAuthMethod,
    Connection,
    ConnectionRecord,
    Credential,
    GrantType,
)
from tokenbroker.kernel.secret import Secret

if TYPE_CHECKING:
    from tokenbroker.entrypoints.compose import Runtime
    from tokenbroker.refresh.registry import ConnectionRegistry


@dataclass
class _Context:
    json: bool
    options: dict[str, Any]
    _runtime: Runtime | None = None

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            from tokenbroker.entrypoints.compose import build_runtime  # noqa: PLC0415
            from tokenbroker.entrypoints.settings import Settings  # noqa: PLC0415

            self._runtime = build_runtime(Settings.from_env(**self.options))
        return self._runtime

    def registry(self) -> ConnectionRegistry:
        return self.runtime.registry()


pass_ctx = click.make_pass_decorator(_Context)


@contextmanager
def _errors() -> Iterator[None]:
    """Map library errors to messages and exit codes; never a traceback for expected errors."""
    try:
        yield
    except TokenBrokerError as error:
        click.echo(f"error: {error.message}", err=True)
        sys.exit(exit_code(error))


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
    return {"connection": record.connection.to_json(), "state": record.state.to_json()}


def _emit(ctx: _Context, data: Any, human: Callable[[], str]) -> None:
    click.echo(json.dumps(data, indent=2) if ctx.json else human())


def _read_secret(file: str | None, env: str | None, what: str) -> Secret | None:
    if file and env:
        raise click.UsageError(f"give {what} by file or by environment variable, not both")
    if env:
        value = named_variable(env)
        if not value:
            raise click.UsageError(f"environment variable {env} (for {what}) is not set")
        return Secret(value.strip())
    if file:
        if file == "-":
            value = sys.stdin.read()
        else:
            try:
                value = Path(file).read_text()
            except OSError as exc:
                raise click.UsageError(f"cannot read {what} from {file}: {exc.strerror}") from None
        if not value.strip():
            raise click.UsageError(f"{what} from {file} is empty")
        return Secret(value.strip())
    return None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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

    with _errors():
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
    """Register a connection (and refresh it once, to prove it works)."""
    stdin_uses = [
        k
        for k in ("client_secret_file", "refresh_token_file", "service_account_key_file")
        if opts[k] == "-"
    ]
    if len(stdin_uses) > 1:
        raise click.UsageError("only one secret can be read from standard input")
    params: dict[str, str] = {}
    for item in opts["params"]:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.UsageError(f"--param expects NAME=VALUE, got {item!r}")
        params[name] = value
    scopes = tuple(s for chunk in opts["scopes"] for s in chunk.split())
    credential = Credential(
        client_secret=_read_secret(
            opts["client_secret_file"], opts["client_secret_env"], "the client secret"
        ),
        refresh_token=_read_secret(
            opts["refresh_token_file"], opts["refresh_token_env"], "the refresh token"
        ),
        private_key=_read_secret(opts["service_account_key_file"], None, "the service account key"),
    )
    with _errors():
        connection = Connection(
            id=connection_id,
            profile=opts["profile"],
            grant=GrantType(opts["grant"]),
            client_id=opts["client_id"],
            scopes=scopes,
            token_url=opts["token_url"],
            auth_method=ClientAuthMethod(opts["auth_method"]) if opts["auth_method"] else None,
            params=params,
        )
        record = ctx.registry().register(connection, credential)
        summary = None
        if not opts["no_refresh"]:
            summary = asyncio.run(ctx.runtime.tick(connection_ids=[connection_id]))
            record = ctx.runtime.state.get(connection_id)
    data = _record_json(record)
    if summary is not None:
        data["refresh"] = summary.to_json()
    _emit(ctx, data, lambda: _describe(record, ctx.runtime.clock.now()))
    if summary is not None and not summary.ok:
        sys.exit(EXIT_FAILURE)


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
    return "\n".join(lines)


@main.command("list")
@pass_ctx
def list_(ctx: _Context) -> None:
    """List connections."""
    with _errors():
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
    with _errors():
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
    with _errors():
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
    changes = {
        "refresh_token": _read_secret(
            opts["refresh_token_file"], opts["refresh_token_env"], "the refresh token"
        ),
        "client_secret": _read_secret(
            opts["client_secret_file"], opts["client_secret_env"], "the client secret"
        ),
        "private_key": _read_secret(
            opts["service_account_key_file"], None, "the service account key"
        ),
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        raise click.UsageError("give at least one new secret")
    with _errors():
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
@pass_ctx
def disable(ctx: _Context, connection_id: str) -> None:
    """Stop refreshing a connection (its credentials are kept)."""
    with _errors():
        record = ctx.registry().set_enabled(connection_id, False)
    _emit(ctx, _record_json(record), lambda: f"disabled {connection_id}")


@main.command()
@click.argument("connection_id")
@pass_ctx
def enable(ctx: _Context, connection_id: str) -> None:
    """Resume refreshing a disabled connection (due at once)."""
    with _errors():
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
    with _errors():
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
    """A table of every connection's health."""
    with _errors():
        records = ctx.runtime.state.list()
        now = ctx.runtime.clock.now()
    rows = [
        [
            r.connection.id,
            r.state.status.value + (" (at risk)" if r.state.at_risk else ""),
            _expires_in(r.state.expires_at, now),
            isoformat(r.state.last_refresh_at) or "-",
            str(r.state.consecutive_failures),
        ]
        for r in records
    ]
    _emit(
        ctx,
        [{"connection": r.connection.id, **r.state.to_json()} for r in records],
        lambda: _table(["connection", "status", "expires in", "last refresh", "failures"], rows),
    )


@main.command()
@click.option("--connection", "connection_id", help="Only this connection's events.")
@click.option("--limit", default=50, show_default=True)
@pass_ctx
def events(ctx: _Context, connection_id: str | None, limit: int) -> None:
    """Events from the local outbox (embedded backend)."""
    with _errors():
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
    with _errors():
        found = ctx.runtime.profiles
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
@click.option("--port", default=8080, show_default=True)
@click.option("--interval", default=60.0, show_default=True, help="Seconds between ticks.")
@click.option("--duration", type=float, help="Stop after this many seconds.")
@pass_ctx
def serve(ctx: _Context, host: str, port: int, interval: float, duration: float | None) -> None:
    """Run locally: the refresh loop on a schedule and the HTTP endpoints."""
    from tokenbroker.entrypoints.serve import serve as run  # noqa: PLC0415

    with _errors():
        runtime = ctx.runtime
        asyncio.run(
            run(
                runtime,
                host=host,
                port=port,
                interval=interval,
                duration=duration,
                on_ready=lambda addr: click.echo(
                    f"serving on http://{addr[0]}:{addr[1]}", err=True
                ),
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

    with _errors():
        summary = load_policy(file).summary()
    ctx.json = ctx.json or as_json
    _emit(
        ctx,
        {"ok": True, "file": str(file), **summary.to_json()},
        lambda: f"ok: {summary.grants} grants, {summary.relays} relays, {summary.callers} callers",
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

    with _errors():
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
