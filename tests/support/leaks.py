"""Whether a secret can be read back from a text: the oracle of the relay's redaction tests.

Independent of the relay's own redactor on purpose: it does not enumerate the encoded forms of
the secret, it decodes the text every way an attacker would (percent, form, JSON, HTML,
base64 of either alphabet at every alignment, hex), twice over, and looks for any few
consecutive characters of the secret in the results.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import contextlib
import html
import re
import warnings
from urllib.parse import unquote, unquote_plus

_B64_RUN = re.compile(r"[A-Za-z0-9+/_-]{4,}={0,2}")
_HEX_RUN = re.compile(r"[0-9A-Fa-f]{12,}")


def _decodings(text: str) -> set[str]:
    """``text`` and what it reads as under each decoding an attacker would try (percent, form,
    JSON, HTML, base64 in both alphabets at every alignment, hex), twice over."""
    seen = {text}
    for _ in range(2):
        grown = set(seen)
        for item in seen:
            grown |= {unquote(item), unquote_plus(item), html.unescape(item)}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # "\\X" is not an escape
                with contextlib.suppress(ValueError):
                    grown.add(codecs.decode(item, "unicode_escape"))
            for run in _B64_RUN.findall(item):
                bare = run.rstrip("=")
                for start in range(4):
                    chunk = bare[start:]
                    chunk = chunk[: len(chunk) - len(chunk) % 4 or None]
                    chunk = chunk if len(chunk) % 4 != 1 else chunk[:-1]
                    for alphabet in (None, b"-_"):
                        try:
                            padded = chunk + "=" * (-len(chunk) % 4)
                            raw = base64.b64decode(padded, altchars=alphabet)
                        except (binascii.Error, ValueError):
                            continue
                        grown.add(raw.decode("latin-1"))
                        grown.add(raw.decode("utf-8", "replace"))
            for run in _HEX_RUN.findall(item):
                for start in (0, 1):
                    chunk = run[start:]
                    chunk = chunk[: len(chunk) // 2 * 2]
                    raw = bytes.fromhex(chunk)
                    grown.add(raw.decode("latin-1"))
                    grown.add(raw.decode("utf-8", "replace"))
        seen = grown
    return seen


def recoverable(text: str | bytes, secret: str, window: int = 6) -> bool:
    """Whether any ``window`` consecutive characters of ``secret``, in any case, can be read
    back from ``text`` by one of :func:`_decodings`."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    pieces = {secret[i : i + window].lower() for i in range(max(1, len(secret) - window + 1))}
    # Case-folded: a provider may quote a value upper- or lower-cased.
    return any(piece in decoded.lower() for decoded in _decodings(text) for piece in pieces)


def b64(data: str, *, url: bool = False, pad: bool = True) -> str:
    """``data`` (UTF-8) in base64, standard or URL-safe, padded or not."""
    encoded = (base64.urlsafe_b64encode if url else base64.b64encode)(data.encode()).decode()
    return encoded if pad else encoded.rstrip("=")
