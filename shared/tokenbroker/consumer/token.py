"""The values a caller holds: the key a token is cached under and the token itself."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from tokenbroker.kernel.secret import Secret


@dataclass(frozen=True)
class TokenKey:
    """What a token is cached under: the connection and its scopes, sorted and de-duplicated
    (so ``["b", "a", "a"]`` and ``("a", "b")`` share one token)."""

    connection: str
    scopes: tuple[str, ...]

    @classmethod
    def of(cls, connection: str, scopes: Sequence[str]) -> TokenKey:
        if not isinstance(connection, str) or not connection:
            raise ValueError("connection must be a non-empty string")
        if isinstance(scopes, str):
            raise TypeError("scopes must be a sequence of scope strings, not one string")
        return cls(connection, tuple(sorted(set(scopes))))


@dataclass(frozen=True)
class BrokerToken:
    """A token the broker issued. Times are in this process's clock (see
    :func:`tokenbroker.consumer.wire.token_times`).

    ``repr()`` shows the token's fingerprint, never its value.
    """

    access_token: Secret
    token_type: str
    expires_at: datetime
    refresh_after: datetime
    scope: tuple[str, ...]
    connection: str

    def header(self) -> dict[str, str]:
        """``{"Authorization": "Bearer ..."}`` (RFC 6750 §2.1): the one place the value is
        revealed."""
        return {"Authorization": f"{self.token_type} {self.access_token.reveal()}"}

    def expires_in(self, now: datetime) -> float:
        return (self.expires_at - now).total_seconds()
