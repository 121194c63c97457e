"""Recognising credential material in free text, for logs and error messages.

Three defences. Values of :class:`~tokenbroker.kernel.secret.Secret` type print as fingerprints
by themselves. Text from outside (a provider's ``error_description``, an HTML error page) is
scrubbed *by value* at the boundary where it comes in, with a :class:`Scrubber` holding every
secret known for the connection -- exact values and their URL-, JSON- and HTML-encoded forms,
whatever they look like. And anything that *looks* like a token is replaced by :func:`scrub`,
which the logger applies to every line: tokens nobody told us about.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable
from typing import NoReturn
from urllib.parse import quote, quote_plus

from tokenbroker.kernel.secret import Secret

REDACTED = "[REDACTED]"

# Field names whose values are credential material whatever they look like.
SENSITIVE_KEY_RE = re.compile(
    r"(token|secret|password|passwd|assertion|private_key|authorization|api_key|app_key|"
    r"cookie|credential|code_verifier|device_code|^code$)",
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
    # AWS access key ids (single case, too regular for the rule below).
    r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b",
]
# Opaque tokens: long base64url-ish runs. Mixing upper case, lower case and digits is enough;
# single-case runs (hex, lower-case base64url) must also look random (see _random_segment).
_OPAQUE = re.compile(r"(?<![A-Za-z0-9_~+/-])[A-Za-z0-9_~+/=-]{24,}(?![A-Za-z0-9_~+/=-])")
_PATTERN = re.compile("|".join(f"(?:{p})" for p in _TOKEN_PATTERNS))
# Identifiers the logs need that have a token's alphabet: UUIDs (event ids), and exactly 32 hex
# digits (a UUID's hex, our idempotency keys, MD5 digests). A token of that exact shape is
# only caught by value -- which is why the grants scrub every known secret by value.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HEX32 = re.compile(r"[0-9a-fA-F]{32}")
_SEPARATORS = re.compile(r"[-_~+/=]")
_LETTER_DIGIT = re.compile(r"[A-Za-z](?=[0-9])|[0-9](?=[A-Za-z])")
#: A segment this long that switches between letters and digits this often is random, not a
#: word with a number on it ("production2024", "eu1", "v12" switch once or twice).
_RANDOM_SEGMENT_CHARS = 12
_RANDOM_SEGMENT_SWITCHES = 3


def _random_segment(segment: str) -> bool:
    return (
        len(segment) >= _RANDOM_SEGMENT_CHARS
        and not _HEX32.fullmatch(segment)
        and len(_LETTER_DIGIT.findall(segment)) >= _RANDOM_SEGMENT_SWITCHES
    )


def _opaque(match: re.Match[str]) -> str:
    text = match.group(0)
    has_upper = any(c.isupper() for c in text)
    has_lower = any(c.islower() for c in text)
    has_digit = any(c.isdigit() for c in text)
    if has_upper and has_lower and has_digit:
        return REDACTED
    # Single case: a token when one of its segments (between - _ ~ + / =) looks random, once
    # the identifiers above are set aside. Words, ids, versions and host names do not.
    segments = _SEPARATORS.split(_UUID.sub("-", text))
    return REDACTED if any(_random_segment(s) for s in segments) else text


def scrub(text: str) -> str:
    """``text`` with every token-shaped substring replaced by ``[REDACTED]``."""
    if len(text) < 8:
        return text
    return _OPAQUE.sub(_opaque, _PATTERN.sub(REDACTED, text))


#: Known values shorter than this are not matched: they would shred ordinary words, and no
#: provider issues secrets that short.
MIN_KNOWN_VALUE_CHARS = 6


def _encoded_forms(value: str) -> set[str]:
    """``value`` as it may appear in someone else's text: raw, form- and percent-encoded (either
    hex case), JSON-escaped (ASCII or not, ``/`` escaped as PHP does), HTML-escaped."""
    percent = {quote(value, safe=""), quote(value), quote_plus(value)}
    percent |= {re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), p) for p in percent}
    json_forms = {json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}
    json_forms |= {j.replace("/", "\\/") for j in json_forms}
    markup = {html.escape(value), html.escape(value, quote=False)}
    return {value} | percent | json_forms | markup


class Scrubber:
    """Scrubs the secret values known for one connection from text that came from outside,
    then token shapes (:func:`scrub`).

    Build one per exchange with everything that could be echoed back -- the refresh token
    sent, the client secret, the stored access token, the private key, and the tokens of the
    answer itself -- and pass every piece of provider text through it before it is logged,
    stored or put in an error. Exact matches only (no guessing), longest first, so one value
    inside another leaves no fragment. Holds secret values: never printed, never pickled.
    """

    __slots__ = ("_forms",)

    def __init__(self, values: Iterable[Secret | str | None] = ()) -> None:
        forms: set[str] = set()
        for value in values:
            raw = value.reveal() if isinstance(value, Secret) else value
            if raw is not None and len(raw) >= MIN_KNOWN_VALUE_CHARS:
                forms |= _encoded_forms(raw)
        self._forms = tuple(sorted(forms, key=len, reverse=True))

    def including(self, values: Iterable[Secret | str | None]) -> Scrubber:
        """A scrubber for these values as well as this one's."""
        grown = Scrubber(values)
        grown._forms = tuple(sorted({*self._forms, *grown._forms}, key=len, reverse=True))
        return grown

    @property
    def longest(self) -> int:
        """Length of the longest form scrubbed (to cut text without splitting one)."""
        return len(self._forms[0]) if self._forms else 0

    def __call__(self, text: str) -> str:
        for form in self._forms:
            if form in text:
                text = text.replace(form, REDACTED)
        return scrub(text)

    def __repr__(self) -> str:
        return f"Scrubber({len(self._forms)} forms)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("Scrubber holds secret values and is not picklable")


def is_sensitive_key(key: str) -> bool:
    return key not in SAFE_KEYS and bool(SENSITIVE_KEY_RE.search(key))
