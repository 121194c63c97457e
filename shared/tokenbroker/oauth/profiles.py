"""Provider profiles: data describing each provider's token endpoint and its quirks."""

from __future__ import annotations

import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tokenbroker.kernel.errors import ConfigError
from tokenbroker.kernel.fields import FieldReader
from tokenbroker.kernel.model import UNREFRESHED_GRANTS, ClientAuthMethod, Connection, GrantType


@dataclass(frozen=True)
class ProfileParam:
    description: str = ""
    default: str | None = None
    #: When set, the connection's value must be a key here and the template gets the mapped value.
    values: Mapping[str, str] | None = None


@dataclass(frozen=True)
class ProviderProfile:
    name: str
    grants: tuple[GrantType, ...]
    auth_method: ClientAuthMethod = ClientAuthMethod.BASIC
    token_url: str | None = None
    description: str = ""
    default_lifetime_seconds: int = 3600
    rotates_refresh_tokens: bool = True
    #: How long the provider still accepts a refresh token after rotating it (some do, for
    #: exactly the case of a lost answer). Within it, a refresh whose outcome is unknown is
    #: retried to recover; 0 (the default, the safe assumption) means reuse is theft.
    refresh_token_reuse_grace_seconds: int = 0
    supports_scope_narrowing: bool = False
    error_aliases: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, ProfileParam] = field(default_factory=dict)

    def resolve_params(self, given: Mapping[str, str], where: str = "params") -> dict[str, str]:
        """The connection's params checked against this profile, defaults filled in."""
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            allowed = ", ".join(sorted(self.params)) or "none"
            raise ConfigError(
                f"{where}: unknown parameter(s) {', '.join(unknown)} for profile "
                f"{self.name!r} (allowed: {allowed})"
            )
        resolved: dict[str, str] = {}
        for name, spec in self.params.items():
            value = given.get(name, spec.default)
            if value is None:
                continue
            if spec.values is not None and value not in spec.values:
                raise ConfigError(
                    f"{where}.{name}: {value!r} is not one of: {', '.join(spec.values)}"
                )
            resolved[name] = value
        return resolved

    def token_url_for(self, connection: Connection) -> str:
        """The token endpoint for a connection: its own ``token_url``, else the template."""
        if connection.token_url:
            return connection.token_url
        if not self.token_url:
            raise ConfigError(
                f"connection {connection.id!r}: token_url is required for profile {self.name!r}"
            )
        params = self.resolve_params(connection.params)
        substitutions = {
            name: (
                spec.values[params[name]] if spec.values and name in params else params.get(name)
            )
            for name, spec in self.params.items()
        }
        needed = [f for _, f, _, _ in string.Formatter().parse(self.token_url) if f]
        missing = [n for n in needed if not substitutions.get(n)]
        if missing:
            raise ConfigError(
                f"connection {connection.id!r}: params.{missing[0]} is required for profile "
                f"{self.name!r}"
            )
        return self.token_url.format(**substitutions)

    def auth_method_for(self, connection: Connection) -> ClientAuthMethod:
        return connection.auth_method or self.auth_method

    def check_connection(self, connection: Connection) -> None:
        if connection.grant not in self.grants:
            allowed = ", ".join(g.value for g in self.grants)
            raise ConfigError(
                f"grant: {connection.grant.value!r} is not supported by profile {self.name!r}"
                f" (supported: {allowed})"
            )
        params = self.resolve_params(connection.params)
        if connection.grant is GrantType.IMPERSONATION and not params.get("service_account"):
            raise ConfigError("params.service_account is required for impersonation")
        if connection.grant not in UNREFRESHED_GRANTS:
            self.token_url_for(connection)


def _parse_param(data: object, where: str) -> ProfileParam:
    reader = FieldReader(data, where)
    param = ProfileParam(
        description=reader.text("description", ""),
        default=reader.text("default", None),
        values=reader.strings("values", None),
    )
    reader.finish()
    return param


def parse_profile(name: str, data: object, where: str) -> ProviderProfile:
    reader = FieldReader(data, where)
    params_table = reader.table("params", {})
    profile = ProviderProfile(
        name=name,
        description=reader.text("description", ""),
        token_url=reader.text("token_url", None),
        grants=reader.choices("grants", GrantType),
        auth_method=reader.choice("auth_method", ClientAuthMethod, ClientAuthMethod.BASIC),
        default_lifetime_seconds=reader.integer("default_lifetime_seconds", 3600, minimum=1),
        rotates_refresh_tokens=reader.flag("rotates_refresh_tokens", True),
        refresh_token_reuse_grace_seconds=reader.integer(
            "refresh_token_reuse_grace_seconds", 0, minimum=0
        ),
        supports_scope_narrowing=reader.flag("supports_scope_narrowing", False),
        error_aliases=reader.strings("error_aliases", {}),
        params={k: _parse_param(v, f"{where}.params.{k}") for k, v in params_table.items()},
    )
    reader.finish()
    if not profile.grants:
        raise ConfigError(f"{where}.grants: list at least one grant")
    return profile


def parse_profiles(data: Mapping[str, Any], where: str = "profiles") -> dict[str, ProviderProfile]:
    return {name: parse_profile(name, body, f"{where}.{name}") for name, body in data.items()}


def load_profiles(extra_file: Path | None = None) -> dict[str, ProviderProfile]:
    """Built-in profiles, overlaid with the tables of ``extra_file`` when given."""
    raw = resources.files("tokenbroker.oauth").joinpath("profiles.toml").read_text()
    profiles = parse_profiles(tomllib.loads(raw), "profiles")
    if extra_file is not None:
        try:
            extra = tomllib.loads(extra_file.read_text())
        except OSError as exc:
            raise ConfigError(f"profiles file {extra_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"profiles file {extra_file}: {exc}") from None
        profiles.update(parse_profiles(extra, str(extra_file)))
    return profiles
