"""Recognising credential material in free text, for logs and error messages.

Two defences, used together by the logger: values of :class:`~tokenbroker.kernel.secret.Secret` type
print as fingerprints by themselves; anything else that *looks* like a token is replaced here.
"""

from __future__ import annotations

import re

REDACTED = "[REDACTED]"

# Field names whose values are credential material whatever they look like.
SENSITIVE_KEY_RE = re.compile(
    r"(token|secret|password|passwd|assertion|private_key|authorization|api_key|app_key|"
    r"cookie|credential|code_verifier|^code$)",
    re.IGNORECASE,
)
# Keys that match the pattern above but carry only non-secret descriptions of tokens.
SAFE_KEYS = frozenset(
    {"token_type", "token_url", "token_endpoint", "refresh_after", "expires_at", "expires_in"}
)

_TOKEN_PATTERNS = [
    # JWT / JWS compact serialisation (RFC 7515 §7.1): three base64url parts.
    r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*",
    # Google access and refresh tokens.
    r"ya29\.[A-Za-z0-9_.-]+",
    r"1//[A-Za-z0-9_-]{20,}",
    # Zoho tokens: 1000.<hex>.<hex>
    r"\b1000\.[0-9a-f]{16,}\.[0-9a-f]{16,}\b",
    # PEM private keys.
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(-----END [A-Z ]*PRIVATE KEY-----|$)",
    # Bearer/Basic credentials in header-shaped text.
    r"\b(?:[Bb]earer|[Bb]asic|BEARER|BASIC)\s+[A-Za-z0-9._~+/=-]{8,}",
]
# Opaque tokens: long base64url-ish runs mixing upper case, lower case and digits. Hex digests,
# UUIDs and ordinary identifiers (single case) are left alone.
_OPAQUE = re.compile(r"(?<![A-Za-z0-9_~+/-])[A-Za-z0-9_~+/=-]{24,}(?![A-Za-z0-9_~+/=-])")
_PATTERN = re.compile("|".join(f"(?:{p})" for p in _TOKEN_PATTERNS))


def _opaque(match: re.Match[str]) -> str:
    text = match.group(0)
    has_upper = any(c.isupper() for c in text)
    has_lower = any(c.islower() for c in text)
    has_digit = any(c.isdigit() for c in text)
    return REDACTED if has_upper and has_lower and has_digit else text


def scrub(text: str) -> str:
    """``text`` with every token-shaped substring replaced by ``[REDACTED]``."""
    if len(text) < 8:
        return text
    return _OPAQUE.sub(_opaque, _PATTERN.sub(REDACTED, text))


def is_sensitive_key(key: str) -> bool:
    return key not in SAFE_KEYS and bool(SENSITIVE_KEY_RE.search(key))
