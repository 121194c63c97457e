"""Caller ID token verification rate: ``IdTokenVerifier`` against the raw RSA floor.

What it does, in order (steps 3-6 are timed, each ``--rounds`` times; the median is reported):

1. generates a 2048-bit RSA key (Google's size) and serves its JWK set from a local HTTP server
   with ``Cache-Control: max-age=3600``, as Google's certs URL does;
2. signs ``--n`` distinct Google-shaped ID tokens (``iss`` accounts.google.com, ``aud`` the
   function URL, ``email``, ``email_verified``, one hour of life); untimed;
3. **cold**: a new ``KeySet`` + ``IdTokenVerifier`` verifies the first token, which fetches
   and parses the JWK set over HTTP (``cold_first_verify_ms``; once, not in the median);
4. **verifier**: the verifier, key set now cached, verifies every token once. Each token is
   new to it, so every call is a full verification (our size and shape checks, header from
   the header cache, key lookup, joserfc's ``jws.deserialize_compact`` with the RS256 check,
   our claim checks) plus the insert into the verified-token cache: ``verifier_per_second``;
5. **floor**: ``cryptography``'s ``RSAPublicKey.verify`` (PKCS#1 v1.5, SHA-256) on the same
   tokens with signature bytes and signing input decoded beforehand, nothing else:
   ``floor_per_second``. ``ratio`` = verifier / floor;
6. **cache hits**: the same tokens again through the same verifier, now all in its cache
   (digest, lookup, expiry and key checks): ``cache_hit_per_second``;
7. for comparison, joserfc 1.x used the plain way (``jwt.decode`` with a cached ``KeySet``
   and ``algorithms=["RS256"]``, then the same claim checks done by its
   ``JWTClaimsRegistry``) on the same tokens: ``joserfc_per_second``. The verifier runs on
   joserfc's JWS layer too, so ``verifier_vs_joserfc`` near 1 says our own checks cost about
   what joserfc's claims registry does;
8. checks, untimed: every verification returned the right caller, the keys URL was fetched
   exactly once, and every second pass was a cache hit. Exits 1 if a check fails.

The floors in /work/shared/PLATFORM.md (raw cryptography ~64k/s, joserfc with cached keys
~29-30k/s on this kind of machine) are medians from other runs: compare ratios, not rates.

The last line on stdout is one JSON object: ``verifier_per_second``, ``floor_per_second``,
``ratio``, ``cache_hit_per_second`` plus details.

Usage: ``.venv/bin/python bench/idtoken_verify.py [--n 2000] [--rounds 5] [--json-only]``.
"""

from __future__ import annotations

import argparse
import base64
import http.server
import json
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "shared"))

from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import padding, rsa  # noqa: E402
from tests.support.oidc import rsa_public_jwk, sign_rs256  # noqa: E402

from tokenbroker.entrypoints.compose import start_logging  # noqa: E402
from tokenbroker.issue.idtoken import IdTokenVerifier, KeySet  # noqa: E402

AUDIENCE = "https://europe-west1-proj.cloudfunctions.net/tokenbroker-issuer"
ISSUER = "https://accounts.google.com"
KID = "6f7254101f56e41cf35c9926de84a2d552b4c6f1"  # Google-shaped kid (40 hex)


def log(message: str, *, quiet: bool) -> None:
    if not quiet:
        print(message, flush=True)


@contextmanager
def jwks_server(jwks: dict[str, Any]) -> Iterator[tuple[str, list[str]]]:
    body = json.dumps(jwks).encode()
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "public, max-age=3600, must-revalidate")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/oauth2/v3/certs", hits
    finally:
        server.shutdown()
        server.server_close()


def make_tokens(key: rsa.RSAPrivateKey, n: int) -> list[str]:
    now = int(time.time())
    return [
        sign_rs256(
            {
                "aud": AUDIENCE,
                "azp": f"1{i:020d}",
                "email": f"caller-{i % 50}@proj.iam.gserviceaccount.com",
                "email_verified": True,
                "exp": now + 3600,
                "iat": now,
                "iss": ISSUER,
                "sub": f"1{i:020d}",
            },
            key,
            kid=KID,
        )
        for i in range(n)
    ]


def rate(n: int, body: Callable[[], None]) -> float:
    started = time.perf_counter()
    body()
    return n / (time.perf_counter() - started)


def median_rate(rounds: int, n: int, make_body: Callable[[], Callable[[], None]]) -> float:
    """Median over ``rounds``; ``make_body`` is called untimed before each round."""
    return statistics.median(rate(n, make_body()) for _ in range(rounds))


def floor_body(public: rsa.RSAPublicKey, tokens: Sequence[str]) -> Callable[[], None]:
    prepared = []
    for token in tokens:
        signing_input, _, signature = token.rpartition(".")
        sig = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
        prepared.append((sig, signing_input.encode()))
    pad, sha = padding.PKCS1v15(), hashes.SHA256()

    def body() -> None:
        for sig, data in prepared:
            public.verify(sig, data, pad, sha)

    return body


def joserfc_body(jwks: dict[str, Any], tokens: Sequence[str]) -> Callable[[], None]:
    from joserfc import jwt
    from joserfc.jwk import KeySet as JoseKeySet

    key_set = JoseKeySet.import_key_set(cast(Any, jwks))  # built once, outside the timing
    registry = jwt.JWTClaimsRegistry(
        iss={"essential": True, "values": [ISSUER]},
        aud={"essential": True, "value": AUDIENCE},
        sub={"essential": True},
        email={"essential": True},
        email_verified={"essential": True, "value": True},
        iat={"essential": True},
        exp={"essential": True},
        leeway=60,
    )

    def body() -> None:
        for token in tokens:
            decoded = jwt.decode(token, key_set, algorithms=["RS256"])
            registry.validate(decoded.claims)

    return body


def verify_all(
    verifier: IdTokenVerifier, tokens: Sequence[str], out: list[str]
) -> Callable[[], None]:
    out.clear()

    def body() -> None:
        verify = verifier.verify
        append = out.append
        for token in tokens:
            append(verify(token).email)

    return body


def measure(
    args: argparse.Namespace,
    key: rsa.RSAPrivateKey,
    jwks: dict[str, Any],
    tokens: Sequence[str],
    failures: list[str],
) -> tuple[dict[str, list[float]], float, int]:
    """Rates per phase (rounds interleaved, so drift on the machine hits every phase alike),
    the cold first verification in ms, and how often the keys URL was fetched."""
    expected = [f"caller-{i % 50}@proj.iam.gserviceaccount.com" for i in range(args.n)]
    rates: dict[str, list[float]] = {"verifier": [], "floor": [], "cache_hit": [], "joserfc": []}
    results: list[str] = []
    with jwks_server(jwks) as (url, hits):
        keys = KeySet(url)  # cold: fetched over HTTP and parsed on the first verification
        started = time.perf_counter()
        IdTokenVerifier(audience=AUDIENCE, keys=keys).verify(tokens[0])
        cold_ms = (time.perf_counter() - started) * 1000
        for _ in range(args.rounds):
            rates["floor"].append(rate(args.n, floor_body(key.public_key(), tokens)))
            # Same cached key set, empty token cache: every call is a full verification.
            verifier = IdTokenVerifier(audience=AUDIENCE, keys=keys, cache_size=args.n)
            rates["verifier"].append(rate(args.n, verify_all(verifier, tokens, results)))
            if results != expected or verifier.cache_hits != 0:
                failures.append("full verification returned wrong callers or hit the cache")
            rates["cache_hit"].append(rate(args.n, verify_all(verifier, tokens, results)))
            if results != expected or verifier.cache_hits != args.n:
                failures.append("second pass returned wrong callers or missed the cache")
            rates["joserfc"].append(rate(args.n, joserfc_body(jwks, tokens)))
        if len(hits) != 1 or keys.fetches != 1:
            failures.append(f"keys URL fetched {len(hits)} times, expected once")
        return rates, cold_ms, len(hits)


def run(args: argparse.Namespace) -> int:
    quiet = args.json_only
    start_logging(level="warning")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = {"keys": [rsa_public_jwk(key, KID)]}
    log(f"signing {args.n} tokens ...", quiet=quiet)
    tokens = make_tokens(key, args.n)
    failures: list[str] = []
    rates, cold_ms, fetches = measure(args, key, jwks, tokens, failures)
    median = {phase: statistics.median(values) for phase, values in rates.items()}
    ratio = median["verifier"] / median["floor"]
    log(f"cold first verification (fetch + parse JWKS + verify): {cold_ms:.1f} ms", quiet=quiet)
    log(f"verifier, full verification: {median['verifier']:,.0f}/s", quiet=quiet)
    log(f"floor, raw cryptography RSA verify: {median['floor']:,.0f}/s", quiet=quiet)
    log(f"ratio verifier/floor: {ratio:.2f}", quiet=quiet)
    log(f"verifier, cache hits: {median['cache_hit']:,.0f}/s", quiet=quiet)
    log(f"joserfc jwt.decode + claims registry: {median['joserfc']:,.0f}/s", quiet=quiet)
    for failure in failures:
        print(f"CHECK FAILED: {failure}", file=sys.stderr)
    result = {
        "verifier_per_second": round(median["verifier"], 1),
        "floor_per_second": round(median["floor"], 1),
        "ratio": round(ratio, 3),
        "cache_hit_per_second": round(median["cache_hit"], 1),
        "joserfc_per_second": round(median["joserfc"], 1),
        "verifier_vs_joserfc": round(median["verifier"] / median["joserfc"], 3),
        "cold_first_verify_ms": round(cold_ms, 2),
        "n": args.n,
        "rounds": args.rounds,
        "token_bytes": len(tokens[0]),
        "key_bits": 2048,
        "jwks_fetches": fetches,
        "rates": {phase: [round(r) for r in values] for phase, values in rates.items()},
        "checks_passed": not failures,
        "python": platform.python_version(),
    }
    print(json.dumps(result), flush=True)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="distinct tokens (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per phase")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if args.n < 1 or args.rounds < 1:
        parser.error("--n and --rounds must be at least 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
