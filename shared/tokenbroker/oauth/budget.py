"""Which token-endpoint budget a token request spends: the key shared by every refresher and
the issuer (see :mod:`tokenbroker.refresh.budget` for the providers' documented limits and
what a denial does to a connection). Pure: no store, no clock, no network."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

from tokenbroker.kernel.model import Connection, Credential
from tokenbroker.oauth.profiles import BudgetScope, ProviderProfile
from tokenbroker.ports import WriteBudget

__all__ = ["SECRET_VERSIONS", "BudgetRequest", "budget_request", "store_budget"]

#: The scope of a credential store's own budget: versions of one secret per window.
SECRET_VERSIONS = "secret_versions"  # noqa: S105 - a scope name

#: Domain separation for the key digests: a budget key is no hash anyone else computes.
_KEY_CONTEXT = b"tokenbroker token-endpoint budget v1\x00"


@dataclass(frozen=True)
class BudgetRequest:
    """One slot of a budget to take before sending one token request. ``scope`` is what it
    is counted per: a :class:`BudgetScope` for a provider's budget, or
    :data:`SECRET_VERSIONS` for a credential store's version quota (:func:`store_budget`)."""

    key: str
    scope: str
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


def store_budget(budget: WriteBudget | None) -> BudgetRequest | None:
    """The slot a refresh takes of its credential store's version budget (one answer, one
    new version), or ``None`` when the store has none."""
    if budget is None:
        return None
    return BudgetRequest(
        key=budget.key, scope=SECRET_VERSIONS, limit=budget.limit, window=budget.window
    )
