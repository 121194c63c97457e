"""Drive the real OAuth 2.0 / OpenID Connect test server in ``tests/oidc_server``.

The server is ``oidc-provider`` (npm, OpenID Certified) plus test plumbing: non-interactive
login/consent, the RFC 7523 JWT bearer grant (Google service-account style), a ledger of every
issued token, fault injection and counters under ``/test/``.  See ``server.mjs`` for details.

Only the standard library, ``httpx`` and ``cryptography`` are used here.

Typical use (the lead wires a fixture around :func:`start_oidc_server`)::

    server = start_oidc_server(tmp_path_factory)
    tokens = server.obtain_refresh_token(RT_BASIC_ID, RT_BASIC_SECRET)
    server.set_faults([{"kind": "status", "status": 503, "retry_after": "2"}])
    ...
    server.stop()
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import html
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVER_DIR = REPO_ROOT / "tests" / "oidc_server"
SERVER_SCRIPT = SERVER_DIR / "server.mjs"

MIN_NODE_MAJOR = 20
NODE_INSTALL_HINT = (
    "node/npm not installed: install Node 20+ (e.g. `apt-get install nodejs npm`, or from "
    "https://nodejs.org) to run the tests against the real OAuth server in tests/oidc_server"
)

# What the server issues and accepts.
API_RESOURCE = "urn:tokenbroker:api"
API_SCOPES = "api:read api:write"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
REDIRECT_URI = "http://127.0.0.1/cb"
TEST_ACCOUNT = "test-user"
REFRESH_TOKEN_TTL = 24 * 60 * 60
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"  # RFC 8628 §3.4

# Default clients registered on every server (RFC 7591 metadata).
RT_BASIC_ID, RT_BASIC_SECRET = "rt-basic", "rt-basic-secret"
RT_POST_ID, RT_POST_SECRET = "rt-post", "rt-post-secret"
#: A client whose refresh token is not rotated (the server rotates every other one).
RT_FIXED_ID, RT_FIXED_SECRET = "rt-fixed", "rt-fixed-secret"
#: A native client (RFC 8252) for ``tokenbroker authorize``: its loopback redirect URI matches
#: any port (RFC 8252 §7.3; oidc-provider allows that for ``application_type: native``).
CONNECT_ID, CONNECT_SECRET = "connect-native", "connect-native-secret"
CONNECT_REDIRECT_URI = "http://127.0.0.1/callback"
CC_BASIC_ID, CC_BASIC_SECRET = "cc-basic", "cc-basic-secret"
CC_POST_ID, CC_POST_SECRET = "cc-post", "cc-post-secret"
# Public client (token_endpoint_auth_method "none") that bare JWT bearer requests run under.
JWT_BEARER_CLIENT_ID = "jwt-bearer-public"


def _rt_client(client_id: str, secret: str, method: str) -> dict[str, Any]:
    return {
        "client_id": client_id,
        "client_secret": secret,
        "token_endpoint_auth_method": method,
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "redirect_uris": [REDIRECT_URI],
    }


def _cc_client(client_id: str, secret: str, method: str) -> dict[str, Any]:
    return {
        "client_id": client_id,
        "client_secret": secret,
        "token_endpoint_auth_method": method,
        "grant_types": ["client_credentials"],
        "response_types": [],
        "redirect_uris": [],
    }


DEFAULT_CLIENTS: tuple[dict[str, Any], ...] = (
    _rt_client(RT_BASIC_ID, RT_BASIC_SECRET, "client_secret_basic"),
    _rt_client(RT_POST_ID, RT_POST_SECRET, "client_secret_post"),
    _rt_client(RT_FIXED_ID, RT_FIXED_SECRET, "client_secret_basic"),
    {
        **_rt_client(CONNECT_ID, CONNECT_SECRET, "client_secret_basic"),
        "application_type": "native",
        "redirect_uris": [CONNECT_REDIRECT_URI],
        "grant_types": ["authorization_code", "refresh_token", DEVICE_CODE_GRANT],
    },
    _cc_client(CC_BASIC_ID, CC_BASIC_SECRET, "client_secret_basic"),
    _cc_client(CC_POST_ID, CC_POST_SECRET, "client_secret_post"),
    {
        "client_id": JWT_BEARER_CLIENT_ID,
        "token_endpoint_auth_method": "none",
        "grant_types": [JWT_BEARER_GRANT],
        "response_types": [],
        "redirect_uris": [],
    },
)


# ---------------------------------------------------------------------------------------------
# Node availability
# ---------------------------------------------------------------------------------------------


def _node_major() -> int | None:
    node = shutil.which("node")
    if node is None:
        return None
    try:
        out = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
        return int(out.strip().lstrip("v").split(".")[0])
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def node_skip_reason() -> str | None:
    """Why the OIDC server cannot run here (for ``pytest.skip``), or None when it can."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return NODE_INSTALL_HINT
    major = _node_major()
    if major is None or major < MIN_NODE_MAJOR:
        return f"{NODE_INSTALL_HINT} (found node major version {major})"
    return None


def node_available() -> bool:
    return node_skip_reason() is None


def ensure_node_modules() -> None:
    """``npm ci`` the server's pinned dependencies once (locked across processes)."""
    marker = SERVER_DIR / "node_modules" / "oidc-provider" / "package.json"
    if marker.exists():
        return
    lock_name = "tokenbroker-oidc-npm-" + hashlib.sha256(str(SERVER_DIR).encode()).hexdigest()[:12]
    lock_path = Path(tempfile.gettempdir()) / f"{lock_name}.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return
        proc = subprocess.run(
            [
                "npm",
                "ci",
                "--prefix",
                str(SERVER_DIR),
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={**os.environ, "NO_UPDATE_NOTIFIER": "1", "npm_config_update_notifier": "false"},
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"npm ci in {SERVER_DIR} failed ({proc.returncode}):\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            )


# ---------------------------------------------------------------------------------------------
# Keys, JWKs and JWTs
# ---------------------------------------------------------------------------------------------


_HIDDEN_INPUT = re.compile(
    r'<input\s+type="hidden"\s+name="([^"]+)"\s+value="([^"]*)"\s*/?>', re.IGNORECASE
)


def _hidden_inputs(page: str) -> dict[str, str]:
    """The hidden fields of an oidc-provider form (its xsrf value, the user code...)."""
    return {name: html.unescape(value) for name, value in _HIDDEN_INPUT.findall(page)}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def _b64_uint(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8 or 1, "big"))


def rsa_public_jwk(key: rsa.RSAPrivateKey | rsa.RSAPublicKey, kid: str) -> dict[str, str]:
    pub = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    numbers = pub.public_numbers()
    return {
        "kty": "RSA",
        "kid": kid,
        "alg": "RS256",
        "use": "sig",
        "n": _b64_uint(numbers.n),
        "e": _b64_uint(numbers.e),
    }


def rsa_private_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, str]:
    numbers = key.private_numbers()
    return {
        **rsa_public_jwk(key, kid),
        "d": _b64_uint(numbers.d),
        "p": _b64_uint(numbers.p),
        "q": _b64_uint(numbers.q),
        "dp": _b64_uint(numbers.dmp1),
        "dq": _b64_uint(numbers.dmq1),
        "qi": _b64_uint(numbers.iqmp),
    }


_SIGNING_JWKS: dict[str, Any] | None = None
_SIGNING_JWKS_LOCK = threading.Lock()


def signing_jwks() -> dict[str, Any]:
    """The server's private signing JWK set: generated once per Python process, so the keys
    (and the public ``/jwks``) stay the same across server restarts within a test session."""
    global _SIGNING_JWKS  # noqa: PLW0603 - one key set per test session, on purpose
    with _SIGNING_JWKS_LOCK:
        if _SIGNING_JWKS is None:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _SIGNING_JWKS = {
                "keys": [rsa_private_jwk(key, "tokenbroker-test-" + secrets.token_hex(4))]
            }
        return _SIGNING_JWKS


def public_jwks() -> dict[str, Any]:
    """The public half of :func:`signing_jwks` (what ``/jwks`` serves)."""
    return {
        "keys": [
            {k: v for k, v in jwk.items() if k in {"kty", "kid", "alg", "use", "n", "e"}}
            for jwk in signing_jwks()["keys"]
        ]
    }


def sign_rs256(
    claims: Mapping[str, Any],
    private_key: rsa.RSAPrivateKey | str | bytes,
    *,
    kid: str | None = None,
    header: Mapping[str, Any] | None = None,
) -> str:
    """A compact RS256 JWS (RFC 7515) over ``claims``; ``private_key`` may be a PEM string."""
    if isinstance(private_key, str | bytes):
        pem = private_key.encode() if isinstance(private_key, str) else private_key
        loaded = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(loaded, rsa.RSAPrivateKey):
            raise TypeError("an RSA private key is required for RS256")
        private_key = loaded
    hdr: dict[str, Any] = {"alg": "RS256", "typ": "JWT"}
    if kid is not None:
        hdr["kid"] = kid
    hdr.update(header or {})
    signing_input = (
        b64url(json.dumps(hdr, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(dict(claims), separators=(",", ":")).encode())
    )
    signature = private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a compact JWT, unverified (for assertions in tests)."""
    claims: dict[str, Any] = json.loads(b64url_decode(token.split(".")[1]))
    return claims


def make_service_account(
    client_email: str, *, token_uri: str = GOOGLE_TOKEN_URI
) -> tuple[dict[str, Any], dict[str, str]]:
    """A fresh Google-style service account key file (as a dict) and its public JWK.

    Register the JWK with the server (``OidcServer.start(service_accounts=...)`` or
    :meth:`OidcServer.add_service_account`) and point ``token_uri`` at ``server.token_url``.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_key_id = secrets.token_hex(20)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    project = client_email.split("@", 1)[-1].split(".", 1)[0] or "tokenbroker-test"
    key_json = {
        "type": "service_account",
        "project_id": project,
        "private_key_id": private_key_id,
        "private_key": pem,
        "client_email": client_email,
        "client_id": str(int.from_bytes(secrets.token_bytes(8), "big")),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/"
        + urllib.parse.quote(client_email),
        "universe_domain": "googleapis.com",
    }
    return key_json, rsa_public_jwk(key, private_key_id)


def make_jwt_bearer_assertion(
    key_json: Mapping[str, Any],
    *,
    scope: str = API_SCOPES,
    audience: str | None = None,
    iat: int | None = None,
    lifetime: int = 3600,
    extra_claims: Mapping[str, Any] | None = None,
) -> str:
    """An RFC 7523 assertion as Google's libraries build it for a service account key."""
    now = int(time.time()) if iat is None else iat
    claims: dict[str, Any] = {
        "iss": key_json["client_email"],
        "scope": scope,
        "aud": audience if audience is not None else key_json["token_uri"],
        "iat": now,
        "exp": now + lifetime,
    }
    claims.update(extra_claims or {})
    return sign_rs256(claims, key_json["private_key"], kid=key_json["private_key_id"])


def pkce_pair() -> tuple[str, str]:
    """An RFC 7636 (code_verifier, S256 code_challenge) pair."""
    verifier = b64url(secrets.token_bytes(32))
    challenge = b64url(hashlib.sha256(verifier.encode("ascii")).digest())
    return verifier, challenge


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "<no log>"


class OidcServerError(RuntimeError):
    """The server did not start, or a helper's OAuth exchange failed unexpectedly."""


# ---------------------------------------------------------------------------------------------
# The server process
# ---------------------------------------------------------------------------------------------


class OidcServer:
    """One ``node server.mjs`` process on 127.0.0.1 and helpers that talk to it."""

    RT_BASIC_ID = RT_BASIC_ID
    RT_BASIC_SECRET = RT_BASIC_SECRET
    RT_POST_ID = RT_POST_ID
    RT_POST_SECRET = RT_POST_SECRET
    CC_BASIC_ID = CC_BASIC_ID
    CC_BASIC_SECRET = CC_BASIC_SECRET
    CC_POST_ID = CC_POST_ID
    CC_POST_SECRET = CC_POST_SECRET
    JWT_BEARER_CLIENT_ID = JWT_BEARER_CLIENT_ID

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.issuer = ""
        self.workdir = Path()
        self.config_path = Path()
        self.ledger_path = Path()
        self.stdout_path = Path()
        self.stderr_path = Path()
        self.config: dict[str, Any] = {}
        self._logs: list[IO[bytes]] = []

    # -- endpoints ---------------------------------------------------------------------------

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    @property
    def authorization_url(self) -> str:
        return f"{self.issuer}/auth"

    @property
    def device_authorization_url(self) -> str:
        return f"{self.issuer}/device/auth"

    @property
    def revocation_url(self) -> str:
        return f"{self.issuer}/token/revocation"

    @property
    def introspection_url(self) -> str:
        return f"{self.issuer}/token/introspection"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/jwks"

    @property
    def userinfo_url(self) -> str:
        return f"{self.issuer}/me"

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(
        self,
        workdir: Path,
        *,
        access_token_ttl: int = 300,
        latency_ms: int = 0,
        service_accounts: Iterable[
            Mapping[str, Any] | tuple[Mapping[str, Any], Mapping[str, Any]]
        ] = (),
        clients: Sequence[Mapping[str, Any]] | None = None,
        port: int | None = None,
        ready_timeout: float = 30.0,
        interactive: bool = False,
    ) -> OidcServer:
        """Write the config into ``workdir`` and start the server; returns self when READY.

        ``service_accounts`` items are ``{"client_email", "public_jwk"}`` dicts or the
        ``(key_json, public_jwk)`` tuples :func:`make_service_account` returns.  ``clients``
        replaces :data:`DEFAULT_CLIENTS`.  ``interactive``: oidc-provider's own HTML login and
        consent pages, for a real browser (:meth:`follow_authorization` and
        :meth:`set_consent` are for the default, non-interactive mode).
        """
        reason = node_skip_reason()
        if reason is not None:
            raise OidcServerError(reason)
        ensure_node_modules()

        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.ledger_path = self.workdir / "oidc-token-ledger.txt"
        self.ledger_path.touch()
        self.config_path = self.workdir / "oidc-server-config.json"
        self.stdout_path = self.workdir / "oidc-server.stdout.log"
        self.stderr_path = self.workdir / "oidc-server.stderr.log"
        self.config = {
            "port": self.port,
            "issuer": self.issuer,
            "ledger": str(self.ledger_path),
            "accessTokenTtl": access_token_ttl,
            "latencyMs": latency_ms,
            "serviceAccounts": [_service_account_entry(sa) for sa in service_accounts],
            "jwks": signing_jwks(),
            "clients": [dict(c) for c in (DEFAULT_CLIENTS if clients is None else clients)],
            "jwtBearerClientId": JWT_BEARER_CLIENT_ID,
            "interactive": interactive,
        }
        self.config_path.write_text(json.dumps(self.config, indent=2))
        self._spawn(ready_timeout)
        return self

    def _spawn(self, ready_timeout: float) -> None:
        node = shutil.which("node")
        if node is None:
            raise OidcServerError(NODE_INSTALL_HINT)
        stdout = self.stdout_path.open("ab")
        stderr = self.stderr_path.open("ab")
        self._logs = [stdout, stderr]
        start_offset = self.stdout_path.stat().st_size
        self.proc = subprocess.Popen(
            [node, str(SERVER_SCRIPT), str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=str(SERVER_DIR),
        )
        ready_line = f"READY {self.issuer}"
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            with self.stdout_path.open("rb") as f:
                f.seek(start_offset)
                if ready_line in f.read().decode(errors="replace"):
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        code = self.proc.poll()
        self.stop()
        raise OidcServerError(
            f"OIDC test server did not become ready within {ready_timeout}s (exit code {code}).\n"
            f"--- stdout ({self.stdout_path}) ---\n{_tail(self.stdout_path)}\n"
            f"--- stderr ({self.stderr_path}) ---\n{_tail(self.stderr_path)}"
        )

    def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after 5 s)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for log in self._logs:
            log.close()
        self._logs = []

    def restart(self, ready_timeout: float = 30.0) -> None:
        """Stop and start again on the same port with the same config and signing keys.
        All tokens, grants and runtime-registered service accounts are lost (memory store)."""
        self.stop()
        self._spawn(ready_timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> OidcServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP helpers ------------------------------------------------------------------------

    def http(self, **kwargs: Any) -> httpx.Client:
        """A fresh httpx client with a sane timeout (close it, or use it as a context manager)."""
        kwargs.setdefault("timeout", 10.0)
        return httpx.Client(**kwargs)

    def client_auth_method(self, client_id: str) -> str:
        for client in self.config.get("clients", ()):
            if client["client_id"] == client_id:
                return str(client.get("token_endpoint_auth_method", "client_secret_basic"))
        return "client_secret_basic"

    def _auth(
        self, client_id: str, client_secret: str | None, auth_method: str | None
    ) -> tuple[dict[str, str], httpx.BasicAuth | None]:
        """Form fields and httpx auth for a client (RFC 6749 section 2.3.1)."""
        method = auth_method or self.client_auth_method(client_id)
        method = {"basic": "client_secret_basic", "post": "client_secret_post"}.get(method, method)
        if method == "client_secret_basic":
            # RFC 6749 section 2.3.1: form-urlencode id and secret before Basic encoding.
            user = urllib.parse.quote_plus(client_id)
            password = urllib.parse.quote_plus(client_secret or "")
            return {}, httpx.BasicAuth(user, password)
        if method == "client_secret_post":
            return {"client_id": client_id, "client_secret": client_secret or ""}, None
        return {"client_id": client_id}, None

    def token_request(
        self,
        data: Mapping[str, str],
        *,
        client_id: str | None = None,
        client_secret: str | None = None,
        auth_method: str | None = None,
        timeout: float = 10.0,
    ) -> httpx.Response:
        """POST /token with ``data`` plus client authentication; returns the raw response."""
        form = dict(data)
        auth = None
        if client_id is not None:
            fields, auth = self._auth(client_id, client_secret, auth_method)
            form.update(fields)
        with self.http(timeout=timeout) as http:
            return http.post(self.token_url, data=form, auth=auth or httpx.USE_CLIENT_DEFAULT)

    def refresh(
        self,
        refresh_token: str,
        client_id: str = RT_BASIC_ID,
        client_secret: str = RT_BASIC_SECRET,
        *,
        auth_method: str | None = None,
        scope: str | None = None,
    ) -> httpx.Response:
        """A refresh_token grant (RFC 6749 section 6)."""
        data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if scope is not None:
            data["scope"] = scope
        return self.token_request(
            data, client_id=client_id, client_secret=client_secret, auth_method=auth_method
        )

    def client_credentials(
        self,
        client_id: str = CC_BASIC_ID,
        client_secret: str = CC_BASIC_SECRET,
        *,
        scope: str | None = "api:read",
        auth_method: str | None = None,
    ) -> httpx.Response:
        """A client_credentials grant (RFC 6749 section 4.4)."""
        data = {"grant_type": "client_credentials"}
        if scope is not None:
            data["scope"] = scope
        return self.token_request(
            data, client_id=client_id, client_secret=client_secret, auth_method=auth_method
        )

    def jwt_bearer(self, assertion: str) -> httpx.Response:
        """A JWT bearer grant as Google takes it: no client authentication (RFC 7523 2.1)."""
        return self.token_request({"grant_type": JWT_BEARER_GRANT, "assertion": assertion})

    def obtain_refresh_token(
        self,
        client_id: str = RT_BASIC_ID,
        client_secret: str = RT_BASIC_SECRET,
        scope: str = "openid offline_access api:read",
        auth_method: str | None = None,
    ) -> dict[str, Any]:
        """Run the authorization code flow with PKCE S256 non-interactively and return the
        token response (``access_token``, ``refresh_token``, ``id_token``, ``expires_in``...).

        ``auth_method``: "basic"/"post" (or the full RFC 7591 names); default: the client's
        registered method.
        """
        verifier, challenge = pkce_pair()
        state = secrets.token_urlsafe(16)
        query = {
            "client_id": client_id,
            "response_type": "code",
            "redirect_uri": REDIRECT_URI,
            "scope": scope,
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        if "offline_access" in scope.split():
            # OpenID Connect Core section 11: offline_access is ignored without prompt=consent.
            query["prompt"] = "consent"
        url = f"{self.authorization_url}?{urllib.parse.urlencode(query)}"
        code = None
        with self.http(follow_redirects=False) as browser:
            for _ in range(12):
                resp = browser.get(url)
                if resp.status_code not in (302, 303):
                    raise OidcServerError(
                        f"authorization flow stopped at {url}: HTTP {resp.status_code} "
                        f"{resp.text[:500]}"
                    )
                url = urllib.parse.urljoin(url, resp.headers["location"])
                if url.startswith(REDIRECT_URI):
                    params = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
                    if "error" in params:
                        raise OidcServerError(f"authorization error: {params}")
                    if params.get("state") != [state]:
                        raise OidcServerError("state mismatch in the authorization response")
                    code = params["code"][0]
                    break
            else:
                raise OidcServerError("too many redirects in the authorization flow")
        resp = self.token_request(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT_URI,
                "code_verifier": verifier,
            },
            client_id=client_id,
            client_secret=client_secret,
            auth_method=auth_method,
        )
        if resp.status_code != 200:
            raise OidcServerError(f"code exchange failed: HTTP {resp.status_code} {resp.text}")
        body: dict[str, Any] = resp.json()
        return body

    def follow_authorization(self, url: str, *, max_redirects: int = 12) -> str:
        """Follow an authorization request through login and consent as a user's browser
        would (cookies kept, redirects followed), and return the URL the provider finally
        redirects to outside itself: the client's callback, with ``code`` or ``error``.
        The callback itself is not requested."""
        with self.http(follow_redirects=False) as browser:
            for _ in range(max_redirects):
                resp = browser.get(url)
                if resp.status_code not in (302, 303):
                    raise OidcServerError(
                        f"authorization flow stopped: HTTP {resp.status_code} {resp.text[:300]}"
                    )
                url = urllib.parse.urljoin(url, resp.headers["location"])
                if not url.startswith(self.issuer + "/"):
                    return url
        raise OidcServerError("too many redirects in the authorization flow")

    def answer_device(self, user_code: str, *, deny: bool = False) -> httpx.Response:
        """The account holder's side of the device flow (RFC 8628 §3.3) through
        oidc-provider's own pages, as a browser would submit them: the verification URI with
        the user code, its confirmation form (Continue, or ``deny``: Abort), then login and
        consent. Returns the last page (oidc-provider's "Sign-in Success" when granted)."""
        verification = f"{self.issuer}/device"
        with self.http(follow_redirects=False) as browser:
            page = browser.get(verification, params={"user_code": user_code})
            # A form_post page that submits itself: the xsrf value and the user code.
            page = browser.post(verification, data=_hidden_inputs(page.text))
            if page.status_code != 200 or "op.deviceConfirmForm" not in page.text:
                raise OidcServerError(
                    f"no device confirmation page: HTTP {page.status_code} {page.text[:300]}"
                )
            fields = _hidden_inputs(page.text)
            if deny:
                fields.pop("confirm", None)
                fields["abort"] = "yes"
            page = browser.post(verification, data=fields)
            for _ in range(12):
                if page.status_code not in (302, 303):
                    return page
                page = browser.get(urllib.parse.urljoin(str(page.url), page.headers["location"]))
        raise OidcServerError("too many redirects in the device flow")

    def set_device(self, *, interval: int | None = None, ttl: int | None = None) -> None:
        """The device flow's figures for the next authorizations (``interval``: seconds the
        answer states, ``ttl``: the device code's lifetime)."""
        body: dict[str, Any] = {}
        if interval is not None:
            body["interval"] = interval
        if ttl is not None:
            body["ttl"] = ttl
        self._control("POST", "/test/device", body)

    def set_consent(self, *, deny: bool) -> None:
        """Make the test user deny (or grant again) every consent."""
        self._control("POST", "/test/consent", {"deny": deny})

    def revoke(
        self,
        token: str,
        client_id: str = RT_BASIC_ID,
        client_secret: str = RT_BASIC_SECRET,
        *,
        token_type_hint: str | None = None,
        auth_method: str | None = None,
    ) -> httpx.Response:
        """RFC 7009 revocation.  Revoking a refresh token revokes its whole grant."""
        data = {"token": token}
        if token_type_hint:
            data["token_type_hint"] = token_type_hint
        fields, auth = self._auth(client_id, client_secret, auth_method)
        data.update(fields)
        with self.http() as http:
            resp = http.post(self.revocation_url, data=data, auth=auth or httpx.USE_CLIENT_DEFAULT)
        if resp.status_code != 200:
            raise OidcServerError(f"revocation failed: HTTP {resp.status_code} {resp.text}")
        return resp

    def introspect(
        self,
        token: str,
        client_id: str = RT_BASIC_ID,
        client_secret: str = RT_BASIC_SECRET,
        *,
        auth_method: str | None = None,
    ) -> dict[str, Any]:
        """RFC 7662 introspection (``{"active": false}`` for dead or foreign tokens)."""
        data = {"token": token}
        fields, auth = self._auth(client_id, client_secret, auth_method)
        data.update(fields)
        with self.http() as http:
            resp = http.post(
                self.introspection_url, data=data, auth=auth or httpx.USE_CLIENT_DEFAULT
            )
        resp.raise_for_status()
        body: dict[str, Any] = resp.json()
        return body

    # -- test control ------------------------------------------------------------------------

    def _control(self, method: str, path: str, payload: Any = None) -> dict[str, Any]:
        with self.http() as http:
            resp = http.request(method, f"{self.issuer}{path}", json=payload)
        resp.raise_for_status()
        body: dict[str, Any] = resp.json()
        return body

    def set_faults(self, faults: Sequence[Mapping[str, Any]]) -> None:
        """Queue faults; each later POST /token consumes one before oidc-provider sees it.

        Kinds: ``{"kind": "status", "status": 503, "retry_after": "2", "body": {...}}``,
        ``{"kind": "hang", "seconds": N, "close": False}`` (then 504, or drop the connection),
        ``{"kind": "error_200", "body": {"error": "invalid_code"}}``,
        ``{"kind": "malformed_200", "variant": "html" | "json"}``,
        ``{"kind": "pass"}`` (no fault; aims later faults at later requests),
        ``{"kind": "lost_response", "status": 502 | None}`` (the provider DOES process the
        request, e.g. rotates the refresh token, but the client gets a 502 or a dropped
        connection instead of the tokens).
        """
        self._control("POST", "/test/faults", {"faults": [dict(f) for f in faults]})

    def clear_faults(self) -> None:
        self._control("DELETE", "/test/faults")

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset: ``token_requests``, ``token_requests_by_grant_type``,
        ``responses_by_status`` (str status or "dropped"), ``invalid_grant``,
        ``refresh_token_reuse`` (invalid_grant answers to a consumed refresh token, each of which
        revoked a grant), ``faults_served``, ``in_flight``, ``max_in_flight``,
        ``faults_queued``, ``latency_ms``."""
        return self._control("GET", "/test/stats")

    def reset_stats(self) -> None:
        self._control("POST", "/test/stats/reset")

    def set_latency(self, ms: int) -> None:
        """Change the delay added to every POST /token (config ``latencyMs``) at runtime."""
        self._control("POST", "/test/latency", {"ms": ms})

    def add_service_account(self, client_email: str) -> dict[str, Any]:
        """Create a service account, trust it on the running server, and return its Google-style
        key JSON with ``token_uri`` pointing here.  Lost on :meth:`restart`."""
        key_json, public_jwk = make_service_account(client_email, token_uri=self.token_url)
        self._control(
            "POST",
            "/test/service-accounts",
            {"client_email": client_email, "public_jwk": public_jwk},
        )
        return key_json

    def mint_refresh_tokens(
        self,
        count: int,
        client_id: str = RT_BASIC_ID,
        *,
        scope: str = "openid offline_access api:read",
    ) -> list[str]:
        """``count`` fresh grants for the test account, each with its rotating refresh token:
        what :meth:`obtain_refresh_token` ends in, without its six HTTP round trips (~350 ms per
        consent here), for suites that register hundreds of connections."""
        tokens: list[str] = []
        while len(tokens) < count:
            chunk = min(count - len(tokens), 1000)
            body = self._control(
                "POST", "/test/grants", {"client_id": client_id, "count": chunk, "scope": scope}
            )
            tokens.extend(str(t) for t in body["refresh_tokens"])
        return tokens

    def refresh_token_status(self, refresh_tokens: Sequence[str]) -> list[dict[str, Any]]:
        """Would the provider accept each refresh token now? One dict per token: ``found``,
        ``consumed``, ``expired``, ``grant`` (not revoked) and ``active`` (all of these: what
        the refresh_token grant checks), plus ``rotations``. Consumes nothing; unlike RFC 7662
        introspection it tells a consumed token (a newer one was issued) from a revoked grant.
        """
        statuses: list[dict[str, Any]] = []
        for start in range(0, len(refresh_tokens), 500):
            chunk = list(refresh_tokens[start : start + 500])
            body = self._control("POST", "/test/refresh-tokens", {"refresh_tokens": chunk})
            statuses.extend(body["tokens"])
        return statuses

    def ledger_tokens(self) -> set[str]:
        """Every token value (access, refresh, ID) the server's /token endpoint has returned."""
        try:
            lines = self.ledger_path.read_text().splitlines()
        except FileNotFoundError:
            return set()
        return {line.strip() for line in lines if line.strip()}


def _service_account_entry(
    sa: Mapping[str, Any] | tuple[Mapping[str, Any], Mapping[str, Any]],
) -> dict[str, Any]:
    if isinstance(sa, tuple):
        key_json, public_jwk = sa
        return {"client_email": key_json["client_email"], "public_jwk": dict(public_jwk)}
    return {"client_email": sa["client_email"], "public_jwk": dict(sa["public_jwk"])}


def start_oidc_server(tmp_path_factory: Any, **start_kwargs: Any) -> OidcServer:
    """Fixture factory: start a server in a fresh ``tmp_path_factory`` dir.

    Skips the calling test (``pytest.skip``) when node/npm are missing.  The caller stops it::

        @pytest.fixture(scope="session")
        def oidc_server(tmp_path_factory):
            server = start_oidc_server(tmp_path_factory)
            yield server
            server.stop()
    """
    reason = node_skip_reason()
    if reason is not None:
        import pytest

        pytest.skip(reason)
    workdir = Path(tmp_path_factory.mktemp("oidc-server"))
    return OidcServer().start(workdir, **start_kwargs)


__all__ = [
    "API_RESOURCE",
    "API_SCOPES",
    "CC_BASIC_ID",
    "CC_BASIC_SECRET",
    "CC_POST_ID",
    "CC_POST_SECRET",
    "CONNECT_ID",
    "CONNECT_REDIRECT_URI",
    "CONNECT_SECRET",
    "DEFAULT_CLIENTS",
    "JWT_BEARER_CLIENT_ID",
    "JWT_BEARER_GRANT",
    "NODE_INSTALL_HINT",
    "REDIRECT_URI",
    "RT_BASIC_ID",
    "RT_BASIC_SECRET",
    "RT_POST_ID",
    "RT_POST_SECRET",
    "TEST_ACCOUNT",
    "OidcServer",
    "OidcServerError",
    "b64url",
    "ensure_node_modules",
    "free_port",
    "jwt_claims",
    "make_jwt_bearer_assertion",
    "make_service_account",
    "node_available",
    "node_skip_reason",
    "pkce_pair",
    "public_jwks",
    "rsa_private_jwk",
    "rsa_public_jwk",
    "sign_rs256",
    "signing_jwks",
    "start_oidc_server",
]
