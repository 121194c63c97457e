"""Who is calling: authentication of the broker's callers.

:mod:`tokenbroker.auth.idtoken` verifies the Google-signed ID token a caller presents as a
Bearer token and yields its :class:`~tokenbroker.auth.idtoken.Caller`.
"""

from __future__ import annotations

from tokenbroker.auth.idtoken import (
    GOOGLE_CERTS_URL,
    GOOGLE_ISSUERS,
    Caller,
    IdTokenVerifier,
    JwksDocument,
    KeySet,
)

__all__ = [
    "GOOGLE_CERTS_URL",
    "GOOGLE_ISSUERS",
    "Caller",
    "IdTokenVerifier",
    "JwksDocument",
    "KeySet",
]
