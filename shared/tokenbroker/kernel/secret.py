"""A string type for credential material that refuses to print itself.

``repr()`` and ``str()`` show a short SHA-256 fingerprint, never the value, so a
``Secret`` that reaches a log line, an f-string, an exception or a CLI table leaks nothing.
The value is only available through :meth:`Secret.reveal`, which makes every use greppable.
(The fingerprint follows google-auth's ``_hash_sensitive_info``: enough to correlate, not to
recover.)
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, NoReturn


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        self._value = value

    def reveal(self) -> str:
        """The secret value. Call only at the point of use (an HTTP body, an encryption)."""
        return self._value

    @property
    def fingerprint(self) -> str:
        return "sha256:" + hashlib.sha256(self._value.encode()).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"Secret({self.fingerprint})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> NoReturn:
        raise TypeError("Secret values are not picklable")

    def __getstate__(self) -> Any:
        raise TypeError("Secret values are not picklable")
