"""Issuer hot path throughput: ``POST /token`` vs a hello-world function, same server mode.

Both functions are served the way the issuer is deployed: ``functions-framework --asgi``
(gunicorn with one uvicorn worker; measured ~4x the default gthread mode on one core), each
pinned to CPU 0 with ``taskset``; the load generator (``wrk``, one thread, 16 connections; an
aiohttp client in its own process when wrk is missing) is pinned to CPU 1, and so is this
process. The two servers run side by side and are measured alternately (trivial, issuer,
trivial, issuer, ...), each run ``--duration`` seconds after a ``--warmup``; the run with the
highest req/s of each server is reported (noise only ever lowers a rate), with that run's p99.
Each run also records the server's CPU time per request (/proc, master + worker), which does
not depend on what else the machine runs: ``cpu_ratio`` should agree with ``ratio``.

The issuer request is the hot path of a deployed issuer at steady state: a Google-shaped RS256
ID token (the same one every time, as a caller reuses its token for up to an hour) checked
against a JWK set served from this process (fetched once by the issuer), a policy granting the
caller ``scopes = ["*"]`` on connection ``crm``, and the connection's current access token
(valid for hours; no refresher runs) answered from the instance cache. The embedded backend
holds the connection; the issuer runs at its default log level (info), logging as deployed:
JSON lines on stderr only (one audit line per request).

``secret_reads_per_issue`` comes from the issuer's own counters (``TokenIssuer.secret_reads``
and ``issued``) in the serving process, read without touching the request path: the issuer is
served from a generated source file that re-exports the very ``issue`` function object of
``functions/issuer/main.py`` and starts one thread in the worker that writes those counters
to a file every 0.2 s. Cross-checked against the audit lines of outcome ``issued`` (one per
token produced on a cache miss; a hit's line says ``cache_hit``) and the number of answers
the load generator counted.

Each pair also sends the issuer's very request (POST /token, the ~900-byte Authorization
header, the JSON body) to the bare function, measured in turn with the other two:
``bare_same_request_rps`` (best run) is the ceiling the HTTP layer leaves the issuer, and
``issuer_vs_same_request`` what the issuer's own work (the decision, the audit line, the
answer) leaves of it; compare the CPU per request of the three as well, which other load on
the machine does not change. ``--no-same-request-floor`` skips those runs.

Both server modes are measured, each with its own pair of servers (``--modes``, default
``h11,httptools``): uvicorn's pure-Python h11 parser on asyncio's loop, and httptools on uvloop,
which uvicorn picks by itself when both import (``tokenbroker[functions]`` installs them). The
h11 mode is imposed on an environment that has both by a ``sitecustomize`` that makes them fail
to import.

Final line (JSON): per mode under ``modes`` (issuer_rps, bare_rps, ratio, p99s, CPU per
request, secret_reads_per_issue, server_mode, ...), each mode's ``ratio_<mode>`` and
``p99_ratio_<mode>``, ``ratio`` (the lowest) and ``p99_ratio`` (the highest), and the shipped
mode's (the last measured) figures at the top level. Exit 1 when a target is missed in any mode
(ratio >= 0.7, p99_ratio <= 2, secret_reads_per_issue <= 0.01) or either server answered
anything but 2xx: such a run is invalid.

Usage: ``.venv/bin/python bench/issuer_throughput.py [--duration 10] [--warmup 2] [--pairs 2]``
(~65 s with the defaults). ``--profile`` adds one issuer run under yappi (``--yappi-path``,
default /tmp/benchprof; CPU clock, event-loop thread) and prints the top functions by own time;
that run is not part of the figures.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "shared"))

from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import padding, rsa  # noqa: E402

from tokenbroker.adapters.embedded import new_key_text  # noqa: E402
from tokenbroker.entrypoints.compose import build_runtime, start_logging  # noqa: E402
from tokenbroker.entrypoints.settings import Settings  # noqa: E402
from tokenbroker.kernel.model import ClientAuthMethod, Connection, Credential, GrantType  # noqa: E402
from tokenbroker.kernel.secret import Secret  # noqa: E402
from tokenbroker.refresh.registry import ConnectionRegistry  # noqa: E402

BIN = Path(sys.executable).parent
ISSUER_SOURCE = REPO / "functions" / "issuer" / "main.py"
TRIVIAL_SOURCE = REPO / "bench" / "trivial_function.py"
AUDIENCE = "https://europe-west1-bench.cloudfunctions.net/tokenbroker-issuer"
ID_ISSUER = "https://accounts.bench.test"
CALLER = "crm-sync@bench.iam.gserviceaccount.com"
KID = "bench-key-1"
ACCESS_TOKEN = "crm-access-token-" + "x" * 40
TARGET_RATIO = 0.7
TARGET_P99_RATIO = 2.0
TARGET_READS_PER_ISSUE = 0.01

# The issuer's source as served: the same ``issue`` object as functions/issuer/main.py, plus a
# thread in the serving process that writes the TokenIssuer's counters to a file. Nothing on
# the request path changes. With BENCH_YAPPI set, the worker also runs under yappi.
WRAPPER = '''\
"""Generated by bench/issuer_throughput.py: functions/issuer/main.py plus a counters file."""
import importlib.util
import json
import os
import threading
import time

_spec = importlib.util.spec_from_file_location("tokenbroker_issuer_main", {source!r})
_main = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_main)
issue = _main.issue  # the very function functions/issuer/main.py serves

STATS = os.environ["BENCH_ISSUER_STATS"]


def _counters():
    from tokenbroker.entrypoints import issuer as entry

    service = entry._service
    if service is None:
        return None
    built = service.issuer
    verifier = built.verifier
    return {{
        "pid": os.getpid(),
        "secret_reads": built.secret_reads,
        "issued": built.issued,
        "id_token_cache_hits": getattr(verifier, "cache_hits", None),
        "jwks_fetches": getattr(getattr(verifier, "keys", None), "fetches", None),
    }}


def _profile_dump():
    request = STATS + ".profile-request"
    if not os.path.exists(request):
        return
    import yappi

    os.unlink(request)
    out = []
    for stat in yappi.get_func_stats():
        out.append([stat.full_name, stat.ncall, stat.tsub, stat.ttot])
    with open(STATS + ".profile.tmp", "w") as fh:
        json.dump({{"total": sum(t for _, _, t, _ in out), "funcs": out}}, fh)
    os.replace(STATS + ".profile.tmp", STATS + ".profile")


def _writer():
    while True:
        time.sleep(0.2)
        try:
            counters = _counters()
            if counters is not None:
                with open(STATS + ".tmp", "w") as fh:
                    json.dump(counters, fh)
                os.replace(STATS + ".tmp", STATS)
            if os.environ.get("BENCH_YAPPI"):
                _profile_dump()
        except Exception as exc:  # keep counting; say what went wrong
            with open(STATS + ".error", "a") as fh:
                fh.write(repr(exc) + "\\n")


def _start():
    if os.environ.get("BENCH_YAPPI"):
        import sys

        sys.path.insert(0, os.environ["BENCH_YAPPI"])
        import yappi

        yappi.set_clock_type("cpu")
        yappi.start(builtins=False, profile_threads=False)
    threading.Thread(target=_writer, daemon=True, name="bench-counters").start()


# gunicorn imports this module in its master and forks the worker that serves: count there.
os.register_at_fork(after_in_child=_start)
'''


# --------------------------------------------------------------------------------------------
# Setup (not timed)
# --------------------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64_uint(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def sign_id_token(key: rsa.RSAPrivateKey) -> str:
    """One Google-shaped ID token (RS256, kid), valid for an hour."""
    now = int(time.time())
    header = {"alg": "RS256", "kid": KID, "typ": "JWT"}
    claims = {
        "aud": AUDIENCE,
        "azp": "108" + "7" * 18,
        "email": CALLER,
        "email_verified": True,
        "exp": now + 3600,
        "iat": now,
        "iss": ID_ISSUER,
        "sub": "108" + "7" * 18,
    }
    signing_input = ".".join(
        b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
    )
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


@contextlib.contextmanager
def jwks_server(key: rsa.RSAPrivateKey) -> Iterator[tuple[str, list[str]]]:
    """The caller tokens' JWK set on 127.0.0.1 (the ID-token bench's server)."""
    from idtoken_verify import jwks_server as serve_jwks  # bench/ is on sys.path

    numbers = key.public_key().public_numbers()
    jwk = {"kty": "RSA", "kid": KID, "alg": "RS256", "use": "sig"}
    jwk |= {"n": b64_uint(numbers.n), "e": b64_uint(numbers.e)}
    with serve_jwks({"keys": [jwk]}) as served:
        yield served


def prepare_state(work: Path) -> dict[str, str]:
    """Embedded store with connection ``crm`` holding a token valid for hours; the policy;
    the issuer's environment (without the keys URL)."""
    key = new_key_text()
    state_dir = work / "state"
    runtime = build_runtime(
        Settings(backend="embedded", state_dir=state_dir, encryption_key=Secret(key))
    )
    now = datetime.now(UTC)
    ConnectionRegistry(
        secrets=runtime.secrets, state=runtime.state, profiles=runtime.profiles, clock=runtime.clock
    ).register(
        Connection(
            id="crm", profile="generic", grant=GrantType.REFRESH_TOKEN, client_id="crm-client",
            scopes=("crm.read", "crm.write"), token_url="https://crm.invalid/oauth/token",  # noqa: S106
            auth_method=ClientAuthMethod.BASIC,
        ),
        Credential(
            refresh_token=Secret("crm-refresh-token"), client_secret=Secret("crm-client-secret"),
            access_token=Secret(ACCESS_TOKEN), scope=("crm.read", "crm.write"),
            expires_at=now + timedelta(hours=4), obtained_at=now,
        ),
    )  # fmt: skip
    runtime.close()
    policy = work / "policy.toml"
    policy.write_text(
        textwrap.dedent(
            f"""\
            version = 1

            [[grants]]
            callers = ["{CALLER}"]
            connections = ["crm"]
            scopes = ["*"]
            max_lifetime_seconds = 3600
            """
        )
    )
    return {
        "TOKENBROKER_STATE_DIR": str(state_dir),
        "TOKENBROKER_ENCRYPTION_KEY": key,
        "TOKENBROKER_POLICY_FILE": str(policy),
        "TOKENBROKER_ISSUER_AUDIENCE": AUDIENCE,
        "TOKENBROKER_ID_TOKEN_ISSUERS": ID_ISSUER,
    }


# --------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin_prefix(cpu: int, pinned: bool) -> list[str]:
    return ["taskset", "-c", str(cpu)] if pinned else []


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the server's processes: the gunicorn master and its
        worker. Per request, it does not depend on what else the machine runs."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        pids = [self.proc.pid]
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
            pids += [int(p) for p in children.split()]
        for pid in pids:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def start_server(
    name: str, target: str, source: Path, *, env: dict[str, str], work: Path, pinned: bool
) -> Server:
    port = free_port()
    log = work / f"{name}.stderr"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [*pin_prefix(0, pinned), str(BIN / "functions-framework"), "--asgi",
             f"--target={target}", f"--source={source}", "--host=127.0.0.1", f"--port={port}"],
            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True,
        )  # fmt: skip
    server = Server(name, f"http://127.0.0.1:{port}", proc, log)
    path = "/healthz" if target == "issue" else "/"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(server.url + path, timeout=1) as response:  # noqa: S310
                if response.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"{name} did not answer 200 on {path} within 30 s")


def post_token(url: str, id_token: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(  # noqa: S310 - loopback
        url + "/token",
        data=b'{"connection":"crm"}',
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {id_token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def read_counters(path: Path, after: float) -> dict[str, Any]:
    """The issuer's counters, from a write made after ``after`` (epoch seconds)."""
    deadline = time.time() + 5
    while time.time() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):
            if path.stat().st_mtime > after:
                return dict(json.loads(path.read_text()))
        time.sleep(0.05)
    error = path.with_name(path.name + ".error")
    detail = error.read_text() if error.exists() else "no counters file"
    raise RuntimeError(f"issuer counters not written: {detail}")


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


@dataclass
class Load:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: str | None = None
    server_cpu_s: float = 0.0
    raw: str = field(default="", repr=False)

    @property
    def cpu_us_per_request(self) -> float:
        return self.server_cpu_s / max(1, self.requests) * 1e6

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "rps": round(self.rps, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "non_2xx": self.non_2xx,
            "server_cpu_us_per_request": round(self.cpu_us_per_request, 1),
            "server_cpu_share": round(self.server_cpu_s / self.seconds, 3),
            **({"socket_errors": self.socket_errors} if self.socket_errors else {}),
        }


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if match is None:
        raise ValueError(f"unreadable wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> Load:
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    if not (total and rps and p50 and p99):
        raise RuntimeError(f"could not read wrk's output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors:\s+(.*)", output)
    return Load(
        requests=int(total.group(1)),
        seconds=_ms(total.group(2) + total.group(3)) / 1000,
        rps=float(rps.group(1)),
        p50_ms=_ms(p50.group(1)),
        p99_ms=_ms(p99.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=errors.group(1).strip() if errors else None,
        raw=output,
    )


def wrk_script(work: Path, id_token: str | None) -> Path:
    """Static request (no Lua callbacks: wrk builds it once, no per-request Lua cost)."""
    script = work / ("issuer.lua" if id_token else "bare.lua")
    if id_token:
        script.write_text(
            'wrk.method = "POST"\n'
            'wrk.path = "/token"\n'
            'wrk.body = \'{"connection":"crm"}\'\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {id_token}"\n'
        )
    else:
        script.write_text('wrk.method = "GET"\nwrk.path = "/"\n')
    return script


def run_wrk(url: str, script: Path, seconds: float, connections: int, pinned: bool) -> Load:
    command = [
        *pin_prefix(1, pinned), "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
        "--timeout", "5s", "--latency", "-s", str(script), url,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


LOADGEN = """
import asyncio, json, sys, time
import aiohttp

async def main(url, method, body, headers, connections, seconds):
    latencies, bad = [], 0
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections), headers=headers
    ) as session:
        stop = time.perf_counter() + seconds

        async def worker():
            nonlocal bad
            while time.perf_counter() < stop:
                started = time.perf_counter()
                async with session.request(method, url, data=body) as response:
                    await response.read()
                    if not 200 <= response.status < 400:
                        bad += 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
    print(json.dumps({"requests": len(latencies), "seconds": elapsed,
                      "p50_ms": pick(0.5), "p99_ms": pick(0.99), "non_2xx": bad}))

asyncio.run(main(*json.loads(sys.argv[1])))
"""


def run_aiohttp(
    url: str, id_token: str | None, seconds: float, connections: int, pinned: bool
) -> Load:
    """Fallback when wrk is missing: an aiohttp client in a process of its own."""
    if id_token:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {id_token}"}
        spec = [url + "/token", "POST", '{"connection":"crm"}', headers]
    else:
        spec = [url + "/", "GET", None, {}]
    command = [*pin_prefix(1, pinned), sys.executable, "-c", LOADGEN,
               json.dumps([*spec, connections, seconds])]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return Load(
        requests=data["requests"],
        seconds=data["seconds"],
        rps=data["requests"] / data["seconds"],
        p50_ms=data["p50_ms"],
        p99_ms=data["p99_ms"],
        non_2xx=data["non_2xx"],
    )


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def measure(
    server: Server,
    id_token: str | None,
    *,
    args: argparse.Namespace,
    work: Path,
    pinned: bool,
    use_wrk: bool,
) -> Load:
    if use_wrk:
        script = wrk_script(work, id_token)
        run_wrk(server.url, script, args.warmup, args.connections, pinned)
        cpu = server.cpu_seconds()
        load = run_wrk(server.url, script, args.duration, args.connections, pinned)
    else:
        run_aiohttp(server.url, id_token, args.warmup, args.connections, pinned)
        cpu = server.cpu_seconds()
        load = run_aiohttp(server.url, id_token, args.duration, args.connections, pinned)
    load.server_cpu_s = server.cpu_seconds() - cpu
    return load


def profile_issuer(
    args: argparse.Namespace, env: dict[str, str], work: Path, id_token: str, pinned: bool
) -> dict[str, Any]:
    """One extra issuer run under yappi (CPU clock, main thread); top functions by own time."""
    stats = work / "profiled-counters.json"
    server = start_server(
        "issuer-profiled",
        "issue",
        work / "bench_issuer_main.py",
        env={**env, "BENCH_ISSUER_STATS": str(stats), "BENCH_YAPPI": args.yappi_path},
        work=work,
        pinned=pinned,
    )
    try:
        status, _ = post_token(server.url, id_token)
        if status != 200:
            raise RuntimeError(f"profiled issuer answered {status}")
        use_wrk = shutil.which("wrk") is not None
        load = measure(server, id_token, args=args, work=work, pinned=pinned, use_wrk=use_wrk)
        request = Path(str(stats) + ".profile-request")
        request.touch()
        out = Path(str(stats) + ".profile")
        deadline = time.time() + 30
        while request.exists() or not out.exists():
            if time.time() > deadline:
                raise RuntimeError("no profile written")
            time.sleep(0.1)
        profile = json.loads(out.read_text())
    finally:
        server.stop()
    total = profile["total"] or 1.0
    funcs = sorted(profile["funcs"], key=lambda f: -f[2])[: args.profile_top]
    cumulative = sorted(profile["funcs"], key=lambda f: -f[3])
    requests = max(1, load.requests)
    return {
        "profiled_rps": round(load.rps, 1),
        "cpu_us_per_request_profiled": round(total / requests * 1e6, 1),
        "top_own_time": [
            {"fn": name[-110:], "calls": calls, "share": round(tsub / total, 3)}
            for name, calls, tsub, _ in funcs
        ],
        "cumulative_of_interest": [
            {"fn": name[-110:], "calls": calls, "share": round(ttot / total, 3)}
            for name, calls, _, ttot in cumulative
            if "tokenbroker" in name or "starlette" in name or "functions_framework" in name
        ][: args.profile_top],
    }


#: The two ways uvicorn serves ``functions-framework --asgi``: its pure-Python h11 parser on
#: asyncio's loop, or httptools on uvloop (picked by itself when both import). ``h11`` is
#: imposed on processes of an environment that has both by a ``sitecustomize`` that makes them
#: fail to import (uvicorn's "auto" choices fall back on ImportError).
MODES = ("h11", "httptools")
_NO_FAST_SERVER = """\
import sys
sys.modules["httptools"] = None
sys.modules["uvloop"] = None
"""


def mode_env(mode: str, work: Path) -> dict[str, str]:
    """The environment that makes a server process run in ``mode``."""
    if mode == "h11":
        shim = work / "h11-mode"
        shim.mkdir(exist_ok=True)
        (shim / "sitecustomize.py").write_text(_NO_FAST_SERVER)
        path = [str(shim), os.environ.get("PYTHONPATH", "")]
        return {"PYTHONPATH": os.pathsep.join(p for p in path if p)}
    if not (importlib.util.find_spec("httptools") and importlib.util.find_spec("uvloop")):
        raise RuntimeError("httptools mode needs httptools and uvloop (tokenbroker[functions])")
    return {}


def mode_name(mode: str) -> str:
    loop = "asyncio" if mode == "h11" else "uvloop"
    return f"functions-framework --asgi (gunicorn + 1 uvicorn worker; {mode}, {loop})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per timed run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each run")
    parser.add_argument("--pairs", type=int, default=2, help="(trivial, issuer) run pairs")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"server modes to measure, comma-separated (default: {','.join(MODES)})",
    )
    parser.add_argument(
        "--no-same-request-floor",
        dest="same_request_floor",
        action="store_false",
        help="skip the runs of the bare function with the issuer's request",
    )
    parser.add_argument("--profile", action="store_true", help="extra issuer run under yappi")
    parser.add_argument("--yappi-path", default="/tmp/benchprof")  # noqa: S108 - documented
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        parser.error(f"--modes: expected some of {', '.join(MODES)}, got {args.modes!r}")

    def say(message: str) -> None:
        if not args.json_only:
            print(message, flush=True)

    start_logging(level="warning")  # this process's own (setup) logging
    results: dict[str, dict[str, Any]] = {}
    for mode in modes:
        say(f"== {mode_name(mode)}")
        results[mode] = run_mode(mode, args, say)
    figures = [results[m] for m in modes]
    summary: dict[str, Any] = {
        # The figures of the mode the functions ship (httptools when measured), then each.
        **{k: v for k, v in results[modes[-1]].items() if k != "runs"},
        "ratio": min(r["ratio"] for r in figures),
        "p99_ratio": max(r["p99_ratio"] for r in figures),
        "modes": results,
        "targets_met": all(r["targets_met"] for r in figures),
    }
    for mode in modes:
        summary[f"ratio_{mode}"] = results[mode]["ratio"]
        summary[f"p99_ratio_{mode}"] = results[mode]["p99_ratio"]
    print(json.dumps(summary))
    return 0 if summary["targets_met"] else 1


def run_mode(  # noqa: PLR0912, PLR0915 - one linear script
    mode: str, args: argparse.Namespace, say: Callable[[str], None]
) -> dict[str, Any]:
    """Both servers in ``mode``, measured alternately: the figures, and ``targets_met``."""
    use_wrk = shutil.which("wrk") is not None
    pinned = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if pinned:
        os.sched_setaffinity(0, {1})  # keep this process (JWKS server, polling) off CPU 0
    work = Path(tempfile.mkdtemp(prefix=f"issuer-throughput-{mode}-"))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    id_token = sign_id_token(key)
    env = {**prepare_state(work), **mode_env(mode, work)}
    stats = work / "counters.json"
    wrapper = work / "bench_issuer_main.py"
    wrapper.write_text(WRAPPER.format(source=str(ISSUER_SOURCE)))
    failures: list[str] = []
    with jwks_server(key) as (jwks_url, jwks_hits):
        env["TOKENBROKER_ID_TOKEN_KEYS_URL"] = jwks_url
        bare = start_server("trivial", "hello", TRIVIAL_SOURCE, env=env, work=work, pinned=pinned)
        try:
            issuer_env = {**env, "BENCH_ISSUER_STATS": str(stats)}
            issuer = start_server(
                "issuer", "issue", wrapper, env=issuer_env, work=work, pinned=pinned
            )
        except BaseException:
            bare.stop()
            raise
        try:
            status, body = post_token(issuer.url, id_token)
            if status != 200 or body.get("access_token") != ACCESS_TOKEN:
                log = issuer.log.read_text()[-2000:]
                raise RuntimeError(f"invalid bench: issuer answered {status}: {body}\n{log}")
            generator = "wrk" if use_wrk else "aiohttp"
            say(f"issuer answers 200 ({body['expires_in']} s); load: {generator}, pinned: {pinned}")
            say(f"work dir {work}")
            runs: dict[str, list[Load]] = {"bare": [], "issuer": []}
            say(f"load average before: {os.getloadavg()[0]:.2f}")
            before_all = read_counters(stats, 0)
            for pair in range(args.pairs):
                load = measure(bare, None, args=args, work=work, pinned=pinned, use_wrk=use_wrk)
                runs["bare"].append(load)
                say(
                    f"[{pair}] bare   {load.rps:>9,.0f} req/s  p99 {load.p99_ms:.2f} ms  "
                    f"server CPU {load.cpu_us_per_request:.0f} us/req, "
                    f"{load.server_cpu_s / load.seconds:.0%} of a core"
                )
                load = measure(
                    issuer, id_token, args=args, work=work, pinned=pinned, use_wrk=use_wrk
                )
                runs["issuer"].append(load)
                say(
                    f"[{pair}] issuer {load.rps:>9,.0f} req/s  p99 {load.p99_ms:.2f} ms  "
                    f"server CPU {load.cpu_us_per_request:.0f} us/req, "
                    f"{load.server_cpu_s / load.seconds:.0%} of a core"
                )
                if args.same_request_floor:
                    # The bare function sent the issuer's very request (POST /token, the
                    # ~900-byte Authorization header, the body): the HTTP layer's own cost.
                    load = measure(
                        bare, id_token, args=args, work=work, pinned=pinned, use_wrk=use_wrk
                    )
                    runs.setdefault("bare_same_request", []).append(load)
                    say(
                        f"[{pair}] bare, issuer's request {load.rps:>9,.0f} req/s  "
                        f"p99 {load.p99_ms:.2f} ms  server CPU {load.cpu_us_per_request:.0f} us/req"
                    )
            counters = read_counters(stats, time.time())
            same_runs = runs.get("bare_same_request", [])
            same = max(same_runs, key=lambda r: r.rps) if same_runs else None
            # A run where either server answered errors (or dropped connections) is invalid.
            checked = [(name, r) for name, loads in runs.items() for r in loads]
            for name, load in checked:
                if load.non_2xx or load.socket_errors:
                    failures.append(
                        f"{name}: {load.non_2xx} non-2xx answers, "
                        f"socket errors: {load.socket_errors}"
                    )
            # The issuer logs as deployed: JSON lines on stderr only (Cloud Run's logging agent
            # reads them there), captured by start_server.
            log_file = issuer.log
            # One audit line per decision; a token produced (not from the cache) is "issued".
            log_issued = sum(
                '"message": "token decision"' in line and '"outcome": "issued"' in line
                for line in log_file.read_text().splitlines()
            )
            jwks_fetches = len(jwks_hits)
            profile = profile_issuer(args, env, work, id_token, pinned) if args.profile else None
        finally:
            issuer.stop()
            bare.stop()
    if failures:
        say("\n".join(failures) + "\n" + issuer.log.read_text()[-3000:])

    best_bare = max(runs["bare"], key=lambda r: r.rps)
    best_issuer = max(runs["issuer"], key=lambda r: r.rps)
    issued = counters["issued"]
    issuer_cpu = statistics.median(r.cpu_us_per_request for r in runs["issuer"])
    bare_cpu = statistics.median(r.cpu_us_per_request for r in runs["bare"])
    secret_reads = counters["secret_reads"]
    wrk_requests = sum(r.requests for r in runs["issuer"])
    result: dict[str, Any] = {
        "issuer_rps": round(best_issuer.rps, 1),
        "bare_rps": round(best_bare.rps, 1),
        "ratio": round(best_issuer.rps / best_bare.rps, 3),
        "issuer_p99_ms": round(best_issuer.p99_ms, 3),
        "bare_p99_ms": round(best_bare.p99_ms, 3),
        "p99_ratio": round(best_issuer.p99_ms / best_bare.p99_ms, 3),
        "secret_reads_per_issue": round(secret_reads / max(1, issued), 6),
        "issued": issued,
        "secret_reads": secret_reads,
        "issued_under_load": issued - before_all["issued"],  # timed runs and warm-ups
        "load_generator_issuer_requests": wrk_requests,
        "issued_audit_lines": log_issued,
        "id_token_cache_hits": counters.get("id_token_cache_hits"),
        "jwks_fetches": jwks_fetches,
        "connections": args.connections,
        "server_mode": mode_name(mode),
        "mode": mode,
        "pinned": pinned,
        "load_generator": "wrk" if use_wrk else "aiohttp (wrk not found)",
        "pick": "best req/s run of each (its own p99)",
        "issuer_cpu_us_per_request": round(issuer_cpu, 1),
        "bare_cpu_us_per_request": round(bare_cpu, 1),
        "cpu_ratio": round(bare_cpu / issuer_cpu, 3),
        "loadavg_after": os.getloadavg()[0],
        **(
            {
                "bare_same_request_rps": round(same.rps, 1),
                "bare_same_request_p99_ms": round(same.p99_ms, 3),
                "bare_same_request_cpu_us_per_request": round(same.cpu_us_per_request, 1),
                "issuer_vs_same_request": round(best_issuer.rps / same.rps, 3),
            }
            if same is not None
            else {}
        ),
        "median_issuer_rps": round(statistics.median(r.rps for r in runs["issuer"]), 1),
        "median_bare_rps": round(statistics.median(r.rps for r in runs["bare"]), 1),
        "runs": {name: [r.to_json() for r in loads] for name, loads in runs.items()},
        "duration_s": args.duration,
        "warmup_s": args.warmup,
    }
    if profile is not None:
        (work / "profile.json").write_text(json.dumps(profile, indent=1))
        say(f"profile: {work / 'profile.json'}")
        for row in profile["top_own_time"]:
            say(f"  {row['share']:6.1%} {row['calls']:>8} {row['fn']}")
    if result["ratio"] < TARGET_RATIO:
        failures.append(f"ratio {result['ratio']} < {TARGET_RATIO}")
    if result["p99_ratio"] > TARGET_P99_RATIO:
        failures.append(f"p99_ratio {result['p99_ratio']} > {TARGET_P99_RATIO}")
    if result["secret_reads_per_issue"] > TARGET_READS_PER_ISSUE:
        failures.append(f"secret_reads_per_issue > {TARGET_READS_PER_ISSUE}")
    if log_issued != secret_reads:
        failures.append(f"{log_issued} 'issued' audit lines but {secret_reads} secret reads")
    if issued < wrk_requests:
        failures.append(f"issuer counted {issued} issues, fewer than the {wrk_requests} answered")
    result["targets_met"] = not failures
    if failures:
        result["failures"] = failures
        print(f"{mode}: targets missed: " + "; ".join(failures), file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)  # kept (its logs, state) when something failed
    return result


if __name__ == "__main__":
    raise SystemExit(main())
