"""The ``tokenbroker`` command in process (click's runner) and, for a few cases, as a real
process: bad input is refused with a message that names the field, exit status 2 (1 for a
runtime failure), no traceback on either stream, and the state directory exactly as it was
(the same bytes, or still absent). Only ``add`` creates state.

The property test draws malformed values for every kind of input the command takes (numeric
settings, log settings, serve's options, secrets on stdin, token URLs, connection fields,
a mistyped or broken state directory) and checks those four facts for each.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import restore_session_logging
from tests.support.provider_api import ProviderApi
from tokenbroker.adapters.fake_provider import FakeTokenServer
from tokenbroker.entrypoints.cli import main
from tokenbroker.entrypoints.settings import BOUNDS

FAKE_URL = "https://oauth.example/token"
CLIENT_SECRET = "client-secret"


def snapshot(state_dir: Path) -> dict[str, bytes] | None:
    """Every file of the state directory, byte for byte (``None``: there is none)."""
    if not state_dir.exists():
        return None
    if not state_dir.is_dir():
        return {"": state_dir.read_bytes()}
    return {p.name: p.read_bytes() for p in sorted(state_dir.iterdir()) if p.is_file()}


def invoke(
    args: list[str], *, env: Mapping[str, str | None] | None = None, stdin: bytes | None = None
) -> Result:
    env = {"TOKENBROKER_ENCRYPTION_KEY": None, "TOKENBROKER_STATE_DIR": None, **(env or {})}
    try:
        return CliRunner().invoke(main, args, input=stdin, env=env, catch_exceptions=True)
    finally:
        restore_session_logging()  # the command configured logging to the runner's stderr


def assert_refused(result: Result, named: str, codes: tuple[int, ...] = (2,)) -> None:
    """Refused as an operator should see it: the status, the field named, no traceback."""
    shown = result.stdout + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"raised {result.exception!r}"
    )
    assert result.exit_code in codes, (result.exit_code, shown)
    assert "Traceback" not in shown
    assert named in shown, (named, shown)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory with one connection in it (registered, never refreshed)."""
    state = tmp_path_factory.mktemp("template") / "state"
    added = invoke(
        ["--state-dir", str(state), "add", "crm", "--grant", "client_credentials",
         "--client-id", "client", "--client-secret-env", "S", "--token-url", FAKE_URL,
         "--no-refresh"],
        env={"S": CLIENT_SECRET},
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    return state


def fresh_copy(template: Path, kind: str) -> Path:
    """A state directory for one example: ``absent``, ``existing`` (a copy of the template),
    ``file`` (a file where the directory should be) or ``corrupt`` (a database that is not)."""
    state = Path(tempfile.mkdtemp(prefix="tokenbroker-cli-")) / "state"
    if kind == "existing":
        shutil.copytree(template, state)
    elif kind == "file":
        state.write_text("not a directory\n")
    elif kind == "corrupt":
        shutil.copytree(template, state)
        (state / "tokenbroker.db").write_bytes(b"garbage, not SQLite" * 100)
    return state


# --- the property test -------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One malformed invocation: the arguments after ``--state-dir``, and what must be named."""

    args: list[str]
    named: str
    env: dict[str, str] = field(default_factory=dict)
    stdin: bytes | None = None
    #: A value that must never appear in the output (a secret).
    secret: str | None = None
    #: Runs before opening any state (so any kind of state directory gives the same answer).
    before_state: bool = True


NUMERIC = {b.variable: b for b in BOUNDS}
marker = st.text("abcdefghijklmnopqrstuvwxyz", min_size=12, max_size=12)


@st.composite
def bad_numeric_setting(draw: st.DrawFn) -> Attempt:
    bound = NUMERIC[draw(st.sampled_from(sorted(NUMERIC)))]
    value = draw(
        st.one_of(
            st.sampled_from(["inf", "-inf", "nan", "NaN", "1e309", "-1e309", "ten", "0x10", "1,5"]),
            st.floats(min_value=bound.high * 1.001 + 1, max_value=1e308).map(repr),
            st.floats(max_value=bound.low - 1e-6, min_value=-1e308).map(repr),
            st.integers(min_value=int(bound.high) + 1).map(str),
            st.integers(max_value=int(bound.low) - 1).map(str),
        )
    )
    command = draw(st.sampled_from([["status"], ["list"], ["profiles"], ["refresh", "--all"]]))
    return Attempt(command, bound.variable, env={bound.variable: value})


@st.composite
def bad_log_setting(draw: st.DrawFn) -> Attempt:
    if draw(st.booleans()):
        level = draw(st.text(min_size=1, max_size=20).filter(lambda t: t.strip() and "\0" not in t))
        if level.lower() in {"debug", "info", "warning", "error", "critical"}:
            level += "x"
        return Attempt(["status"], "TOKENBROKER_LOG_LEVEL", env={"TOKENBROKER_LOG_LEVEL": level})
    missing = f"/nonexistent-{draw(marker)}/tokenbroker.log"
    return Attempt(["profiles"], "TOKENBROKER_LOG_FILE", env={"TOKENBROKER_LOG_FILE": missing})


SERVE_OPTIONS = [
    (option, value)
    for option, values in [
        ("--interval", ["-1", "0", "0.5", "nan", "inf", "-inf", "1e9", "often", ""]),
        ("--port", ["-1", "65536", "100000", "http", "8080.5", ""]),
        ("--duration", ["0", "-1", "nan", "inf", "1e12", "soon"]),
        ("--max-tick-age", ["0", "nan", "inf", "-3", "1e12"]),
    ]
    for value in values
]


def serve_attempt(option: str, value: str) -> Attempt:
    return Attempt(["serve", option, value], option)


@st.composite
def bad_serve_option(draw: st.DrawFn) -> Attempt:
    return serve_attempt(*draw(st.sampled_from(SERVE_OPTIONS)))


@st.composite
def bad_secret(draw: st.DrawFn) -> Attempt:
    """A refresh token or client secret given on stdin (or by a variable) that is binary,
    multi-line, not ASCII, or megabytes long."""
    head, tail = draw(marker), draw(marker)
    kind = draw(st.sampled_from(["control", "lines", "utf8", "non-ascii", "huge", "empty"]))
    if kind == "control":
        byte = draw(st.sampled_from([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F]))
        raw = head.encode() + bytes([byte]) + tail.encode()
    elif kind == "lines":
        raw = f"{head}\n{tail}\n".encode()
    elif kind == "utf8":
        raw = head.encode() + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + b"x"
    elif kind == "non-ascii":
        odd = draw(st.sampled_from(["\u00e9", "\u20ac", "\u200b", "\u2028"]))
        raw = (head + odd + tail).encode()
    elif kind == "huge":
        raw = head.encode() * (5 * 1024 * 1024 // 12)
    else:
        raw = b" \n\t "
    which = draw(st.sampled_from(["--refresh-token-file", "--client-secret-file"]))
    args = ["add", "crm2", "--grant", "refresh_token", "--client-id", "client",
            "--token-url", FAKE_URL]  # fmt: skip
    if which == "--refresh-token-file":
        args += ["--refresh-token-file", "-", "--client-secret-env", "S"]
    else:
        args += ["--client-secret-file", "-", "--refresh-token-env", "R"]
    env = {"S": CLIENT_SECRET, "R": "rt-fine"}
    return Attempt(args, which, env=env, stdin=raw, secret=head)


def bad_token_urls(host: str) -> list[str]:
    return [
        f"ftp://{host}/token",
        f"file:///etc/{host}",
        "javascript:alert(1)",
        f"gopher://{host}/",
        f"http://{host}/token",  # plain http to a remote host
        "http://10.0.0.1/token",
        f"https://user:pass@{host}/token",
        f"https://{host}/token#frag",
        f"https://{host}/to ken",
        f"https://{host}/\x00token",
        f"https://{host}:99999/token",
        "https:///token",
        "https://[::1/token",
        "https://[zz]/token",
        "https://" + "a" * 3000 + ".com/",
        host,
    ]


def token_url_attempt(url: str) -> Attempt:
    args = ["add", "crm2", "--grant", "client_credentials", "--client-id", "client",
            "--client-secret-env", "S", "--token-url", url]  # fmt: skip
    return Attempt(args, "--token-url", env={"S": CLIENT_SECRET})


@st.composite
def bad_token_url(draw: st.DrawFn) -> Attempt:
    host = draw(st.from_regex(r"[a-z]{3,10}\.(com|example|internal)", fullmatch=True))
    return token_url_attempt(draw(st.sampled_from(bad_token_urls(host))))


CONNECTION_FIELDS = [
    ("Upper", ["--client-id", "c"], "connection id"),
    ("a/b", ["--client-id", "c"], "connection id"),
    ("x" * 200, ["--client-id", "c"], "CONNECTION_ID"),
    ("ok", ["--client-id", "c\x1b[31m"], "--client-id"),
    ("ok", ["--client-id", "c" * 5000], "--client-id"),
    ("ok", ["--client-id", "c", "--scope", 'a"b'], "--scope"),
    ("ok", ["--client-id", "c", "--scope", "a\\b"], "--scope"),
    ("ok", ["--client-id", "c", "--scope", "a\x00b"], "--scope"),
    ("ok", ["--client-id", "c", "--scope", " ".join(f"s{i}" for i in range(101))], "--scope"),
    ("ok", ["--client-id", "c", "--param", "x y=1"], "--param"),
    ("ok", ["--client-id", "c", "--param", "resource=a\nb"], "--param resource"),
    ("ok", ["--client-id", "c", "--param", "resource= padded"], "--param resource"),
    ("ok", ["--client-id", "c", "--param", "nope"], "--param"),
    ("ok", ["--client-id", "c", "--param", "region=eu"], "region"),
    ("ok", ["--client-id", "c", "--profile", "no-such"], "profile"),
    ("ok", ["--client-id", "c", "--profile", "../x"], "--profile"),
    ("ok", [], "client_id"),
]


def connection_attempt(cid: str, extra: list[str], named: str) -> Attempt:
    base = ["--grant", "client_credentials", "--client-secret-env", "S", "--token-url", FAKE_URL]
    return Attempt(["add", cid, *base, *extra], named, env={"S": CLIENT_SECRET})


@st.composite
def bad_connection_field(draw: st.DrawFn) -> Attempt:
    return connection_attempt(*draw(st.sampled_from(CONNECTION_FIELDS)))


STATEFUL_COMMANDS = [
    ["status"], ["list"], ["show", "crm"], ["refresh"], ["refresh", "--all"], ["refresh", "crm"],
    ["events"], ["disable", "crm"], ["enable", "crm"], ["remove", "crm", "--yes"],
    ["reauth", "crm", "--client-secret-env", "S"], ["serve", "--port", "0", "--duration", "1"],
]  # fmt: skip


@st.composite
def command_on_missing_state(draw: st.DrawFn) -> Attempt:
    """Any command but ``add`` and ``profiles``/``policy``, on a state directory that is not
    there (a typo), is broken, or holds no database: refused, and nothing created."""
    command = draw(st.sampled_from(STATEFUL_COMMANDS))
    return Attempt(command, "state", env={"S": CLIENT_SECRET}, before_state=False)


ATTEMPTS = st.one_of(
    bad_numeric_setting(),
    bad_log_setting(),
    bad_serve_option(),
    bad_secret(),
    bad_token_url(),
    bad_connection_field(),
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    attempt=st.one_of(ATTEMPTS, command_on_missing_state()),
    kind=st.sampled_from(["absent", "existing", "file", "corrupt"]),
)
def test_malformed_input_is_refused_cleanly_and_changes_nothing(
    template: Path, attempt: Attempt, kind: str
) -> None:
    if not attempt.before_state and kind == "existing":
        kind = "absent"  # these commands work on existing state: nothing malformed to see
    state = fresh_copy(template, kind)
    try:
        before = snapshot(state)
        result = invoke(["--state-dir", str(state), *attempt.args], env=attempt.env,
                        stdin=attempt.stdin)  # fmt: skip
        named = attempt.named if attempt.before_state or kind == "absent" else str(state)
        assert_refused(result, named)
        if attempt.secret is not None:
            assert attempt.secret not in result.stdout + result.stderr
        assert snapshot(state) == before
    finally:
        shutil.rmtree(state.parent, ignore_errors=True)


FIXED_ATTEMPTS = [
    *(serve_attempt(*case) for case in SERVE_OPTIONS),
    *(connection_attempt(*case) for case in CONNECTION_FIELDS),
    *(token_url_attempt(url) for url in bad_token_urls("oauth.example")),
    *(Attempt(command, "state", env={"S": CLIENT_SECRET}, before_state=False)
      for command in STATEFUL_COMMANDS),
]  # fmt: skip


@pytest.mark.parametrize("kind", ["absent", "existing", "corrupt"])
def test_every_listed_case_is_refused_cleanly(template: Path, kind: str) -> None:
    """What the property test samples from, every case once (it may miss a case in a run)."""
    for attempt in FIXED_ATTEMPTS:
        state = fresh_copy(template, "absent" if not attempt.before_state and kind == "existing"
                           else kind)  # fmt: skip
        try:
            before = snapshot(state)
            result = invoke(["--state-dir", str(state), *attempt.args], env=attempt.env)
            named = attempt.named if attempt.before_state else "state directory"
            assert_refused(result, named)
            assert snapshot(state) == before, attempt.args
        finally:
            shutil.rmtree(state.parent, ignore_errors=True)


@pytest.mark.parametrize("url", bad_token_urls("oauth.example"))
def test_every_kind_of_bad_token_url_is_refused(tmp_path: Path, url: str) -> None:
    attempt = token_url_attempt(url)
    result = invoke(["--state-dir", str(tmp_path / "s"), *attempt.args], env=attempt.env)
    assert_refused(result, "--token-url")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "url", ["https://oauth.example/token?tenant=a", "http://127.0.0.1:8080/t", "http://[::1]/t",
            "http://localhost/t", "https://oauth.example:8443/o/token"],
)  # fmt: skip
def test_good_token_urls_are_accepted(tmp_path: Path, url: str) -> None:
    attempt = token_url_attempt(url)
    added = invoke(["--state-dir", str(tmp_path / "s"), *attempt.args, "--no-refresh"],
                   env=attempt.env)  # fmt: skip
    assert added.exit_code == 0, added.output


# --- the same, as real processes ---------------------------------------------------------------


REAL_PROCESS_CASES = [
    Attempt(["serve", "--interval", "-1"], "--interval"),
    Attempt(["status"], "TOKENBROKER_HTTP_TIMEOUT_SECONDS",
            env={"TOKENBROKER_HTTP_TIMEOUT_SECONDS": "inf"}),
    Attempt(["status"], "TOKENBROKER_LOG_FILE",
            env={"TOKENBROKER_LOG_FILE": "/nonexistent-dir/x.log"}),
    Attempt(["add", "crm2", "--grant", "refresh_token", "--client-id", "client",
             "--client-secret-env", "S", "--token-url", FAKE_URL, "--refresh-token-file", "-"],
            "--refresh-token-file", env={"S": CLIENT_SECRET},
            stdin=b"rt-topsecretvalue\x00\xff" * 300_000, secret="rt-topsecretvalue"),
    Attempt(["add", "crm2", "--grant", "client_credentials", "--client-id", "client",
             "--client-secret-env", "S", "--token-url", "ftp://oauth.example/token"],
            "--token-url", env={"S": CLIENT_SECRET}),
    Attempt(["list"], "state", before_state=False),
]  # fmt: skip


@pytest.mark.parametrize("attempt", REAL_PROCESS_CASES, ids=lambda a: " ".join(a.args[:2]))
def test_malformed_input_in_a_real_process(tmp_path: Path, attempt: Attempt) -> None:
    state = tmp_path / "state"
    env = {**os.environ, **attempt.env}
    env.pop("TOKENBROKER_ENCRYPTION_KEY", None)
    done = subprocess.run(
        [sys.executable, "-c", "from tokenbroker.entrypoints.console import main; main()",
         "--state-dir", str(state), *attempt.args],
        input=attempt.stdin, capture_output=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    shown = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 2, shown
    assert "Traceback" not in shown
    assert attempt.named in shown
    if attempt.secret is not None:
        assert attempt.secret not in shown
    assert not state.exists()


# --- what only add creates ---------------------------------------------------------------------


def test_commands_that_read_create_no_state(tmp_path: Path) -> None:
    state = tmp_path / "typo"
    policy = Path(__file__).resolve().parents[3] / "examples" / "policy.toml"
    for args in (["profiles"], ["--json", "profiles"], ["policy", "check", str(policy)]):
        result = invoke(["--state-dir", str(state), *args])
        assert result.exit_code == 0, result.output
    for args in (["status"], ["list"], ["events"], ["show", "crm"]):
        assert_refused(invoke(["--state-dir", str(state), *args]), str(state))
    assert not state.exists()
    # Nor does a directory that exists but holds no state (say, --state-dir /tmp).
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(invoke(["--state-dir", str(empty), "status"]), "no tokenbroker state")
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        [
            "add",
            "crm",
            "--grant",
            "client_credentials",
            "--client-id",
            "c",
            "--client-secret-env",
            "S",
            "--token-url",
            FAKE_URL,
            "--no-refresh",
        ],
    ],
)
@pytest.mark.parametrize("where", ["a" * 300, "file/state", "a/" * 2100])
def test_a_state_directory_that_cannot_be_one_is_named(
    tmp_path: Path, where: str, command: list[str]
) -> None:
    (tmp_path / "file").write_text("a file\n")
    state = tmp_path / where
    result = invoke(["--state-dir", str(state), *command], env={"S": CLIENT_SECRET})
    assert_refused(result, "state directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_variable_that_names_no_readable_secret_is_refused_by_name(tmp_path: Path) -> None:
    args = ["--state-dir", str(tmp_path / "s"), "add", "crm", "--grant", "client_credentials",
            "--client-id", "c", "--token-url", FAKE_URL]  # fmt: skip
    assert_refused(invoke([*args, "--client-secret-env", "NOPE"], env={"NOPE": None}), "NOPE")
    assert_refused(
        invoke([*args, "--client-secret-file", str(tmp_path)]), "--client-secret-file"
    )  # a directory
    assert_refused(
        invoke([*args, "--client-secret-file", str(tmp_path / "missing")]), "--client-secret-file"
    )
    assert not (tmp_path / "s").exists()


def test_a_service_account_key_must_be_one(tmp_path: Path) -> None:
    key = tmp_path / "key.json"
    args = ["--state-dir", str(tmp_path / "s"), "add", "rep", "--profile", "google",
            "--grant", "jwt_bearer", "--service-account-key-file", str(key)]  # fmt: skip
    key.write_text('{"type": "service_account",\n "client_email": "a@b"}\n')
    assert_refused(invoke(args), "private_key")
    key.write_bytes(b"\x00\x01binary")
    assert_refused(invoke(args), "--service-account-key-file")
    assert not (tmp_path / "s").exists()


# --- the first refresh after add ----------------------------------------------------------------


@pytest.fixture
def provider() -> Iterator[tuple[ProviderApi, FakeTokenServer]]:
    server = FakeTokenServer()
    with ProviderApi(token_server=server).in_thread() as api:
        yield api, server


def _add(state: Path, token_url: str, refresh_token: str, *flags: str) -> Result:
    return invoke(
        ["--json", "--state-dir", str(state), "add", "crm", "--grant", "refresh_token",
         "--client-id", "client", "--client-secret-env", "S", "--refresh-token-env", "R",
         "--token-url", token_url, *flags],
        env={"S": CLIENT_SECRET, "R": refresh_token, "TOKENBROKER_RETRY_ATTEMPTS": "1"},
    )  # fmt: skip


def test_add_whose_first_refresh_is_refused_registers_nothing(
    tmp_path: Path, provider: tuple[ProviderApi, FakeTokenServer]
) -> None:
    api, server = provider
    token = server.seed_refresh_token()
    server.revoke(token)
    state = tmp_path / "state"
    refused = _add(state, f"{api.url}/oauth/token", token)
    assert refused.exit_code == 1, refused.output
    assert "Traceback" not in refused.output
    assert "invalid_grant" in refused.stderr
    assert "nothing was registered" in refused.stderr
    body = json.loads(refused.stdout)
    assert body["registered"] is False
    assert body["state"]["status"] == "needs_reauth"  # what the attempt found
    listed = invoke(["--json", "--state-dir", str(state), "list"])
    assert json.loads(listed.stdout) == []
    # The corrected add simply works: no already_exists left behind.
    fresh = server.seed_refresh_token()
    again = _add(state, f"{api.url}/oauth/token", fresh)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["state"]["current_version"] == 2


def test_add_whose_provider_cannot_be_reached_registers_nothing(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]  # nothing listens once the socket is closed
    state = tmp_path / "state"
    refused = _add(state, f"http://127.0.0.1:{closed}/token", "rt-anything")
    assert refused.exit_code == 1, refused.output
    assert "transport_error" in refused.stderr
    assert "nothing was registered" in refused.stderr
    assert json.loads(invoke(["--json", "--state-dir", str(state), "list"]).stdout) == []


def test_add_that_proves_the_material_keeps_it(
    tmp_path: Path, provider: tuple[ProviderApi, FakeTokenServer]
) -> None:
    api, server = provider
    added = _add(tmp_path / "state", f"{api.url}/oauth/token", server.seed_refresh_token())
    assert added.exit_code == 0, added.output
    body = json.loads(added.stdout)
    assert body["registered"] is True
    assert (body["state"]["status"], body["state"]["current_version"]) == ("active", 2)
    assert body["refresh"]["refreshed"] == 1


def test_add_no_refresh_registers_without_asking_the_provider(tmp_path: Path) -> None:
    added = _add(tmp_path / "state", FAKE_URL, "rt-unchecked", "--no-refresh")
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout)["state"]["current_version"] == 1


# --- serve's own options ------------------------------------------------------------------------


def test_serve_on_a_port_in_use_names_the_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = invoke(["--backend", "memory", "serve", "--port", str(port), "--duration", "5"])
    assert_refused(result, f"--port {port}")
    assert "in use" in result.stderr


def test_serve_on_an_address_this_host_lacks_names_the_host() -> None:
    result = invoke(
        ["--backend", "memory", "serve", "--host", "192.0.2.1", "--port", "0", "--duration", "5"]
    )
    assert_refused(result, "--host 192.0.2.1")


def test_serve_max_tick_age_below_the_interval_is_refused() -> None:
    result = invoke(["--backend", "memory", "serve", "--interval", "10", "--max-tick-age", "5"])
    assert_refused(result, "--max-tick-age")


# --- status: the fleet as the metrics show it ------------------------------------------------


def test_status_shows_the_outage_budget_first_and_failing_connections_first(
    tmp_path: Path,
) -> None:
    from dataclasses import replace
    from datetime import timedelta

    from tokenbroker.adapters.embedded import new_key_text
    from tokenbroker.entrypoints.compose import build_runtime
    from tokenbroker.entrypoints.settings import Settings
    from tokenbroker.kernel.model import Connection, ConnectionStatus, Credential, GrantType
    from tokenbroker.kernel.secret import Secret

    key = new_key_text()
    state = tmp_path / "state"
    runtime = build_runtime(
        Settings(backend="embedded", state_dir=state, encryption_key=Secret(key))
    )
    registry = runtime.registry()
    now = runtime.clock.now()
    shape = {  # id -> (seconds to expiry, failures, status)
        "healthy": (3000, 0, ConnectionStatus.ACTIVE),
        "soon": (420, 0, ConnectionStatus.ACTIVE),
        "flaky": (2000, 2, ConnectionStatus.ACTIVE),
        "dead": (100, 5, ConnectionStatus.NEEDS_REAUTH),
        "off": (50, 0, ConnectionStatus.DISABLED),
    }
    for cid, (left, failures, status) in shape.items():
        registry.register(
            Connection(id=cid, profile="generic", grant=GrantType.REFRESH_TOKEN,
                       client_id="c", token_url=FAKE_URL),
            Credential(refresh_token=Secret(f"rt-{cid}"), client_secret=Secret(CLIENT_SECRET)),
        )  # fmt: skip
        current = runtime.state.get(cid).state
        runtime.state.put_state(
            cid,
            replace(current, status=status, consecutive_failures=failures,
                    expires_at=now + timedelta(seconds=left),
                    last_error="invalid_grant" if failures else None),
        )  # fmt: skip
    runtime.close()
    env = {"TOKENBROKER_ENCRYPTION_KEY": key}

    shown = invoke(["--state-dir", str(state), "status"], env=env)
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    # "dead" still serves its last token for 100 s: that is how long consumers have.
    assert lines[0].startswith("outage budget: 1m")
    assert "(dead expires first)" in lines[0]
    assert "3 active, 0 at_risk, 1 needs_reauth, 1 disabled; 2 failing" in lines[0]
    assert lines[1].split()[:2] == ["CONNECTION", "STATUS"]
    assert [line.split()[0] for line in lines[2:7]] == ["dead", "flaky", "off", "soon", "healthy"]
    assert "invalid_grant" in lines[2]
    # Back from needs_reauth in one step (issue 12): the command is printed, for "dead" only.
    assert [x for x in lines if x.startswith("next step")] == [
        "next step for dead: tokenbroker authorize dead"
    ]
    shown_one = invoke(["--state-dir", str(state), "show", "dead"], env=env)
    assert "next step       tokenbroker authorize dead" in shown_one.stdout.splitlines()
    healthy = invoke(["--json", "--state-dir", str(state), "show", "healthy"], env=env)
    assert json.loads(healthy.stdout)["next_step"] is None

    body = json.loads(invoke(["--json", "--state-dir", str(state), "status"], env=env).stdout)
    fleet = body["fleet"]
    assert 95 <= fleet["outage_budget_seconds"] <= 100
    assert fleet["connections"] == {"active": 3, "at_risk": 0, "needs_reauth": 1, "disabled": 1}
    assert fleet["failing"] == 2
    assert [c["connection"] for c in body["connections"]] == [
        "dead", "flaky", "off", "soon", "healthy",
    ]  # fmt: skip
    assert body["connections"][0]["status"] == "needs_reauth"
    assert body["connections"][0]["consecutive_failures"] == 5
    assert body["connections"][0]["next_step"] == "tokenbroker authorize dead"
    assert {c["next_step"] for c in body["connections"][1:]} == {None}
    assert CLIENT_SECRET not in shown.stdout and "rt-dead" not in shown.stdout
