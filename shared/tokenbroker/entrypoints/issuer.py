"""The issuer function's HTTP layer (ASGI, Starlette requests): routes, body limits, and the
one place errors become HTTP answers. Everything else lives in the issue wing:
:mod:`tokenbroker.issue.issuer` (tokens) and :mod:`tokenbroker.issue.relay` (the relay), which
take and return plain values.

Served by ``functions-framework --asgi`` (uvicorn): measured ~4x the default gthread mode for
this workload on one core, and the issuer's hot path is async end to end.

Routes: ``POST /token``, ``GET /healthz`` (ready: the instance is built and can serve),
``GET /livez`` (the process answers), ``/relay/{connection}/{path}``. Anything else: 404.

The instance is built once (:func:`build`): on the first request that needs it, or, in a
worker process functions-framework's gunicorn forked, by a warm-up thread started as the
worker starts (:func:`warm_up_in_workers`, :func:`start_warmup`) -- the settings, policy,
stores and verifier, then the stores' client libraries (Firestore, Secret Manager: the bulk
of a cold start) -- so that an instance started before its first request has them ready. The
first request waits for the warm-up's result (never a second build); a warm-up that failed
answers that request exactly as a build on the request would have, and is not kept.

The caller's credential is the one header the verifier's identity mode names
(``CallerVerifier.select_authorization``): behind Cloud Run IAM (``platform``) the header the
front end verified, else ``Authorization`` (docs/issuer.md, *Caller identity*).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import inspect
import json
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any

from tokenbroker.entrypoints.answers import bug_answer, http_answer
from tokenbroker.issue.issuer import MAX_BODY_BYTES, TokenIssuer
from tokenbroker.kernel import trace
from tokenbroker.kernel.errors import BadRequest, MethodNotAllowed, NotFound, TokenBrokerError
from tokenbroker.kernel.log import get_logger

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from tokenbroker.entrypoints.compose import IssuerService
    from tokenbroker.issue.relay import Relay


_service: IssuerService | None = None
_lock = asyncio.Lock()
#: Why the instance could not be built, and until when (loop time) that answer stands: a
#: passing failure (a store or key server down at start) for :data:`RETRY_BUILD_SECONDS`; a
#: misconfiguration is tried again with the next request (and logged again only if the
#: reason changed).
_unready: tuple[TokenBrokerError, float] | None = None
RETRY_BUILD_SECONDS = 5.0
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
#: The longest a request body may take to arrive, once its headers have.
BODY_READ_SECONDS = 10.0


async def build() -> tuple[TokenIssuer, Relay]:
    """The instance's issuer and relay, built on the first request (cold start), or taken from
    the warm-up (:func:`start_warmup`), and reused. A build that fails is logged once, with
    what to fix, and its error answers every request until it may be tried again
    (:data:`_unready`); ``/healthz`` then says so."""
    global _service, _unready  # noqa: PLW0603 - one per function instance, by design
    service = _service
    if service is None:
        async with _lock:
            service = _service  # built by whoever held the lock before us?
            if service is None:
                loop = asyncio.get_running_loop()
                if _unready is not None and loop.time() < _unready[1]:
                    raise _unready[0]
                try:
                    service = await _assembled()
                except TokenBrokerError as error:
                    # A passing failure (a store, the key server) is tried again after a
                    # wait; a misconfiguration at once (it fails fast, and a fixed
                    # environment takes effect without a restart).
                    wait = RETRY_BUILD_SECONDS if error.retryable else 0.0
                    if _unready is None or _unready[0].message != error.message:
                        get_logger(component="issuer").error(
                            "issuer not ready: cannot start", error_code=error.code,
                            error=error.message, retryable=error.retryable,
                        )  # fmt: skip
                    _unready = (error, loop.time() + wait)
                    raise
                _service, _unready = service, None
                service.start_metrics()
    return service.issuer, service.relay


async def _assembled() -> IssuerService:
    """The warm-up's service, or its error, when a warm-up was started (awaited without
    holding the event loop; a request cancelled meanwhile leaves it to the next one), else
    one assembled now, in a worker thread. Called under :data:`_lock`."""
    global _warmup  # noqa: PLW0603 - the instance's one warm-up
    warmup = _warmup
    if warmup is None:
        return await asyncio.to_thread(_assemble)
    warmup.wanted.set()  # a request waits: no more waiting for the worker to go idle
    try:
        return await asyncio.wrap_future(warmup.outcome)
    finally:
        if warmup.outcome.done():  # taken, success or failure: a failed one is never reused
            with _warmup_lock:
                if _warmup is warmup:
                    _warmup = None


class _Warmup:
    """One warm-up (:func:`start_warmup`): its outcome, and whether a request waits for it."""

    def __init__(self) -> None:
        self.outcome: concurrent.futures.Future[IssuerService] = concurrent.futures.Future()
        # Running: it cannot be cancelled, so a waiter's cancellation leaves the outcome to
        # the next request.
        self.outcome.set_running_or_notify_cancel()
        self.wanted = threading.Event()

    def run(self, idle_first: float) -> None:
        try:
            _until_idle(idle_first, self.wanted)
            service = _assemble()
        except BaseException as error:  # handed to the first request, which answers it
            self.outcome.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        self.outcome.set_result(service)


#: The pending warm-up, until a request takes its outcome (:func:`build`).
_warmup: _Warmup | None = None
_warmup_lock = threading.Lock()
_fork_hook = False
#: The longest a worker's warm-up waits for the worker's own start to be over.
WORKER_START_SECONDS = 0.5
#: Quick wakes in a row that tell :func:`_until_idle` the other threads are waiting.
IDLE_WAKES = 10


def start_warmup(*, idle_first: float = 0.0) -> bool:
    """Build the instance now, in a daemon thread, before any request: :func:`_assemble`
    (settings, policy, stores, verifier -- in ``verify`` mode the key fetch -- and the stores'
    client libraries). The first request waits for the result instead of building. Never
    raises and never logs an error itself: a failure is kept, unlogged, for :func:`build`,
    which logs and answers it as a failure on the request would have been. ``idle_first``:
    at most this many seconds spent waiting for the process to go idle first
    (:func:`_until_idle`), cut short by a request that needs the instance. ``False``
    (nothing started) when the instance is built or being built."""
    global _warmup  # noqa: PLW0603 - the instance's one warm-up
    with _warmup_lock:
        if _warmup is not None or _service is not None or _lock.locked():
            return False
        warmup = _warmup = _Warmup()
    threading.Thread(
        target=warmup.run, args=(idle_first,), name="issuer-warmup", daemon=True
    ).start()
    return True


def _until_idle(limit: float, wanted: threading.Event) -> None:
    """Wait, at most ``limit`` seconds and only until ``wanted`` is set, for the other threads
    of this process to stop running Python: until a 1 ms wait ends within 3 ms
    :data:`IDLE_WAKES` times in a row. A thread that holds the interpreter lock lets go of it
    only every switch interval (5 ms), so quick wakes mean that the others are waiting -- the
    worker's event loop runs and has nothing to do. Building before that would halve the speed
    of the worker's own start (the lock is shared) and hold back its first answers, ``/livez``
    among them; measured in docs/benchmarks.md (cold start)."""
    deadline = time.monotonic() + limit
    quick = 0
    while quick < IDLE_WAKES and time.monotonic() < deadline:
        started = time.perf_counter()
        if wanted.wait(0.001):
            return
        quick = quick + 1 if time.perf_counter() - started < 0.003 else 0


def _warm_clients(service: IssuerService) -> None:
    """Import and build the stores' clients with the instance, which the first request that
    reads a store would otherwise do (Firestore's and Secret Manager's libraries: most of a
    cold start's build). Best effort: a client that cannot be built now (no credentials, say)
    is built again, and raises its own error, on the request that needs it -- as without
    this; nothing is logged here. IAM Credentials' client is for impersonation alone and
    stays lazy."""
    for store in (service.runtime.state, service.runtime.secrets):
        try:
            getattr(store, "client", None)
        except Exception:  # noqa: BLE001, S112 - the request that needs the client reports it
            continue


def warm_up_in_workers() -> None:
    """Start a warm-up (:func:`start_warmup`) in every worker process gunicorn forks from this
    one -- the functions-framework server: its arbiter imports ``main.py``, then forks the
    worker that serves -- once the worker's own start is over. Not in the arbiter itself (it
    serves nothing, and a thread importing there at the fork would leave the worker a
    half-imported module), nor in a process that serves in process (tests, ``--debug``):
    those build on the first request. Idempotent."""
    global _fork_hook  # noqa: PLW0603 - registered once per process
    if not _fork_hook:
        _fork_hook = True
        os.register_at_fork(after_in_child=_after_fork_in_child)


def _after_fork_in_child() -> None:
    global _warmup, _warmup_lock  # the parent's are not the child's
    _warmup, _warmup_lock = None, threading.Lock()
    if _forked_by_the_arbiter(inspect.currentframe()):
        _collector_paused.freeze = True
        start_warmup(idle_first=WORKER_START_SECONDS)


def _forked_by_the_arbiter(hook: FrameType | None) -> bool:
    """Whether the fork whose child runs ``hook`` (the at-fork hook's frame) was gunicorn's
    arbiter spawning a worker: the frame that called ``os.fork``. Any other fork -- a test's,
    a library's -- starts nothing."""
    caller = hook.f_back if hook is not None else None
    return (
        caller is not None
        and caller.f_code.co_name == "spawn_worker"
        and caller.f_globals.get("__name__") == "gunicorn.arbiter"
    )


def _assemble() -> IssuerService:
    """The instance: settings, policy, stores, verifier (:func:`~tokenbroker.entrypoints.
    compose.build_issuer`), then the stores' client libraries (:func:`_warm_clients`), with
    the cyclic garbage collector paused (:data:`_collector_paused`)."""
    from tokenbroker.entrypoints.compose import build_issuer, start_logging  # noqa: PLC0415

    with _collector_paused():
        start_logging()
        service = build_issuer()
        _warm_clients(service)
    return service


class _CollectorPause:
    """The cyclic garbage collector off while the instance is built, and back on (if it was)
    afterwards. Importing the client libraries allocates a hundred thousand objects, nearly
    all kept (modules, classes, descriptors), and the collections they trigger scan them
    again and again: ~35 ms of a ~210 ms build measured here (docs/benchmarks.md, cold start).
    Reference counting frees the rest as usual. With :attr:`freeze` (a server's worker
    process, whose heap is the instance's for its whole life), what the build left is moved out
    of the collector's sight (``gc.freeze``) before it is back on: else its first collection
    (~20 ms, on the first request) scans it all once more; only the few cyclic garbage objects
    made during the build (~60) then stay. Process-wide, like the collector: nested or
    concurrent pauses end with the last."""

    def __init__(self) -> None:
        self.freeze = False
        self._lock = threading.Lock()
        self._depth = 0
        self._was_on = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._was_on = gc.isenabled()
                gc.disable()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    if self.freeze:
                        gc.freeze()
                    if self._was_on:
                        gc.enable()


_collector_paused = _CollectorPause()


async def shutdown() -> None:
    """Close what the instance opened (HTTP sessions, the stores) and forget it: the next
    request builds afresh. A server's shutdown hook; also what tests call between event loops,
    since an HTTP session belongs to the loop that opened it. A pending warm-up is waited for
    and what it built closed too."""
    global _service, _unready, _warmup
    async with _lock:
        service, _service, _unready = _service, None, None
        with _warmup_lock:
            warmup, _warmup = _warmup, None
    if warmup is not None:
        warmup.wanted.set()
        await asyncio.wait([asyncio.wrap_future(warmup.outcome)])
        if warmup.outcome.exception() is None:
            await warmup.outcome.result().aclose()
    if service is not None:
        await service.aclose()


def _json(
    body: Mapping[str, object], status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    from starlette.responses import Response  # noqa: PLC0415

    return Response(
        json.dumps(body, separators=(",", ":")),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def error_response(error: TokenBrokerError) -> Response:
    answer = http_answer(error, public=True)
    return _json(answer.body, answer.status, answer.headers)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case) in an ASGI header list."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused past ``limit`` bytes or when it has not all arrived within
    :data:`BODY_READ_SECONDS` (a client trickling a body holds an instance's request slot).
    Read from the ASGI channel directly: a token request arrives in one message, and
    Starlette's stream wrapper costs more than the rest of the cached path."""
    declared = _header(request.scope["headers"], b"content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BadRequest(f"request body larger than {limit} bytes")
    return await _readers().read(request, limit)


class _BodyReaders:
    """The requests of one event loop that are reading their bodies, and one watcher task
    that cancels those past :data:`BODY_READ_SECONDS` (a quarter-second sweep). Per request
    a dict entry, not a timer handle: ``asyncio.timeout`` cost the hot path more than the
    rest of reading the body."""

    def __init__(self) -> None:
        self.deadlines: dict[asyncio.Task[Any], float] = {}
        self.expired: set[asyncio.Task[Any]] = set()
        self.watcher: asyncio.Task[None] | None = None

    async def read(self, request: Request, limit: int) -> bytes:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - ASGI apps always run in a task
            return await _receive_body(request, limit)
        loop = asyncio.get_running_loop()
        self.deadlines[task] = loop.time() + BODY_READ_SECONDS
        if self.watcher is None or self.watcher.done():
            self.watcher = loop.create_task(self._watch(loop))
        try:
            return await _receive_body(request, limit)
        except asyncio.CancelledError:
            if task not in self.expired:
                raise
            self.expired.discard(task)
            task.uncancel()
            raise BadRequest(f"request body not received within {BODY_READ_SECONDS:g} s") from None
        finally:
            self.deadlines.pop(task, None)

    async def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        idle = 0.0
        while idle < 60:  # stops after a minute with nothing to watch; the next read restarts it
            step = min(0.25, BODY_READ_SECONDS / 2)
            await asyncio.sleep(step)
            if not self.deadlines:
                idle += step
                continue
            idle = 0.0
            now = loop.time()
            for task, deadline in list(self.deadlines.items()):
                if deadline <= now and task not in self.expired:
                    self.expired.add(task)
                    task.cancel()


_BODY_READERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _BodyReaders] = (
    weakref.WeakKeyDictionary()
)
#: The last loop's readers, looked up without a weak reference per request.
_last_readers: tuple[asyncio.AbstractEventLoop, _BodyReaders] | None = None


def _readers() -> _BodyReaders:
    global _last_readers  # noqa: PLW0603 - a one-entry memo of _BODY_READERS
    loop = asyncio.get_running_loop()
    last = _last_readers
    if last is not None and last[0] is loop:
        return last[1]
    readers = _BODY_READERS.get(loop)
    if readers is None:
        readers = _BODY_READERS[loop] = _BodyReaders()
    _last_readers = (loop, readers)
    return readers


async def _receive_body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"request body larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    if not chunks:
        return b""
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _livez(_: Request) -> Response:
    """The process answers (liveness): nothing is built or read."""
    return _json({"status": "alive"})


async def _healthz(_: Request) -> Response:
    """Ready only when the instance can serve: built (configuration, policy, stores and, in
    ``verify`` mode, the signing keys); otherwise 503 with the error's code -- never its
    detail, which the log has."""
    try:
        await build()
    except TokenBrokerError as error:
        return _json(
            {"status": "unready", "error": error.code},
            503,
            {**_NO_STORE, "Retry-After": str(int(RETRY_BUILD_SECONDS))},
        )
    return _json({"status": "ok"})


_JSON = (b"content-type", b"application/json")
_NO_STORE_RAW = [(b"cache-control", b"no-store"), (b"pragma", b"no-cache")]


def _token_answer(body: bytes) -> Response:
    """A 200 JSON answer with its header list built directly: Starlette's header mapping
    (lower-casing and encoding every name and value) cost more than the rest of a cached
    answer. The same headers as :func:`_json` with ``_NO_STORE``."""
    from starlette.responses import Response  # noqa: PLC0415

    answer = Response.__new__(Response)
    answer.status_code = 200
    answer.background = None
    answer.body = body
    answer.raw_headers = [(b"content-length", str(len(body)).encode()), _JSON, *_NO_STORE_RAW]
    return answer


async def _token(request: Request) -> Response:
    scope = request.scope
    content_type = _header(scope["headers"], b"content-type")
    if content_type and not content_type.startswith(b"application/json"):
        raise BadRequest("Content-Type must be application/json")
    service = _service
    issuer = service.issuer if service is not None else (await build())[0]
    body = await read_body(request)
    authorization = issuer.verifier.select_authorization(scope["headers"])
    token = await issuer.issue(authorization, body)
    return _token_answer(token.render(issuer.clock.now()))


async def _relay_route(request: Request) -> Response:
    """Authorise first, then read the body (with the route's limit), then forward."""
    from starlette.responses import Response  # noqa: PLC0415

    _, relay = await build()
    # The raw (still percent-encoded) path: the policy refuses encoded tricks itself.
    raw_path: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    target = raw_path.partition(b"?")[0].decode("latin-1").removeprefix("/relay/")
    authorization = relay.verifier.select_authorization(request.scope["headers"])
    permit = await relay.authorize(authorization, request.method, target)
    body = await read_body(request, permit.max_body_bytes)
    query: bytes = request.scope.get("query_string") or b""
    answer = await relay.forward(
        permit, query=query.decode("latin-1") or None, headers=request.headers.items(), body=body
    )
    return Response(answer.body, status_code=answer.status, headers=dict(answer.headers))


_Endpoint = Callable[["Request"], Awaitable["Response"]]
_ROUTES: dict[str, tuple[tuple[str, ...], _Endpoint]] = {
    "/healthz": (("GET", "HEAD"), _healthz),
    "/livez": (("GET", "HEAD"), _livez),
    "/token": (("POST",), _token),
}


def _route(path: str, method: str) -> _Endpoint:
    route = _ROUTES.get(path)
    if route is None:
        raise NotFound("no such route")
    methods, endpoint = route
    if method not in methods:
        raise MethodNotAllowed(methods)
    return endpoint


async def handle(request: Request) -> Response:
    """Every request to the issuer function. Its log lines carry its trace (``traceparent``
    or ``X-Cloud-Trace-Context``: :mod:`tokenbroker.kernel.trace`)."""
    path: str = request.scope["path"]
    traced = trace.enter(trace.from_asgi_headers(request.scope["headers"]))
    try:
        if path == "/token" and request.scope["method"] == "POST":
            return await _token(request)
        if path.startswith("/relay/"):
            return await _relay_route(request)
        return await _route(path, request.method)(request)
    except TokenBrokerError as error:
        return error_response(error)
    except Exception:  # noqa: BLE001 - last line: log the bug, never leak a trace to the caller
        get_logger(component="issuer-http").exception("unhandled error", path=path)
        answer = bug_answer()
        return _json(answer.body, answer.status, answer.headers)
    finally:
        trace.leave(traced)
