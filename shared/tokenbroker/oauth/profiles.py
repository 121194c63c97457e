"""Provider profiles: data describing each provider's token endpoint and its quirks.

A profile says what the protocol leaves to each provider (RFC 6749 §5.1 leaves the default
lifetime to its documentation, §6 whether refresh tokens rotate) and what a provider does
beyond it: its own throttling answers, its documented limits, how briefly it still accepts a
refresh token it has replaced, and how many token requests the broker may spend on it. The
figures live in ``profiles.toml``, each with the provider document it comes from; parsing is
strict, so a typo or an absurd number is a :class:`ConfigError` naming the field, never a
silently different behaviour.
"""

from __future__ import annotations

import math
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

from tokenbroker.kernel.errors import ConfigError
from tokenbroker.kernel.fields import FieldReader
from tokenbroker.kernel.http import MAX_RETRY_AFTER_SECONDS
from tokenbroker.kernel.model import UNREFRESHED_GRANTS, ClientAuthMethod, Connection, GrantType
from tokenbroker.oauth.token_response import DEFAULT_LIFETIME_SECONDS, AnswerRules, ThrottleRule

#: A default lifetime outside these bounds is a mistake: under a minute refreshes in a loop,
#: over a day is not conservative for a figure used only when the provider states none.
MIN_DEFAULT_LIFETIME_SECONDS = 60
MAX_DEFAULT_LIFETIME_SECONDS = 86400
#: Providers that document a reuse grace window allow at most a minute (Okta's leeway, AWS
#: Cognito's RetryGracePeriodSeconds); an hour is beyond anything that is a grace.
MAX_REUSE_GRACE_SECONDS = 3600
#: A budget counts requests in a window the state store keeps: at most a day.
MAX_BUDGET_WINDOW_SECONDS = 86400
MAX_BUDGET_REQUESTS = 1_000_000


class BudgetScope(StrEnum):
    """What a token-endpoint budget is counted per."""

    #: Per refresh token, i.e. per connection (Zoho: access tokens per refresh token).
    REFRESH_TOKEN = "refresh_token"  # noqa: S105 - a scope name
    #: Per OAuth client (``client_id``), across its connections.
    CLIENT = "client"
    #: Per token endpoint URL, across clients.
    TOKEN_ENDPOINT = "token_endpoint"  # noqa: S105 - a scope name


@dataclass(frozen=True)
class TokenEndpointBudget:
    """At most ``requests`` token requests per ``per_seconds``, counted per ``scope``.

    What the broker allows itself, enforced across instances through the state store (over
    budget: the refresh is deferred, not failed). Parsed and checked here; kept within the
    provider's documented limit when the profile states one.
    """

    requests: int
    per_seconds: int
    scope: BudgetScope


@dataclass(frozen=True)
class ProviderLimits:
    """A provider's documented limits, as data (``None``: not documented).

    Informational except where a budget is checked against them; they explain failures an
    operator would otherwise find mysterious (the 21st Zoho refresh token deletes the first).
    """

    #: Access tokens one refresh token may obtain per ``access_tokens_window_seconds``.
    access_tokens_per_refresh_token: int | None = None
    access_tokens_window_seconds: int | None = None
    #: Access tokens alive at once per refresh token; a new one beyond it retires the oldest.
    active_access_tokens_per_refresh_token: int | None = None
    #: Refresh tokens alive at once per user (and client); a new one retires the oldest.
    refresh_tokens_per_user: int | None = None


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
    #: Lifetime of an access token whose answer states none (no ``expires_in``, not a JWT).
    default_lifetime_seconds: int = DEFAULT_LIFETIME_SECONDS
    #: Whether a refresh retires the refresh token it used (RFC 6749 §6 lets the server
    #: choose). ``True`` unless the provider documents otherwise: never reuse blindly.
    rotates_refresh_tokens: bool = True
    #: Seconds the provider still accepts the previous refresh token after rotating it (Okta's
    #: leeway). 0: none -- presenting it again is reuse, which revokes the grant (RFC 9700
    #: §4.14.2). Only with ``rotates_refresh_tokens``.
    refresh_token_reuse_grace_seconds: int = 0
    supports_scope_narrowing: bool = False
    error_aliases: Mapping[str, str] = field(default_factory=dict)
    #: The provider's own "too many requests" answers (transient, never ``needs_reauth``).
    throttle: ThrottleRule | None = None
    limits: ProviderLimits = field(default_factory=ProviderLimits)
    #: What the broker may spend at this token endpoint (``None``: no budget).
    budget: TokenEndpointBudget | None = None
    params: Mapping[str, ProfileParam] = field(default_factory=dict)
    #: The authorization endpoint (RFC 6749 §3.1) for the authorization-code flow, a template
    #: over ``params`` like ``token_url`` (``None``: the profile cannot connect accounts).
    authorization_url: str | None = None
    #: Extra query parameters the provider needs on the authorization request (Google and
    #: Zoho: ``access_type=offline`` for a refresh token, ``prompt=consent`` to get one again).
    authorize_params: Mapping[str, str] = field(default_factory=dict)
    #: Callback parameters that say where the account lives, each naming the profile param it
    #: sets (Zoho: ``accounts-server`` -> ``data_centre``). The callback's value is a URL whose
    #: host must be one of that param's ``values``; anything else is refused (a mix-up: RFC
    #: 9700 §4.4 -- the code and client secret would go to a server the profile does not know).
    callback_params: Mapping[str, str] = field(default_factory=dict)
    #: The device authorization endpoint (RFC 8628 §3.1), a template like ``token_url``
    #: (``None``: the provider has no RFC 8628 flow; ``tokenbroker authorize --device``
    #: refuses).
    device_authorization_url: str | None = None

    @property
    def answer_rules(self) -> AnswerRules:
        """How to read this provider's token answers (the grants take these)."""
        return AnswerRules(
            error_aliases=self.error_aliases,
            throttle=self.throttle,
            default_lifetime_seconds=self.default_lifetime_seconds,
            rotates_refresh_tokens=self.rotates_refresh_tokens,
        )

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
        return self._format(self.token_url, connection)

    def authorization_url_for(self, connection: Connection) -> str:
        """The authorization endpoint for a connection (the profile's template over its
        params; the generic profile takes it from ``params.authorization_url``)."""
        if not self.authorization_url:
            raise ConfigError(
                f"profile {self.name!r} has no authorization_url: it cannot connect accounts "
                "through the authorization-code flow"
            )
        return self._format(self.authorization_url, connection)

    def device_authorization_url_for(self, connection: Connection) -> str:
        """The device authorization endpoint for a connection (RFC 8628 §3.1; the generic
        profile takes it from ``params.device_authorization_url``)."""
        if not self.device_authorization_url:
            raise ConfigError(
                f"profile {self.name!r} has no device_authorization_url: it cannot connect "
                "accounts through the device authorization grant (RFC 8628); use the browser "
                "flow (tokenbroker authorize without --device)"
            )
        return self._format(self.device_authorization_url, connection)

    def _format(self, template: str, connection: Connection) -> str:
        params = self.resolve_params(connection.params)
        substitutions = {
            name: (
                spec.values[params[name]] if spec.values and name in params else params.get(name)
            )
            for name, spec in self.params.items()
        }
        needed = [f for _, f, _, _ in string.Formatter().parse(template) if f]
        missing = [n for n in needed if not substitutions.get(n)]
        if missing:
            raise ConfigError(
                f"connection {connection.id!r}: params.{missing[0]} is required for profile "
                f"{self.name!r}"
            )
        return template.format(**substitutions)

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


def _parse_throttle(data: object, where: str) -> ThrottleRule:
    reader = FieldReader(data, where)
    rule = ThrottleRule(
        errors=frozenset(e.strip().casefold() for e in reader.texts("errors", ())),
        descriptions=tuple(d.casefold() for d in reader.texts("descriptions", ())),
        retry_after_seconds=reader.integer(
            "retry_after_seconds", 60, minimum=1, maximum=int(MAX_RETRY_AFTER_SECONDS)
        ),
    )
    reader.finish()
    if not rule.errors and not rule.descriptions:
        raise ConfigError(f"{where}: list the throttling errors or descriptions")
    return rule


def _parse_limits(data: object, where: str) -> ProviderLimits:
    reader = FieldReader(data, where)
    limits = ProviderLimits(
        **{
            name: reader.integer(name, None, minimum=1, maximum=MAX_BUDGET_REQUESTS)
            for name in (
                "access_tokens_per_refresh_token",
                "access_tokens_window_seconds",
                "active_access_tokens_per_refresh_token",
                "refresh_tokens_per_user",
            )
        }
    )
    reader.finish()
    if (limits.access_tokens_per_refresh_token is None) != (
        limits.access_tokens_window_seconds is None
    ):
        raise ConfigError(
            f"{where}: access_tokens_per_refresh_token and access_tokens_window_seconds go together"
        )
    return limits


def _parse_budget(data: object, where: str) -> TokenEndpointBudget:
    reader = FieldReader(data, where)
    budget = TokenEndpointBudget(
        requests=reader.integer("requests", minimum=1, maximum=MAX_BUDGET_REQUESTS),
        per_seconds=reader.integer("per_seconds", minimum=1, maximum=MAX_BUDGET_WINDOW_SECONDS),
        scope=reader.choice("scope", BudgetScope),
    )
    reader.finish()
    return budget


def _check_budget(budget: TokenEndpointBudget, limits: ProviderLimits, where: str) -> None:
    """A budget must not allow what the provider documents it refuses: in any window of the
    provider's length, ``requests`` per ``per_seconds`` can add up to
    ``requests * ceil(window / per_seconds)``."""
    limit, window = limits.access_tokens_per_refresh_token, limits.access_tokens_window_seconds
    if budget.scope is not BudgetScope.REFRESH_TOKEN or limit is None or window is None:
        return
    worst = budget.requests * math.ceil(window / budget.per_seconds)
    if worst > limit:
        raise ConfigError(
            f"{where}: {budget.requests} per {budget.per_seconds} s allows {worst} requests in "
            f"{window} s, beyond the documented limit of {limit} "
            "(limits.access_tokens_per_refresh_token)"
        )


def parse_profile(name: str, data: object, where: str) -> ProviderProfile:
    reader = FieldReader(data, where)
    params_table = reader.table("params", {})
    throttle = reader.table("throttle", None)
    limits = reader.table("limits", None)
    budget = reader.table("budget", None)
    profile = ProviderProfile(
        name=name,
        description=reader.text("description", ""),
        token_url=reader.text("token_url", None),
        grants=reader.choices("grants", GrantType),
        auth_method=reader.choice("auth_method", ClientAuthMethod, ClientAuthMethod.BASIC),
        default_lifetime_seconds=reader.integer(
            "default_lifetime_seconds",
            DEFAULT_LIFETIME_SECONDS,
            minimum=MIN_DEFAULT_LIFETIME_SECONDS,
            maximum=MAX_DEFAULT_LIFETIME_SECONDS,
        ),
        rotates_refresh_tokens=reader.flag("rotates_refresh_tokens", True),
        refresh_token_reuse_grace_seconds=reader.integer(
            "refresh_token_reuse_grace_seconds", 0, minimum=0, maximum=MAX_REUSE_GRACE_SECONDS
        ),
        supports_scope_narrowing=reader.flag("supports_scope_narrowing", False),
        error_aliases=reader.strings("error_aliases", {}),
        throttle=_parse_throttle(throttle, f"{where}.throttle") if throttle is not None else None,
        limits=_parse_limits(limits, f"{where}.limits") if limits is not None else ProviderLimits(),
        budget=_parse_budget(budget, f"{where}.budget") if budget is not None else None,
        params={k: _parse_param(v, f"{where}.params.{k}") for k, v in params_table.items()},
        authorization_url=reader.text("authorization_url", None),
        authorize_params=reader.strings("authorize_params", {}),
        callback_params=reader.strings("callback_params", {}),
        device_authorization_url=reader.text("device_authorization_url", None),
    )
    reader.finish()
    for callback, param in profile.callback_params.items():
        spec = profile.params.get(param)
        if spec is None or spec.values is None:
            raise ConfigError(
                f"{where}.callback_params.{callback}: {param!r} must be a param with values"
            )
    if not profile.grants:
        raise ConfigError(f"{where}.grants: list at least one grant")
    if profile.refresh_token_reuse_grace_seconds and not profile.rotates_refresh_tokens:
        raise ConfigError(
            f"{where}.refresh_token_reuse_grace_seconds: a grace window only exists for "
            "rotating refresh tokens (set rotates_refresh_tokens = true, or 0)"
        )
    if profile.budget is not None:
        _check_budget(profile.budget, profile.limits, f"{where}.budget")
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
