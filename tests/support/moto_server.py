"""moto's AWS server, started once per test process on a free port of 127.0.0.1.

``moto_endpoint()`` starts it on first use (an atexit hook stops it) and returns its URL;
``moto_client()`` is a boto3 Secrets Manager client on it with moto's dummy credentials.
Other processes (a ``functions-framework`` under test) reach the same server by that URL.

moto 5.2 stands in for AWS Secrets Manager. Where it departs from the documented API in a
way the AWS adapter's compare-and-set relies on, this module makes it follow the
documentation, and says so here (``tests/system/test_aws_secrets.py`` checks each point):

1. **Requests run one at a time.** moto's backends take no locks, and the server answers on
   many threads in this process, so two ``PutSecretValue`` calls could interleave between
   "does this version exist?" and "add it". AWS applies each request atomically; a lock
   around the WSGI app gives the same.
2. **A ``ClientRequestToken`` that names a version which already holds a value never
   overwrites it.** moto skips the comparison when that version carries ``AWSPENDING``
   (meant for its own ``RotateSecret``, which first creates an *empty* pending version) and
   replaces the value. AWS: "If a version with this value already exists and the version of
   the SecretString and SecretBinary values are different from those in the request, then
   the request fails" and with the same data "the operation succeeds but does nothing"
   (https://docs.aws.amazon.com/secretsmanager/latest/apireference/API_PutSecretValue.html).
   Only an empty version may still be filled in, as on AWS.
3. **``ListSecretVersionIds`` on an unknown secret is ``ResourceNotFoundException``**, not
   an HTTP 500 from an unhandled ``KeyError``.

Other moto quirks the adapter simply avoids (no patch): a plain ``GetSecretValue`` (and
``BatchGetSecretValue``) keeps returning the version that was current before
``UpdateSecretVersionStage`` moved ``AWSCURRENT``, so every read names a stage or a version
id; ``ListSecretVersionIds`` ignores ``IncludeDeprecated`` and never deletes deprecated
versions, so readability is decided from the staging labels; ``RotateSecret`` tries to run a
Lambda in Docker, so the adapter drives the rotation steps itself.
"""

from __future__ import annotations

import atexit
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

REGION = "us-east-1"
#: moto accepts any key; these are the values its documentation uses.
DUMMY_CREDENTIALS = {
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
    "aws_session_token": "testing",
}

_lock = threading.Lock()
_server: Any = None
_endpoint: str | None = None
_session: Any = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serialised(app: Callable[..., Iterable[bytes]]) -> Callable[..., list[bytes]]:
    """The WSGI app, one request at a time (point 1 above)."""
    gate = threading.Lock()

    def handle(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        with gate:
            return list(app(environ, start_response))

    return handle


def _follow_documented_secrets_manager() -> None:
    """Points 2 and 3 above, applied to moto's Secrets Manager backend in this process."""
    from moto.secretsmanager import models
    from moto.secretsmanager.exceptions import (
        ResourceExistsException,
        SecretNotFoundException,
    )

    backend = models.SecretsManagerBackend
    if getattr(backend, "_tokenbroker_documented", False):
        return
    original_check = backend._check_with_existing_secrets_and_versions
    original_list = backend.list_secret_version_ids

    def check(  # noqa: PLR0917 - moto's own signature
        self: Any,
        secret_name: str,
        client_request_token: str | None,
        secret_string: str | None,
        secret_binary: str | None,
        on_create: bool = False,
    ) -> Any:
        existing = self.secrets.get(secret_name) if client_request_token else None
        version = existing.versions.get(client_request_token) if existing else None
        if version and ("secret_string" in version or "secret_binary" in version):
            same = (version.get("secret_string"), version.get("secret_binary")) == (
                secret_string,
                secret_binary,
            )
            if not same:
                raise ResourceExistsException(
                    f"You can't use ClientRequestToken {client_request_token} because that "
                    f"value is already in use for a version of secret {existing.arn}."
                )
            return existing  # same data: "the operation succeeds but does nothing"
        return original_check(
            self, secret_name, client_request_token, secret_string, secret_binary, on_create
        )

    def list_versions(self: Any, secret_id: str) -> Any:
        if secret_id not in self.secrets:
            raise SecretNotFoundException()
        return original_list(self, secret_id)

    backend._check_with_existing_secrets_and_versions = check
    backend.list_secret_version_ids = list_versions
    backend._tokenbroker_documented = True


def _start() -> tuple[Any, str]:
    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from moto.server import ThreadedMotoServer

    class QuietHandler(MotoRequestHandler):
        def log_request(self, *args: Any, **kwargs: Any) -> None:
            """No access-log line per request (thousands per test run)."""

    class SerialisedMotoServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            from moto.moto_server.werkzeug_app import (
                DomainDispatcherApplication,
                create_backend_app,
            )
            from werkzeug.serving import make_server

            app = _serialised(DomainDispatcherApplication(create_backend_app))
            self._server = make_server(
                self._ip_address, self._port, app, True, request_handler=QuietHandler
            )
            self._server_ready_event.set()
            self._server.serve_forever()

    _follow_documented_secrets_manager()
    port = _free_port()
    server = SerialisedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def moto_endpoint() -> str:
    """The URL of this process's moto server, started on first use."""
    global _server, _endpoint
    with _lock:
        if _endpoint is None:
            _server, _endpoint = _start()
            atexit.register(_server.stop)
        return _endpoint


def moto_client(service: str = "secretsmanager") -> Any:
    """A new boto3 client on the moto server (its own connection pool: another "process").

    Clients come from one shared session so each does not re-read the service model.
    """
    global _session  # noqa: PLW0603 - one session per process
    endpoint = moto_endpoint()
    import boto3

    with _lock:
        if _session is None:
            _session = boto3.session.Session(region_name=REGION, **DUMMY_CREDENTIALS)
        return _session.client(service, endpoint_url=endpoint)


def delete_secrets_with_prefix(prefix: str) -> int:
    """Force-delete every secret whose name starts with ``prefix`` (test clean-up, so the
    shared server stays small: moto looks secrets up by scanning all of them)."""
    client = moto_client()
    names: list[str] = []
    for page in client.get_paginator("list_secrets").paginate(
        Filters=[{"Key": "name", "Values": [prefix]}]
    ):
        names += [s["Name"] for s in page["SecretList"] if s["Name"].startswith(prefix)]
    for name in names:
        client.delete_secret(SecretId=name, ForceDeleteWithoutRecovery=True)
    return len(names)
