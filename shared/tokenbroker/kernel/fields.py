"""Strict reading of configuration mappings: unknown fields are errors, and every error names
the field by its full path (``profiles.zoho.grants[1]``)."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any, TypeVar

from tokenbroker.kernel.errors import ConfigError

E = TypeVar("E", bound=Enum)
_MISSING: Any = object()


class _Absent(Exception):
    def __init__(self, default: Any) -> None:
        self.default = default


def _defaulting(method: Any) -> Any:
    """Getter decorator: an absent optional field yields its default without type checks."""

    def wrapper(self: FieldReader, name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, name, *args, **kwargs)
        except _Absent as absent:
            return absent.default

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


class FieldReader:
    """Takes fields out of one mapping; :meth:`finish` rejects whatever was not taken."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a table/object, got {type(data).__name__}")
        self._data: Mapping[str, Any] = data
        self._where = where
        self._taken: set[str] = set()

    def path(self, name: str) -> str:
        return f"{self._where}.{name}" if self._where else name

    def _get(self, name: str, default: Any) -> Any:
        self._taken.add(name)
        if name not in self._data:
            if default is _MISSING:
                raise ConfigError(f"{self.path(name)}: required field is missing")
            raise _Absent(default)
        return self._data[name]

    @_defaulting
    def text(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.path(name)}: expected a non-empty string")
        return value

    @_defaulting
    def flag(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.path(name)}: expected true or false")
        return value

    @_defaulting
    def integer(
        self,
        name: str,
        default: Any = _MISSING,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> Any:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.path(name)}: expected an integer")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self.path(name)}: must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{self.path(name)}: must be at most {maximum}")
        return value

    @_defaulting
    def texts(self, name: str, default: Any = _MISSING) -> tuple[str, ...]:
        """A list of non-empty strings."""
        value = self._get(name, default)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{self.path(name)}: expected a list of strings")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise ConfigError(f"{self.path(name)}[{i}]: expected a non-empty string")
        return tuple(value)

    @_defaulting
    def choice(self, name: str, kind: type[E], default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        return parse_enum(kind, value, self.path(name))

    @_defaulting
    def choices(self, name: str, kind: type[E], default: Any = _MISSING) -> tuple[E, ...]:
        value = self._get(name, default)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{self.path(name)}: expected a list")
        return tuple(parse_enum(kind, v, f"{self.path(name)}[{i}]") for i, v in enumerate(value))

    @_defaulting
    def strings(self, name: str, default: Any = _MISSING) -> dict[str, str]:
        value = self._get(name, default)
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(f"{self.path(name)}: expected a table of strings")
        return dict(value)

    @_defaulting
    def table(self, name: str, default: Any = _MISSING) -> Mapping[str, Any]:
        value = self._get(name, default)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{self.path(name)}: expected a table/object")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._taken)
        if unknown:
            names = ", ".join(self.path(u) for u in unknown)
            raise ConfigError(f"unknown field(s): {names}")


def parse_enum(kind: type[E], value: object, where: str) -> E:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in kind)
        raise ConfigError(f"{where}: {value!r} is not one of: {allowed}") from None


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """``text`` with A-Z lower-cased and nothing else changed. For identities (emails,
    domains): ``str.lower`` follows Unicode, where a KELVIN SIGN (U+212A) becomes ``k``, so
    two different identities would compare equal."""
    return text.translate(_ASCII_LOWER)
