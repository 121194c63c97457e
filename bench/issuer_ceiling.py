"""How fast can *any* issuer be on this stack? The ceiling of ``bench/issuer_throughput.py``.

``issuer_throughput.py`` compares the issuer with a hello-world function. This bench asks how
much of the gap is the issuer's own work and how much is the request's shape on the same
stack, by serving, side by side and alternately like ``issuer_throughput.py`` (same servers,
same pinning, same ``wrk`` load, same ID token and body; ``--modes`` as there):

* ``bare``: the hello-world function answering a GET (the floor of ``issuer_throughput.py``);
* ``read_only``: the issuer's entry point with ``/token`` cut down to what any token answer
  needs before deciding anything -- the body read (size and time limits), the credential
  header picked -- answering a constant token body with the issuer's headers;
* ``lookup_only``: ``read_only`` plus the cache's lookup by the request's bytes (SHA-256 of
  the credential header and the body) and the answer rendered from the cached token, with
  *no* check at all: no verification still standing, no connection status, no lifetime cap,
  no audit line, no metrics (a broken issuer, measured only as the ceiling of a correct one);
* ``issuer``: the real issuer (``functions/issuer/main.py``), every check on every request.

Each variant is the real ``functions/issuer/main.py`` module with ``_token`` of
:mod:`tokenbroker.entrypoints.issuer` replaced after import (the generated source files are
in the work directory). The run with the highest req/s of each is reported, with its CPU per
request from /proc.

Final line (JSON): per mode, each variant's req/s, CPU per request and ratio to ``bare``;
``ceiling_ratio_<mode>`` is ``lookup_only``'s: what ``issuer_throughput.py``'s ratio can be
at best with the decision's inputs looked up and nothing checked. Informational: no target,
exit 0 unless a server answered anything but 2xx.

Usage: ``.venv/bin/python bench/issuer_ceiling.py [--duration 5] [--rounds 3]`` (~2 min per
mode with the defaults).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
_spec = importlib.util.spec_from_file_location("issuer_throughput", HERE / "issuer_throughput.py")
assert _spec is not None  # noqa: S101 - a file beside this one
assert _spec.loader is not None  # noqa: S101
it = importlib.util.module_from_spec(_spec)
sys.modules["issuer_throughput"] = it
_spec.loader.exec_module(it)

_LOAD_ISSUER = """\
import importlib.util
_spec = importlib.util.spec_from_file_location("tokenbroker_issuer_main", {source!r})
_main = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_main)
issue = _main.issue
"""

_READ_ONLY = """
from tokenbroker.entrypoints import issuer as _entry

_BODY = (b'{{"access_token":"{token}","token_type":"Bearer","expires_at":"2026-12-03T14:00:00Z",'
         b'"expires_in":3599,"refresh_after":"2026-12-03T13:50:00Z","scope":"crm.read crm.write",'
         b'"connection":"crm"}}')


async def _token(request):
    scope = request.scope
    _entry._header(scope["headers"], b"content-type")
    issuer = _entry._service.issuer if _entry._service is not None else (await _entry.build())[0]
    await _entry.read_body(request)
    issuer.verifier.select_authorization(scope["headers"])
    return _entry._token_answer(_BODY)


_entry._token = _token
"""

_LOOKUP_ONLY = """
from tokenbroker.entrypoints import issuer as _entry
from tokenbroker.issue import issuer as _issuer_module


async def _token(request):
    scope = request.scope
    _entry._header(scope["headers"], b"content-type")
    issuer = _entry._service.issuer if _entry._service is not None else (await _entry.build())[0]
    body = await _entry.read_body(request)
    authorization = issuer.verifier.select_authorization(scope["headers"])
    ticket = issuer._tickets.get(_issuer_module._request_key(authorization, body))
    if ticket is None:  # the first request: the real path, which leaves the ticket
        token = await issuer.issue(authorization, body)
    else:
        token = ticket.cached.token
    return _entry._token_answer(token.render(issuer.clock.now()))


_entry._token = _token
"""

VARIANTS = {"read_only": _READ_ONLY, "lookup_only": _LOOKUP_ONLY, "issuer": ""}


def run_mode(mode: str, args: argparse.Namespace, say: Any) -> dict[str, Any]:
    pinned = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    use_wrk = shutil.which("wrk") is not None
    if pinned:
        os.sched_setaffinity(0, {1})
    work = Path(tempfile.mkdtemp(prefix=f"issuer-ceiling-{mode}-"))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    id_token = it.sign_id_token(key)
    env = {**it.prepare_state(work), **it.mode_env(mode, work)}
    sources = {}
    for name, patch in VARIANTS.items():
        source = work / f"issuer_{name}.py"
        source.write_text(
            _LOAD_ISSUER.format(source=str(it.ISSUER_SOURCE)) + patch.format(token=it.ACCESS_TOKEN)
        )
        sources[name] = source
    load_args = argparse.Namespace(
        warmup=args.warmup, duration=args.duration, connections=args.connections
    )
    runs: dict[str, list[Any]] = {name: [] for name in ("bare", *VARIANTS)}
    failures: list[str] = []
    with it.jwks_server(key) as (jwks_url, _):
        env["TOKENBROKER_ID_TOKEN_KEYS_URL"] = jwks_url
        for round_ in range(args.rounds):
            for name, loads in runs.items():
                if name == "bare":
                    server = it.start_server(
                        "bare", "hello", it.TRIVIAL_SOURCE, env=env, work=work, pinned=pinned
                    )
                    token = None
                else:
                    server = it.start_server(
                        name, "issue", sources[name], env=env, work=work, pinned=pinned
                    )
                    token = id_token
                    status, body = it.post_token(server.url, id_token)
                    if status != 200 or body.get("access_token") != it.ACCESS_TOKEN:
                        server.stop()
                        raise RuntimeError(f"invalid bench: {name} answered {status}: {body}")
                try:
                    load = it.measure(
                        server, token, args=load_args, work=work, pinned=pinned, use_wrk=use_wrk
                    )
                finally:
                    server.stop()
                if load.non_2xx or load.socket_errors:
                    failures.append(f"{name}: {load.non_2xx} non-2xx, {load.socket_errors}")
                loads.append(load)
                say(
                    f"[{round_}] {name:<12} {load.rps:>9,.0f} req/s  "
                    f"server CPU {load.cpu_us_per_request:.0f} us/req"
                )
    best = {name: max(loads, key=lambda r: r.rps) for name, loads in runs.items()}
    bare = best["bare"]
    figures = {
        name: {
            "rps": round(load.rps, 1),
            "cpu_us_per_request": round(load.cpu_us_per_request, 1),
            "ratio": round(load.rps / bare.rps, 3),
            "cpu_ratio": round(bare.cpu_us_per_request / load.cpu_us_per_request, 3),
        }
        for name, load in best.items()
    }
    return {
        "server_mode": it.mode_name(mode),
        "load_generator": "wrk" if use_wrk else "aiohttp (wrk not found)",
        "pinned": pinned,
        "variants": figures,
        "ceiling_ratio": figures["lookup_only"]["ratio"],
        "failures": failures,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--modes", default=",".join(it.MODES))
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()

    def say(message: str) -> None:
        if not args.json_only:
            print(message, flush=True)

    it.start_logging(level="warning")
    results = {}
    for mode in [m for m in args.modes.split(",") if m]:
        say(f"== {it.mode_name(mode)}")
        results[mode] = run_mode(mode, args, say)
    summary: dict[str, Any] = {"modes": results}
    for mode, result in results.items():
        summary[f"ceiling_ratio_{mode}"] = result["ceiling_ratio"]
        summary[f"issuer_ratio_{mode}"] = result["variants"]["issuer"]["ratio"]
    print(json.dumps(summary))
    return 1 if any(r["failures"] for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
