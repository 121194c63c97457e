"""Every decision of the consumer client, without I/O.

:class:`ClientCore` holds the configuration, the cache (one :class:`_Slot` per
*(connection, scopes)*) and the circuit breaker. :meth:`ClientCore.token` returns a
:class:`~tokenbroker.consumer.effects.Flow`: a generator that runs until it needs the outside
world, yields an effect (:mod:`tokenbroker.consumer.effects`) and resumes with its answer. The
shells in :mod:`~tokenbroker.consumer.sync` and :mod:`~tokenbroker.consumer.aio` only perform
those effects, so this module is the one copy of:

* freshness, after google-auth's ``TokenState``: *fresh* (before ``refresh_after`` and at
  least ``min_ttl_seconds`` from expiry) is served with no request; *stale* (past
  ``refresh_after``, still before ``expires_at - expiry_margin_seconds``) triggers a refresh,
  and is served when the refresh is unavailable; *invalid* is never served;
* single flight per key, and sharing a failed fetch with the callers that waited for it;
* retries (only when no valid token is in hand), back-off, ``Retry-After``, the deadline;
* the circuit breaker's bookkeeping, and one ID-token refresh after a ``401``;
* what is logged, once per outage.

Two decisions worth knowing (docs/client.md, *Decisions*):

* A refusal from the broker (400/401/403/409) is final: raised at once, never retried, and it
  **evicts** the cached token for that key, so a revoked permission takes effect at the next
  refresh even if the broker then goes down.
* The breaker tracks the broker *service*: a JSON ``503 temporarily_unavailable`` (one
  credential cannot be served now) is retried and honoured but does not open the breaker.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import TypedDict

from tokenbroker.consumer.breaker import BreakerState, CircuitBreaker
from tokenbroker.consumer.effects import Claim, Flow, GetIdToken, Post, Sleep, Steps, ask
from tokenbroker.consumer.errors import (
    BrokerInvalidToken,
    BrokerRequestError,
    BrokerUnavailable,
    IdTokenError,
    Unavailability,
)
from tokenbroker.consumer.idtoken import IdTokenSource, default_id_token_source
from tokenbroker.consumer.token import BrokerToken, TokenKey
from tokenbroker.consumer.wire import check_base_url, read_answer, request_body, request_headers
from tokenbroker.kernel.clock import Clock, SystemClock, isoformat
from tokenbroker.kernel.errors import ConfigError, TokenBrokerError
from tokenbroker.kernel.log import get_logger
from tokenbroker.kernel.retry import RetryPolicy

#: Retries for a caller that is waiting: short, because the caller is usually serving a request.
DEFAULT_RETRY = RetryPolicy(attempts=3, base_delay=0.2, max_delay=2.0, max_retry_after=5.0)


class ClientOptions(TypedDict, total=False):
    """The options of both clients (docs/client.md, *Configuration*); defaults are those of
    :class:`ClientCore`."""

    audience: str | None
    id_token_source: IdTokenSource | None
    clock: Clock | None
    timeout: float
    deadline_seconds: float
    retry: RetryPolicy | None
    breaker_threshold: int
    breaker_reset_seconds: float
    min_ttl_seconds: int
    expiry_margin_seconds: float
    rng: random.Random | None
    serverless_authorization: bool


class _Outage(StrEnum):
    NONE = "none"
    SERVING_CACHED = "serving_cached"
    NOTHING_VALID = "nothing_valid"


@dataclass
class _Slot:
    """What the client knows about one key. Mutated only by the call that holds the key."""

    token: BrokerToken | None = None
    failures: int = 0  # consecutive failed refreshes
    retry_at: float = 0.0  # monotonic; while serving the cached token, no attempt before this
    outage: _Outage = _Outage.NONE
    fetches: int = 0  # completed fetches, so a waiter knows one finished while it waited
    last_failure: BrokerUnavailable | None = None  # how the last fetch failed, if it did


class ClientCore:
    """Configuration, cache, breaker and every decision; the shells add the I/O."""

    def __init__(
        self,
        base_url: str,
        *,
        audience: str | None = None,
        id_token_source: IdTokenSource | None = None,
        clock: Clock | None = None,
        timeout: float = 5.0,
        deadline_seconds: float = 10.0,
        retry: RetryPolicy | None = None,
        breaker_threshold: int = 5,
        breaker_reset_seconds: float = 30.0,
        min_ttl_seconds: int = 60,
        expiry_margin_seconds: float = 10.0,
        rng: random.Random | None = None,
        serverless_authorization: bool = True,
    ) -> None:
        base = check_base_url(base_url)
        if timeout <= 0 or deadline_seconds <= 0:
            raise ConfigError("timeout and deadline_seconds must be positive")
        if breaker_threshold < 1 or breaker_reset_seconds <= 0:
            raise ConfigError("breaker_threshold must be >= 1, breaker_reset_seconds > 0")
        if not 0 <= min_ttl_seconds <= 43_200:
            raise ConfigError("min_ttl_seconds must be between 0 and 43200")
        if expiry_margin_seconds < 0:
            raise ConfigError("expiry_margin_seconds must not be negative")
        self.url = base + "/token"
        # Cloud Run checks that ``aud`` is the service URL; by default that is base_url.
        self.audience = audience or base
        self.clock: Clock = clock or SystemClock()
        self.source = id_token_source or default_id_token_source(clock=self.clock)
        self.timeout = timeout
        self.deadline_seconds = deadline_seconds
        self.retry = retry or DEFAULT_RETRY
        self.min_ttl_seconds = min_ttl_seconds
        #: Also send the ID token as ``X-Serverless-Authorization`` (wire.request_headers).
        self.serverless_authorization = serverless_authorization
        self._min_ttl = timedelta(seconds=min_ttl_seconds)
        self._margin = timedelta(seconds=expiry_margin_seconds)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._log = get_logger(component="broker-client")
        self.breaker = CircuitBreaker(
            breaker_threshold, breaker_reset_seconds, self.clock, on_change=self._breaker_moved
        )
        self._slots: dict[TokenKey, _Slot] = {}
        self._slots_lock = threading.Lock()  # never held across an effect

    def token(self, connection: str, scopes: Sequence[str] = ()) -> Flow[BrokerToken]:
        """One ``token()`` call as a flow for a shell to drive. Bad arguments raise here.

        A fresh cached token (the common case) is a flow that has already finished.
        """
        key = TokenKey.of(connection, scopes)
        slot = self._slot(key)
        cached = self._fresh(slot)
        if cached is not None:
            return Flow.finished(cached)
        return Flow(self._token(key, slot))

    # -- the call ------------------------------------------------------------------------------

    def _token(self, key: TokenKey, slot: _Slot) -> Steps[BrokerToken]:
        """Claim the key, then refresh; the claim is let go whatever happens."""
        release = yield from ask(Claim(key, self.deadline_seconds, wait=False))
        waited_for = None
        if release is None:
            # Someone is refreshing this key: serve the still-valid token, or wait for theirs.
            cached = self._usable(slot)
            if cached is not None:
                return cached
            waited_for = slot.fetches
            release = yield from ask(Claim(key, self.deadline_seconds, wait=True))
            if release is None:
                raise BrokerUnavailable(
                    "timed out waiting for another refresh of this token",
                    reason=Unavailability.REFRESH_IN_FLIGHT,
                )
        try:
            return (yield from self._refresh(key, slot, waited_for))
        finally:
            release()

    def _refresh(self, key: TokenKey, slot: _Slot, waited_for: int | None) -> Steps[BrokerToken]:
        """Holding the key: answer from the cache, or fetch and settle the outcome."""
        answer, fallback = self._plan(slot, waited_for)
        if answer is not None:
            return answer
        try:
            token, attempts = yield from self._fetch(key, retries=fallback is None)
        except TokenBrokerError as error:
            return self._failed(key, slot, error)
        self._succeeded(key, slot, token, attempts)
        return token

    def _fetch(self, key: TokenKey, *, retries: bool) -> Steps[tuple[BrokerToken, int]]:
        """Attempts until a token, a refusal, or the retry policy / deadline says stop.

        With a valid cached token in hand (``retries=False``) one attempt is made: the caller
        is served the cached token at once, and the key backs off before the next attempt.
        """
        deadline = self.clock.monotonic() + self.deadline_seconds
        attempt = 1
        refresh_id_token = id_token_refreshed = False
        while True:
            try:
                token = yield from self._attempt(key, deadline, refresh_id_token=refresh_id_token)
            except BrokerInvalidToken:
                if id_token_refreshed:
                    raise
                # The ID token may have expired in flight: one fresh one, one more try.
                refresh_id_token = id_token_refreshed = True
            except TokenBrokerError as error:
                refresh_id_token = False
                wait = self._next_wait(attempt, error, deadline) if retries else None
                if wait is None:
                    error.attempts = attempt
                    raise
                self._log.debug(
                    "broker request failed; retrying",
                    connection=key.connection,
                    attempt=attempt,
                    reason=_reason(error),
                    wait_seconds=round(wait, 3),
                )
                yield from ask(Sleep(wait))
                attempt += 1
            else:
                return token, attempt

    def _attempt(
        self, key: TokenKey, deadline: float, *, refresh_id_token: bool
    ) -> Steps[BrokerToken]:
        """One request: the caller's ID token, the breaker's leave, the exchange, the answer."""
        try:
            id_token = yield from ask(GetIdToken(self.source, self.audience, refresh_id_token))
        except IdTokenError as error:
            if not error.retryable:
                raise
            raise BrokerUnavailable(
                f"ID token unavailable: {error.message}", reason=Unavailability.ID_TOKEN
            ) from error
        timeout = self._budget(deadline)
        self._admit()
        headers = request_headers(id_token, serverless_authorization=self.serverless_authorization)
        post = Post(self.url, request_body(key, self.min_ttl_seconds), headers, timeout)
        try:
            answer = yield from ask(post)
            token = read_answer(answer, key, received=self.clock.now(), timeout=timeout)
        except BaseException as error:
            self._settle(error)  # also when the shell was cancelled mid-request
            raise
        self._settle(None)
        return token

    # -- the cache -------------------------------------------------------------------------

    def _slot(self, key: TokenKey) -> _Slot:
        with self._slots_lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _Slot()
            return slot

    def _fresh(self, slot: _Slot) -> BrokerToken | None:
        """The cached token if it may be served without asking the broker."""
        token = slot.token
        if token is None:
            return None
        now = self.clock.now()
        if now < token.refresh_after and now < token.expires_at - self._min_ttl:
            return token
        return None

    def _usable(self, slot: _Slot) -> BrokerToken | None:
        """The cached token if it is still valid (with the safety margin), fresh or not."""
        token = slot.token
        if token is not None and self.clock.now() < token.expires_at - self._margin:
            return token
        return None

    def _plan(
        self, slot: _Slot, waited_for: int | None
    ) -> tuple[BrokerToken | None, BrokerToken | None]:
        """Holding the key: ``(answer, None)`` to answer without a request, or
        ``(None, fallback)`` to fetch, where ``fallback`` is served if the fetch is
        unavailable.

        ``waited_for`` is ``slot.fetches`` as a caller saw it before it waited for the key:
        if the fetch it waited for failed, that failure is its answer too (single flight for
        failures as for tokens: ten waiters do not retry an unavailable broker ten times).
        """
        fresh = self._fresh(slot)
        if fresh is not None:
            return fresh, None
        fallback = self._usable(slot)
        if fallback is not None and self.clock.monotonic() < slot.retry_at:
            return fallback, None  # backing off after a failed refresh: no request
        failure = slot.last_failure
        if waited_for is not None and slot.fetches != waited_for and failure is not None:
            raise BrokerUnavailable(
                f"the refresh this call waited for failed: {failure.message}",
                reason=failure.reason,
                status=failure.status,
                retry_after=failure.retry_after,
            )
        return None, fallback

    def _succeeded(self, key: TokenKey, slot: _Slot, token: BrokerToken, attempts: int) -> None:
        if slot.outage is not _Outage.NONE:
            self._log.info(
                "broker available again; token refreshed",
                connection=key.connection,
                scopes=list(key.scopes),
                failed_refreshes=slot.failures,
            )
        slot.token = token
        slot.failures = 0
        slot.retry_at = 0.0
        slot.outage = _Outage.NONE
        slot.fetches += 1
        slot.last_failure = None
        self._log.debug(
            "token fetched from the broker",
            connection=key.connection,
            scopes=list(key.scopes),
            expires_at=isoformat(token.expires_at),
            refresh_after=isoformat(token.refresh_after),
            attempts=attempts,
        )

    def _failed(self, key: TokenKey, slot: _Slot, error: TokenBrokerError) -> BrokerToken:
        """Settle a failed fetch: the cached token to serve (if it is still valid now, after
        the attempts), or the error to raise."""
        slot.fetches += 1
        slot.last_failure = None
        if not error.retryable and not isinstance(error, BrokerRequestError):
            raise error  # our own configuration (the ID token): say so, change nothing
        if not error.retryable:
            # A refusal is the broker's word on this key: evict, so that an outage right after
            # a revoked permission cannot bring the old token back.
            slot.token = None
            slot.failures = 0
            slot.retry_at = 0.0
            slot.outage = _Outage.NONE
            self._log.info(
                "broker refused the token request",
                connection=key.connection,
                scopes=list(key.scopes),
                error=error.code,
                status=getattr(error, "status", None),
            )
            raise error
        slot.failures += 1
        fallback = self._usable(slot)
        if fallback is not None:
            slot.retry_at = self.clock.monotonic() + self._cooldown(slot.failures, error)
            if slot.outage is not _Outage.SERVING_CACHED:
                slot.outage = _Outage.SERVING_CACHED
                self._log.warning(
                    "broker unavailable; serving the cached token until it expires",
                    connection=key.connection,
                    scopes=list(key.scopes),
                    reason=_reason(error),
                    expires_at=isoformat(fallback.expires_at),
                )
            return fallback
        if slot.outage is not _Outage.NOTHING_VALID:
            self._log.warning(
                "broker unavailable and no valid cached token",
                connection=key.connection,
                scopes=list(key.scopes),
                reason=_reason(error),
                cached_expired=slot.token is not None,
            )
            slot.outage = _Outage.NOTHING_VALID
        slot.token = None
        if not isinstance(error, BrokerUnavailable):
            error = BrokerUnavailable(f"no token: {error.message}", reason=Unavailability.ID_TOKEN)
        slot.last_failure = error
        raise error

    def _cooldown(self, failures: int, error: TokenBrokerError) -> float:
        """How long to keep serving the cached token before the next attempt for this key:
        jittered exponential back-off, at least what the broker or the breaker asked for."""
        policy = self.retry
        backoff = min(policy.max_delay, policy.base_delay * 2.0 ** min(failures - 1, 16))
        wait = backoff * self._rng.uniform(0.5, 1.0)
        return max(wait, error.retry_after or 0.0)

    # -- one attempt's rules -------------------------------------------------------------------

    def _budget(self, deadline: float) -> float:
        """This attempt's HTTP timeout: the configured one, cut to what the deadline leaves."""
        remaining = deadline - self.clock.monotonic()
        if remaining <= 0:
            raise BrokerUnavailable("per-call deadline exceeded", reason=Unavailability.DEADLINE)
        return min(self.timeout, remaining)

    def _admit(self) -> None:
        if not self.breaker.allow():
            wait = self.breaker.retry_in()
            raise BrokerUnavailable(
                f"circuit breaker open; next trial in {wait:.1f}s",
                reason=Unavailability.CIRCUIT_OPEN,
                retry_after=wait or None,
            )

    def _settle(self, error: BaseException | None) -> None:
        """Tell the breaker how an admitted request ended."""
        if error is None:
            self.breaker.succeeded()
        elif isinstance(error, BrokerUnavailable):
            if error.broker_fault:
                self.breaker.failed()
            else:
                self.breaker.succeeded()
        elif isinstance(error, TokenBrokerError):
            self.breaker.succeeded()  # a refusal: the service is up
        else:
            self.breaker.abandoned()

    def _next_wait(self, attempt: int, error: TokenBrokerError, deadline: float) -> float | None:
        """Seconds to wait before another attempt, or ``None`` to give up now."""
        if isinstance(error, BrokerUnavailable) and error.reason in (
            Unavailability.CIRCUIT_OPEN,
            Unavailability.DEADLINE,
        ):
            return None
        wait = self.retry.delay(attempt, error, self._rng)
        if wait is None or self.clock.monotonic() + wait >= deadline:
            return None
        return wait

    def _breaker_moved(self, previous: BreakerState, state: BreakerState, failures: int) -> None:
        # One warning per outage: a failed half-open trial re-opens the breaker quietly.
        if state is BreakerState.OPEN and previous is BreakerState.CLOSED:
            self._log.warning(
                "circuit breaker open: no requests to the broker for a while",
                previous=previous.value,
                consecutive_failures=failures,
                reset_seconds=self.breaker.reset_seconds,
            )
        elif state is BreakerState.CLOSED:
            self._log.info("circuit breaker closed: the broker answers again")
        else:
            self._log.debug("circuit breaker moved", state=state.value, failures=failures)


def _reason(error: TokenBrokerError) -> str:
    return error.reason.value if isinstance(error, BrokerUnavailable) else error.code
