"""Token-endpoint budgets: which budget a refresh spends, and what a denial does to it.

Some providers limit how often their token endpoint may be asked, and answer the request over
the limit with a refusal rather than a token. Zoho documents, for its accounts servers:

* "Using a refresh token, your app can create up to ten access tokens in a span of ten
  minutes. If the limit is reached, the access token creation will be blocked for the rest of
  the ten minutes."
  (https://www.zoho.com/accounts/protocol/oauth/web-apps/access-token-expiry.html; the same
  text for devices, https://www.zoho.com/accounts/protocol/oauth/devices/refresh-access-token.html).
  The ``zoho`` profile's budget (``scope = "refresh_token"``) stays below that documented
  limit (8 per 600 s; ``oauth/profiles.toml``).
* Zoho CRM's "Token Validity" pages repeat the ten per ten minutes per refresh token, cap the
  active access tokens per refresh token (15 in API v8, the oldest invalidated; other Zoho
  products say 30) -- no refresh schedule of ours comes near that -- and limit refresh tokens
  to "a maximum of 20 refresh tokens in a span of 10 minutes per client ID", the 21st
  deleting the first (https://www.zoho.com/crm/developer/docs/api/v3/token-validity.html).
  Refresh tokens come from the authorization-code exchange, which the refresher never makes,
  so that limit is not a refresh budget.
* Zoho's developer forum ("Kaizen #43 - Tokens and Limitations",
  https://help.zoho.com/portal/en/community/topic/kaizen-43-tokens-and-limitations) says the
  answer over a limit keeps HTTP status 200 with the message "Access Denied".

Not documented: whether the ten minutes slide or are fixed ("blocked for the rest of the ten
minutes" suggests a fixed window opened by the first token, but not where it starts), whether
a data centre counts apart, whether refused or failed requests count, and any ``Retry-After``
on the refusal. So the budget is counted conservatively: every request sent counts,
whatever its answer, and the window slides (:mod:`tokenbroker.adapters.budget_log`: at most
``limit`` in *any* span of ``window``, which is at least as strict as any fixed window).

The budget is spent through the state store (:meth:`~tokenbroker.ports.StateStore.take_budget`)
so every refresher -- every process, every Cloud Function instance -- shares one count. The
tick takes one slot just before each request it sends (retries included); this module decides
the key and, on a denial, the connection's next state. Values in, values out, like
:mod:`.transitions`: no store, no clock, no network.

A denial is never a failure: nothing was sent, so no failure is counted, no error recorded,
the status is unchanged and a ``needs_reauth`` is impossible. The refresh is deferred to when
the slot frees -- but never past the last safe moment before the access token expires. When the
slot frees only after that moment, the connection is **at risk** (its consumers may see the
access token expire before a refresh is allowed): a distinct outcome, logged as an error, and
the refresh is tried again at the last safe moment (or, past it, at a bounded pace) rather than
left to expire quietly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from urllib.parse import urlsplit

from tokenbroker.kernel.clock import isoformat
from tokenbroker.kernel.log import Logger
from tokenbroker.kernel.model import Connection, Credential, RefreshState
from tokenbroker.oauth.profiles import BudgetScope, ProviderProfile
from tokenbroker.ports import BudgetDecision

__all__ = [
    "DEFAULT_LAST_SAFE_LEAD",
    "DEFAULT_RETRY_FLOOR",
    "BudgetDeferral",
    "BudgetRequest",
    "DeferralKind",
    "budget_request",
    "defer",
    "report",
]

#: How long before expiry the last refresh must start for consumers never to hold an expired
#: access token: a tick interval (60 s by default) plus the lease safety margin (30 s) and
#: the request and commit.
DEFAULT_LAST_SAFE_LEAD = timedelta(minutes=2)
#: Once past the last safe moment and still over budget, how often to try (and say so) again.
DEFAULT_RETRY_FLOOR = timedelta(minutes=1)
#: A denial whose slot "frees" at or before now (a store bug, a clock step) still waits this
#: long, so it can never make a refresh due again at once, tick after tick.
_MIN_DEFERRAL = timedelta(seconds=1)
#: Domain separation for the key digests: a budget key is no hash anyone else computes.
_KEY_CONTEXT = b"tokenbroker token-endpoint budget v1\x00"


@dataclass(frozen=True)
class BudgetRequest:
    """One slot of a budget to take before sending one token request."""

    key: str
    scope: BudgetScope
    limit: int
    window: timedelta
    cost: int = 1


def _endpoint(url: str) -> str:
    """A token URL with its scheme and host in lower case (RFC 3986 §6.2.2.1: they are
    case-insensitive), so spellings of one endpoint share a budget."""
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path}"


def _digest(*parts: str) -> str:
    joined = "\x1f".join(parts).encode()
    return hashlib.sha256(_KEY_CONTEXT + joined).hexdigest()[:32]


def budget_request(
    connection: Connection, profile: ProviderProfile, credential: Credential
) -> BudgetRequest | None:
    """The budget a refresh of ``connection`` spends, or ``None`` when its profile has none.

    Keys are ``<scope>:<digest>``: short, safe in any store, and free of anything secret --
    the refresh token's digest is a domain-separated SHA-256 (128 bits kept), not the value
    nor the ``Secret`` fingerprint that logs show. Per refresh token, connections registered
    with one token share its budget and a re-authorisation starts a fresh one; a connection
    without a refresh token (another grant) counts on its own. Per client and per endpoint,
    the endpoint is the connection's token URL, so each Zoho data centre counts apart.
    Raises ConfigError when the connection's token URL cannot be resolved.
    """
    budget = profile.budget
    if budget is None:
        return None
    match budget.scope:
        case BudgetScope.REFRESH_TOKEN:
            token = credential.refresh_token
            if token:
                digest = _digest("refresh_token", token.reveal())
            else:
                digest = _digest("connection", connection.id)
        case BudgetScope.CLIENT:
            endpoint = _endpoint(profile.token_url_for(connection))
            digest = _digest("client", endpoint, connection.client_id or "")
        case BudgetScope.TOKEN_ENDPOINT:
            digest = _digest("endpoint", _endpoint(profile.token_url_for(connection)))
    return BudgetRequest(
        key=f"{budget.scope.value}:{digest}",
        scope=budget.scope,
        limit=budget.requests,
        window=timedelta(seconds=budget.per_seconds),
    )


class DeferralKind(StrEnum):
    #: The slot frees in time: the refresh waits for it, and nothing is wrong.
    DEFERRED = "deferred"
    #: The slot frees only after the last safe moment before expiry: the access token may
    #: expire before a refresh is allowed. Alert on it.
    AT_RISK = "at_risk"


@dataclass(frozen=True)
class BudgetDeferral:
    """What a denied budget does to a connection: commit ``state`` under the lease."""

    kind: DeferralKind
    #: The connection's state with only ``next_refresh_at`` changed.
    state: RefreshState
    #: When the denied slot frees.
    frees_at: datetime
    #: The last moment a refresh can start with consumers kept working (``None``: the expiry
    #: is unknown).
    last_safe_at: datetime | None
    request: BudgetRequest
    decision: BudgetDecision


def defer(
    state: RefreshState,
    request: BudgetRequest,
    decision: BudgetDecision,
    now: datetime,
    *,
    last_safe_lead: timedelta = DEFAULT_LAST_SAFE_LEAD,
    retry_floor: timedelta = DEFAULT_RETRY_FLOOR,
) -> BudgetDeferral:
    """The connection's next state after ``decision`` denied its refresh at ``now``.

    Deferred to when the slot frees; but never past the last safe moment (``expires_at -
    last_safe_lead``): when the slot frees after it, the kind is ``AT_RISK`` and the refresh is
    due again at that moment -- or, once past it, ``retry_floor`` from now -- and never later
    than the slot itself frees. Raises ValueError for a grant or a denial without a time.
    """
    if decision.granted or decision.frees_at is None:
        raise ValueError("defer() takes a denial that says when its slot frees")
    frees_at = max(decision.frees_at, now + _MIN_DEFERRAL)
    last_safe_at = None if state.expires_at is None else state.expires_at - last_safe_lead
    if last_safe_at is None or frees_at <= last_safe_at:
        kind, next_refresh_at = DeferralKind.DEFERRED, frees_at
    else:
        kind = DeferralKind.AT_RISK
        next_refresh_at = min(frees_at, max(last_safe_at, now + retry_floor))
    return BudgetDeferral(
        kind=kind,
        state=replace(state, next_refresh_at=next_refresh_at),
        frees_at=frees_at,
        last_safe_at=last_safe_at,
        request=request,
        decision=decision,
    )


def report(deferral: BudgetDeferral, connection_id: str, log: Logger) -> None:
    """Log a deferral: ``info`` when the slot frees in time, ``error`` when the connection is
    at risk. The budget key is left out (it identifies a refresh token)."""
    fields = {
        "connection_id": connection_id,
        "outcome": deferral.kind.value,
        "budget_scope": deferral.request.scope.value,
        "budget_limit": deferral.request.limit,
        "budget_window_seconds": deferral.request.window.total_seconds(),
        "budget_used": deferral.decision.used,
        "frees_at": isoformat(deferral.frees_at),
        "next_refresh_at": isoformat(deferral.state.next_refresh_at),
        "expires_at": isoformat(deferral.state.expires_at),
    }
    if deferral.kind is DeferralKind.AT_RISK:
        log.error(
            "token-endpoint budget spent until after the last safe moment: the access token "
            "may expire before a refresh is allowed",
            **fields,
            last_safe_at=isoformat(deferral.last_safe_at),
        )
    else:
        log.info("refresh deferred: token-endpoint budget spent", **fields)
