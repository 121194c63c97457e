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
the key (:mod:`tokenbroker.oauth.budget`, shared with the issuer's narrowing refresh) and, on a
denial, the connection's next state. Values in, values out, like
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

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from tokenbroker.kernel.clock import isoformat
from tokenbroker.kernel.log import Logger
from tokenbroker.kernel.model import RefreshState
from tokenbroker.oauth.budget import BudgetRequest, budget_request
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
        "budget_scope": str(deferral.request.scope),
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
