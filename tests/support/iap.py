"""Identity-Aware Proxy stand-in: an ES256 key, its JWK set, and signed assertions shaped like
``x-goog-iap-jwt-assertion`` (https://cloud.google.com/iap/docs/signed-headers-howto)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from joserfc import jws
from joserfc.jwk import ECKey

IAP_ISSUER = "https://cloud.google.com/iap"
AUDIENCE = "/projects/123456789012/global/backendServices/4242"


class IapKeys:
    """One P-256 signing key (``kid``) and what IAP would publish for it."""

    def __init__(self, kid: str = "iap-test-1") -> None:
        self.kid = kid
        self.key = ECKey.generate_key("P-256")

    def jwks(self) -> dict[str, Any]:
        public = self.key.as_dict(private=False)
        return {"keys": [{**public, "kid": self.kid, "alg": "ES256", "use": "sig"}]}

    def assertion(self, who: str, *, header: dict[str, Any] | None = None,
                  **claims: Any) -> str:  # fmt: skip
        """Signed for ``who`` (its ``email``); ``claims`` replace claims (``None``: left out)."""
        now = int(time.time())
        payload = {
            "iss": IAP_ISSUER, "aud": AUDIENCE, "sub": f"accounts.google.com:{who}",
            "email": who, "iat": now, "exp": now + 600, **claims,
        }  # fmt: skip
        payload = {k: v for k, v in payload.items() if v is not None}
        protected = header if header is not None else {"alg": "ES256", "kid": self.kid}
        if protected.get("alg") != "ES256":  # unsigned, as a forger would send it
            return f"{_b64(protected)}.{_b64(payload)}.c2lnbmF0dXJl"
        return jws.serialize_compact(protected, json.dumps(payload).encode(), self.key)


def _b64(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()
