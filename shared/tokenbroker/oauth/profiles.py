"""Provider profiles: data describing each provider's token endpoint and its quirks."""

from __future__ import annotations

import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

from tokenbroker.kernel.errors import ConfigError
from tokenbroker.kernel.fields import FieldReader
from tokenbroker.kernel.model import UNREFRESHED_GRANTS, ClientAuthMethod, Connection, GrantType
from tokenbroker.ports import MAX_BUDGET_LIMIT, MAX_BUDGET_WINDOW


@dataclass(frozen=True)
class ProfileParam:
    description: str = ""
    default: str | None = None
    #: When set, the connection's value must be a key here and the template gets the mapped value.
    values: Mapping[str, str] | None = None


class BudgetScope(StrEnum):
    """What a provider counts its token-endpoint limit against (``refresh/budget.py`` turns
    it into a budget key)."""

    #: Each refresh token (Zoho: "up to ten access tokens in a span of ten minutes" per
    #: refresh token). Connections sharing one refresh token share its budget.
    REFRESH_TOKEN = "refresh_token"  # noqa: S105 - a scope name
    #: Each OAuth client (``client_id``) at one token endpoint.
    CLIENT = "client"
    #: Each token endpoint, whoever calls it (one Zoho data centre's accounts server).
    ENDPOINT = "endpoint"


@dataclass(frozen=True)
class TokenBudget:
    """At most ``limit`` token requests in any span of ``window``, counted ``per`` scope
    across every refresher sharing the state store (``StateStore.take_budget``)."""

    per: BudgetScope
    limit: int
    window: timedelta


@dataclass(frozen=True)
class ProviderProfile:
    name: str
    grants: tuple[GrantType, ...]
    auth_method: ClientAuthMethod = ClientAuthMethod.BASIC
    token_url: str | None = None
    description: str = ""
    default_lifetime_seconds: int = 3600
    rotates_refresh_tokens: bool = True
    supports_scope_narrowing: bool = False
    error_aliases: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, ProfileParam] = field(default_factory=dict)
    #: The provider's documented limit on token requests, if it has one.
    budget: TokenBudget | None = None

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


def _parse_budget(data: object, where: str) -> TokenBudget:
    reader = FieldReader(data, where)
    per = reader.choice("per", BudgetScope)
    limit = reader.integer("limit", minimum=1)
    if limit > MAX_BUDGET_LIMIT:
        raise ConfigError(f"{reader.path('limit')}: must be at most {MAX_BUDGET_LIMIT}")
    seconds = reader.integer("window_seconds", minimum=1)
    if seconds > MAX_BUDGET_WINDOW.total_seconds():
        raise ConfigError(
            f"{reader.path('window_seconds')}: must be at most "
            f"{int(MAX_BUDGET_WINDOW.total_seconds())} ({MAX_BUDGET_WINDOW.days} days)"
        )
    reader.finish()
    return TokenBudget(per=per, limit=limit, window=timedelta(seconds=seconds))


def parse_profile(name: str, data: object, where: str) -> ProviderProfile:
    reader = FieldReader(data, where)
    params_table = reader.table("params", {})
    budget_table = reader.table("budget", None)
    profile = ProviderProfile(
        name=name,
        description=reader.text("description", ""),
        token_url=reader.text("token_url", None),
        grants=reader.choices("grants", GrantType),
        auth_method=reader.choice("auth_method", ClientAuthMethod, ClientAuthMethod.BASIC),
        default_lifetime_seconds=reader.integer("default_lifetime_seconds", 3600, minimum=1),
        rotates_refresh_tokens=reader.flag("rotates_refresh_tokens", True),
        supports_scope_narrowing=reader.flag("supports_scope_narrowing", False),
        error_aliases=reader.strings("error_aliases", {}),
        params={k: _parse_param(v, f"{where}.params.{k}") for k, v in params_table.items()},
        budget=None if budget_table is None else _parse_budget(budget_table, f"{where}.budget"),
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
