"""The one mapping from :class:`TokenBrokerError` to what the outside sees: an HTTP answer
(every HTTP entry point: the issuer, the refresher function, ``serve``) or an exit code (the CLI).

HTTP, in this order:

* a retryable error is ``503`` with ``Retry-After`` (the seconds the error carries, else 5):
  whoever called can try again and should wait first;
* otherwise the error's own ``http_status`` (400-599; anything else is a bug and becomes 500);
* the body is OAuth-style (RFC 6749 §5.2): ``{"error": code, "error_description": message}``;
* ``405`` carries ``Allow`` (RFC 9110 §15.5.6);
* ``401`` carries ``WWW-Authenticate: Bearer ... error="invalid_token"`` (RFC 6750 §3.1);
* on a **public** surface (the issuer, whose callers are workers) a 5xx other than 503 says only
  ``server_error``/``internal error``: configuration paths and backend details stay in the log.
  Operator surfaces (the refresher function behind Cloud Scheduler's service account, the local
  ``serve``) keep the message, which names the field or variable to fix. Messages never carry
  credential material on any surface (they are built from codes, ids and counts).

Exit codes: ``2`` for bad usage or configuration (the message names the field), ``1`` for every
other failure, ``0`` for success.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tokenbroker.kernel.errors import BadRequest, ConfigError, MethodNotAllowed, TokenBrokerError

EXIT_FAILURE = 1
EXIT_USAGE = 2
DEFAULT_RETRY_AFTER_SECONDS = 5


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    body: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> str:
        return json.dumps(self.body, separators=(",", ":"))


def http_answer(error: TokenBrokerError, *, public: bool) -> HttpAnswer:
    """How ``error`` is answered over HTTP (see the module docstring for the rules)."""
    if error.retryable:
        status = 503
    elif 400 <= error.http_status < 600:
        status = error.http_status
    else:
        status = 500
    body = {"error": error.code, "error_description": error.message}
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        description = error.message.replace('"', "'")
        headers["WWW-Authenticate"] = (
            f'Bearer realm="tokenbroker", error="invalid_token", error_description="{description}"'
        )
    if isinstance(error, MethodNotAllowed):
        headers["Allow"] = ", ".join(error.allowed)
    if status == 503:
        seconds = (
            error.retry_after if error.retry_after is not None else DEFAULT_RETRY_AFTER_SECONDS
        )
        headers["Retry-After"] = str(max(1, min(int(seconds), 3600)))
    elif status >= 500 and public:
        body = {"error": "server_error", "error_description": "internal error"}
    return HttpAnswer(status, body, headers)


def bug_answer() -> HttpAnswer:
    """The answer to an exception that is not a :class:`TokenBrokerError`: a bug, logged with its
    traceback by the caller, never shown."""
    return HttpAnswer(
        500,
        {"error": "server_error", "error_description": "internal error"},
        {"Cache-Control": "no-store"},
    )


def exit_code(error: TokenBrokerError) -> int:
    """The CLI's exit status for ``error``."""
    return EXIT_USAGE if isinstance(error, ConfigError | BadRequest) else EXIT_FAILURE
