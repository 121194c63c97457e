"""The consumer wing: what integration workers install (``pip install 'tokenbroker[client]'``)
to get tokens from the issuer, and to consume its events.

Import from here::

    from tokenbroker.consumer import BrokerClient, BrokerUnavailable

The client is one sans-I/O core (:mod:`.core`: every decision) driven by two thin shells,
:mod:`.sync` (threads, ``httpx.Client``) and :mod:`.aio` (asyncio, ``httpx.AsyncClient``),
that perform the effects it asks for (:mod:`.effects`). The rest, by job: :mod:`.token`
(values), :mod:`.errors`, :mod:`.breaker`, :mod:`.idtoken` (the caller's identity),
:mod:`.wire` (the ``/token`` contract), :mod:`.settings` (the environment), :mod:`.subscriber`
(connection events from Pub/Sub). The wing imports only ``tokenbroker.kernel``; httpx and
google-auth are imported when first needed.
"""

from tokenbroker.consumer.aio import AsyncBrokerClient
from tokenbroker.consumer.breaker import BreakerState, CircuitBreaker
from tokenbroker.consumer.core import DEFAULT_RETRY, ClientOptions
from tokenbroker.consumer.errors import (
    BROKER_FAULTS,
    BrokerAccessDenied,
    BrokerBadRequest,
    BrokerInvalidToken,
    BrokerNeedsReauth,
    BrokerRequestError,
    BrokerUnavailable,
    IdTokenError,
    Unavailability,
)
from tokenbroker.consumer.idtoken import (
    GoogleIdTokenSource,
    IdTokenSource,
    RefreshableIdTokenSource,
    StaticIdTokenSource,
    default_id_token_source,
    jwt_expiry,
    static_id_token_source,
)
from tokenbroker.consumer.settings import ENV_ID_TOKEN, ENV_ID_TOKEN_FILE, ClientSettings
from tokenbroker.consumer.sync import BrokerClient
from tokenbroker.consumer.token import BrokerToken

__all__ = [
    "BROKER_FAULTS",
    "DEFAULT_RETRY",
    "ENV_ID_TOKEN",
    "ENV_ID_TOKEN_FILE",
    "AsyncBrokerClient",
    "BreakerState",
    "BrokerAccessDenied",
    "BrokerBadRequest",
    "BrokerClient",
    "BrokerInvalidToken",
    "BrokerNeedsReauth",
    "BrokerRequestError",
    "BrokerToken",
    "BrokerUnavailable",
    "CircuitBreaker",
    "ClientOptions",
    "ClientSettings",
    "GoogleIdTokenSource",
    "IdTokenError",
    "IdTokenSource",
    "RefreshableIdTokenSource",
    "StaticIdTokenSource",
    "Unavailability",
    "default_id_token_source",
    "jwt_expiry",
    "static_id_token_source",
]
