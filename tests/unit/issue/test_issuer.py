"""The issuer's logic on in-memory stores: modes, caching, invalidation and errors."""

from __future__ import annotations

import asyncio
import io
import json
import random
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from tests.unit.issue.fakes import FakeVerifier
from tokenbroker.adapters.fake_provider import FakeTokenServer
from tokenbroker.adapters.memory import MemorySecretStore, MemoryStateStore
from tokenbroker.entrypoints.answers import http_answer
from tokenbroker.issue.issuer import TokenIssuer
from tokenbroker.issue.policy_file import parse_policy_text
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import (
    BadRequest,
    CredentialUnavailable,
    NeedsReauth,
    PolicyDenied,
    TokenBrokerError,
)
from tokenbroker.kernel.log import configure_logging
from tokenbroker.kernel.metrics import Distribution
from tokenbroker.kernel.model import Connection, ConnectionStatus, Credential, GrantType
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.profiles import load_profiles
from tokenbroker.refresh.registry import ConnectionRegistry

WORKER = "worker@p.iam.gserviceaccount.com"
POLICY = f"""
version = 1
[[grants]]
callers = ["{WORKER}"]
connections = ["crm"]
scopes = ["*"]
max_lifetime_seconds = 1800
[[grants]]
callers = ["{WORKER}"]
connections = ["gmail"]
scopes = ["read", "send"]
"""


class CountingSecrets(MemorySecretStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def get(self, connection_id: str) -> Any:
        self.reads += 1
        return super().get(connection_id)


class World:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.secrets = CountingSecrets()
        self.state = MemoryStateStore()
        self.server = FakeTokenServer(rotate=False)
        profiles = load_profiles()
        registry = ConnectionRegistry(
            secrets=self.secrets, state=self.state, profiles=profiles, clock=self.clock
        )
        now = self.clock.now()
        registry.register(
            Connection(id="crm", profile="generic", grant=GrantType.REFRESH_TOKEN,
                       client_id="client", token_url="https://idp.test/token"),
            Credential(refresh_token=Secret(self.server.seed_refresh_token()),
                       client_secret=Secret("client-secret"), access_token=Secret("AT-FULL-1"),
                       obtained_at=now, expires_at=now + timedelta(hours=1), scope=("all",)),
        )  # fmt: skip
        self.gmail_rt = self.server.seed_refresh_token(scope="read send admin")
        registry.register(
            Connection(id="gmail", profile="google", grant=GrantType.REFRESH_TOKEN,
                       client_id="client", scopes=("read", "send", "admin"),
                       token_url="https://google.test/token"),
            Credential(refresh_token=Secret(self.gmail_rt), client_secret=Secret("client-secret")),
        )  # fmt: skip
        self.issuer = TokenIssuer(
            verifier=FakeVerifier(),
            policy=parse_policy_text(POLICY),
            state=self.state,
            secrets=self.secrets,
            profiles=profiles,
            endpoint=self.server,
            clock=self.clock,
            rng=random.Random(1),
        )

    def issue(self, body: dict[str, Any], caller: str = WORKER) -> Any:
        return asyncio.run(self.issuer.issue(f"Bearer {caller}", json.dumps(body).encode()))


@pytest.fixture
def world() -> World:
    return World()


def test_full_scope_pass_through_is_bounded_and_cached(world: World) -> None:
    token = world.issue({"connection": "crm"})
    assert token.access_token == Secret("AT-FULL-1")
    assert token.expires_at == world.clock.now() + timedelta(seconds=1800)  # policy bound
    assert world.clock.now() < token.refresh_after < token.expires_at
    for _ in range(999):
        assert world.issue({"connection": "crm"}).access_token == Secret("AT-FULL-1")
    assert world.secrets.reads / 1000 <= 0.01


def test_a_newer_version_invalidates_the_cache(world: World) -> None:
    world.issue({"connection": "crm"})
    current = world.secrets.get("crm")
    now = world.clock.now()
    version = world.secrets.put(
        "crm",
        current.credential.with_token(access_token=Secret("AT-FULL-2"), obtained_at=now,
                                      expires_at=now + timedelta(hours=1)),
        expected_version=current.version,
    )  # fmt: skip
    record = world.state.get("crm")
    from dataclasses import replace

    world.state.put_state("crm", replace(record.state, current_version=version))
    world.clock.advance(31)  # past the version-check interval
    assert world.issue({"connection": "crm"}).access_token == Secret("AT-FULL-2")


def test_narrowing_refresh_asks_for_the_subset_and_caches_per_scope_set(world: World) -> None:
    read = world.issue({"connection": "gmail", "scopes": ["read"]})
    assert read.scope == ("read",)
    assert world.server.requests["refresh_token"] == 1
    both = world.issue({"connection": "gmail"})  # no scopes: what the policy grants
    assert both.scope == ("read", "send")
    assert world.server.requests["refresh_token"] == 2
    assert (
        world.issue({"connection": "gmail", "scopes": ["read"]}).access_token == read.access_token
    )
    assert world.server.requests["refresh_token"] == 2  # served from the cache
    # The refresh token never changed hands and still works.
    assert world.server.grant_alive(world.gmail_rt)


@pytest.mark.parametrize(
    ("body", "caller", "error"),
    [
        ({"connection": "gmail", "scopes": ["admin"]}, WORKER, PolicyDenied),  # escalation
        ({"connection": "gmail", "scopes": ["read", "admin"]}, WORKER, PolicyDenied),
        ({"connection": "crm"}, "other@p.iam.gserviceaccount.com", PolicyDenied),
        ({"connection": "ghost"}, WORKER, PolicyDenied),
        ({"connection": "crm", "min_ttl_seconds": 7200}, WORKER, PolicyDenied),
        ({"connection": ""}, WORKER, BadRequest),
        ({"scopes": ["read"]}, WORKER, BadRequest),
        ({"connection": "crm", "scopes": "read"}, WORKER, BadRequest),
        ({"connection": "crm", "min_ttl_seconds": True}, WORKER, BadRequest),
    ],
)
def test_denials_and_bad_requests(
    world: World, body: dict[str, Any], caller: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        world.issue(body, caller)


def test_needs_reauth_is_a_409(world: World) -> None:
    from dataclasses import replace

    record = world.state.get("crm")
    world.state.put_state("crm", replace(record.state, status=ConnectionStatus.NEEDS_REAUTH))
    with pytest.raises(NeedsReauth) as caught:
        world.issue({"connection": "crm"})
    assert http_answer(caught.value, public=True).status == 409


def test_a_token_that_expires_too_soon_is_a_503_with_retry_after(world: World) -> None:
    world.clock.advance(3600 - 10)
    with pytest.raises(CredentialUnavailable) as caught:
        world.issue({"connection": "crm", "min_ttl_seconds": 60})
    answer = http_answer(caught.value, public=True)
    status, body, headers = answer.status, answer.body, answer.headers
    assert status == 503
    assert body["error"] == "temporarily_unavailable"
    assert int(headers["Retry-After"]) > 0


def test_rendered_answer_matches_the_json_form_as_time_passes(world: World) -> None:
    token = world.issue({"connection": "crm"})
    for step in (0, 1, 899, 2000):
        now = world.clock.now() + timedelta(seconds=step)
        assert json.loads(token.render(now)) == token.to_json(now)


@pytest.fixture
def log() -> Iterator[io.StringIO]:
    """What the library logs during the test (debug level); the session capture file still
    gets every line for the end-of-session leak scan."""
    stream = io.StringIO()
    configure_logging("debug", stream=stream)
    yield stream
    configure_logging()


def test_a_narrowing_refresh_that_rotates_writes_nothing_and_still_answers(
    world: World, log: io.StringIO
) -> None:
    """The issuer's read path never writes credentials: only a leased refresher may. A
    provider that rotates on a narrowing refresh (its profile says it does not) leaves the
    store as it was; the operator learns of it from an error naming the connection."""
    world.server.rotate = True  # the provider rotates after all
    before = world.secrets.get("gmail")
    versions = world.secrets.versions("gmail")
    token = world.issue({"connection": "gmail", "scopes": ["read"]})

    assert token.scope == ("read",)  # the caller is still answered
    assert token.access_token.reveal() in world.server.issued
    after = world.secrets.get("gmail")
    assert after.version == before.version
    assert world.secrets.versions("gmail") == versions  # no new version
    assert after.credential == before.credential
    assert world.state.get("gmail").state.current_version == before.version
    rotated = [t for t in world.server.issued if t.startswith("rt-") and t != world.gmail_rt]
    assert rotated, "the fake provider rotated"
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    errors = [line for line in lines if line["severity"] == "ERROR"]
    assert [e["connection"] for e in errors] == ["gmail"]
    assert "rotat" in errors[0]["message"]
    for value in world.server.issued:
        assert value not in log.getvalue()


# --- the narrowing refresh takes the lease (issue 8) -----------------------------------------


def test_a_narrowing_refresh_waits_for_a_refresh_in_flight(world: World) -> None:
    """Every path that presents a refresh token takes the connection's lease: while the
    refresher holds it, the issuer sends nothing and asks the caller to retry shortly."""
    held = world.state.claim(["gmail"], world.clock.now(), holder="refresher", ttl=timedelta(60))
    assert held.claims
    with pytest.raises(CredentialUnavailable) as busy:
        world.issue({"connection": "gmail", "scopes": ["read"]})
    assert busy.value.retry_after is not None and busy.value.retry_after <= 5
    assert world.server.requests["refresh_token"] == 0
    world.state.release(held.claims[0].lease)
    assert world.issue({"connection": "gmail", "scopes": ["read"]}).scope == ("read",)


def test_a_narrowing_refresh_holds_the_lease_while_it_presents_and_gives_it_back(
    world: World,
) -> None:
    seen: list[int] = []
    server = world.server

    class Watching:
        async def post_form(self, url: str, form: Any, *, headers: Any) -> Any:
            other = world.state.claim(["gmail"], world.clock.now(), holder="x", ttl=timedelta(60))
            seen.append(other.leased_elsewhere)
            return await server.post_form(url, form, headers=headers)

    world.issuer.endpoint = Watching()  # type: ignore[assignment]
    world.issue({"connection": "gmail", "scopes": ["read"]})
    assert seen == [1]  # the refresher could not have taken it meanwhile
    after = world.state.claim(["gmail"], world.clock.now(), holder="x", ttl=timedelta(60))
    assert [c.lease.connection_id for c in after.claims] == ["gmail"]  # given back


def test_a_narrowing_refresh_of_a_disabled_connection_sends_nothing(world: World) -> None:
    record = world.state.get("gmail")
    world.state.put_state("gmail", replace(record.state, status=ConnectionStatus.DISABLED))
    with pytest.raises(NeedsReauth):
        world.issue({"connection": "gmail", "scopes": ["read"]})
    assert world.server.requests["refresh_token"] == 0


def test_a_narrowing_refresh_spends_the_token_endpoint_budget_the_refresher_spends(
    world: World,
) -> None:
    """Issue 8, item 8: every path that sends a token request spends the provider's budget,
    through the same state store. Over it, the caller is asked to come back when the slot
    frees (503 with Retry-After), and nothing is sent."""
    from tokenbroker.oauth.profiles import BudgetScope, TokenEndpointBudget

    profiles = dict(world.issuer.profiles)
    profiles["google"] = replace(
        profiles["google"],
        budget=TokenEndpointBudget(requests=1, per_seconds=600, scope=BudgetScope.REFRESH_TOKEN),
    )
    world.issuer.profiles = profiles
    assert world.issue({"connection": "gmail", "scopes": ["read"]}).scope == ("read",)
    with pytest.raises(CredentialUnavailable) as spent:
        world.issue({"connection": "gmail", "scopes": ["send"]})
    assert world.server.requests["refresh_token"] == 1
    assert spent.value.retry_after is not None and 590 <= spent.value.retry_after <= 600
    assert http_answer(spent.value, public=True).status == 503
    # The lease was given back: the refresher is not blocked by a denied caller.
    after = world.state.claim(["gmail"], world.clock.now(), holder="x", ttl=timedelta(60))
    assert [c.lease.connection_id for c in after.claims] == ["gmail"]


ADMIN = "admin@p.iam.gserviceaccount.com"
SCOPED = "scoped@p.iam.gserviceaccount.com"
BRIEF = "brief@p.iam.gserviceaccount.com"
CACHE_POLICY = f"""
version = 1
[[grants]]
callers = ["{ADMIN}"]
connections = ["gmail"]
scopes = ["*"]
max_lifetime_seconds = 3600
[[grants]]
callers = ["{SCOPED}"]
connections = ["gmail"]
scopes = ["read", "send", "admin"]
max_lifetime_seconds = 120
[[grants]]
callers = ["{BRIEF}"]
connections = ["gmail"]
scopes = ["*"]
max_lifetime_seconds = 60
"""


def test_the_cache_never_hands_a_caller_more_than_its_own_decision(world: World) -> None:
    """Issue 9: the cache was keyed on (connection, scopes) and a hit skipped the full-scope
    check: after a ``*`` caller asked for exactly the connection's declared scopes, a caller
    granted those scopes but not full-scope pass-through -- refused a moment before -- got the
    connection's own access token, for its whole lifetime against a 120 s maximum; and a
    caller limited to 60 s got the 3,600 s token minted for another."""
    world.issuer.policy = parse_policy_text(CACHE_POLICY)
    stored, now = world.secrets.get("gmail"), world.clock.now()
    version = world.secrets.put(
        "gmail",
        stored.credential.with_token(access_token=Secret("AT-GMAIL-FULL"), obtained_at=now,
                                     expires_at=now + timedelta(hours=1),
                                     scope=("read", "send", "admin")),
        expected_version=stored.version,
    )  # fmt: skip
    record = world.state.get("gmail")
    world.state.put_state("gmail", replace(record.state, current_version=version))
    everything = {"connection": "gmail", "scopes": ["read", "send", "admin"]}
    with pytest.raises(PolicyDenied):
        world.issue(everything, caller=SCOPED)
    master = world.issue(everything, caller=ADMIN)
    with pytest.raises(PolicyDenied):
        world.issue(everything, caller=SCOPED)  # the cached master token is not its to have
    brief = world.issue(everything, caller=BRIEF)
    assert brief.expires_at <= world.clock.now() + timedelta(seconds=60)
    assert world.issue(everything, caller=ADMIN).access_token == master.access_token


@pytest.mark.parametrize("value", ["-987654321", 'x"expires_in":-987654321', "AT-987654321-y"])
def test_a_token_value_that_looks_like_the_render_marker_is_rendered_intact(value: str) -> None:
    """Issue 9: the cached body was split at the first occurrence of the marker standing in
    for ``expires_in`` -- inside the token value when it held those digits: the caller got a
    corrupted token and a negative ``expires_in``."""
    from datetime import UTC, datetime

    from tokenbroker.issue.issuer import IssuedToken

    now = datetime(2026, 12, 1, tzinfo=UTC)
    token = IssuedToken(
        access_token=Secret(value),
        expires_at=now + timedelta(seconds=600),
        refresh_after=now + timedelta(seconds=300),
        scope=("read",),
        connection="crm",
    )
    body = json.loads(token.render(now + timedelta(seconds=100)))
    assert body["access_token"] == value
    assert body["expires_in"] == 500


def test_a_deeply_nested_request_body_is_a_400(world: World) -> None:
    """Issue 9: a deep JSON body raised RecursionError (a 500, a traceback) instead of 400."""
    deep = b"[" * 5000 + b"]" * 5000
    with pytest.raises(BadRequest):
        asyncio.run(world.issuer.issue(f"Bearer {WORKER}", deep))


# --- status is live (issue 9, item 2) ----------------------------------------------------------


def _set_status(world: World, cid: str, status: ConnectionStatus) -> None:
    record = world.state.get(cid)
    world.state.put_state(cid, replace(record.state, status=status))


@pytest.mark.parametrize(
    ("status", "error"),
    [(ConnectionStatus.DISABLED, NeedsReauth), (ConnectionStatus.NEEDS_REAUTH, NeedsReauth)],
)
def test_a_status_change_stops_cached_tokens_at_the_next_request(
    world: World, status: ConnectionStatus, error: type[Exception]
) -> None:
    """The defect: ``tokenbroker disable`` did not stop tokens already cached (still served
    35 s later). The very next request after the change is refused; no time passes."""
    for _ in range(3):
        world.issue({"connection": "crm"})
        world.issue({"connection": "gmail", "scopes": ["read"]})
    for cid, body in (
        ("crm", {"connection": "crm"}),
        ("gmail", {"connection": "gmail", "scopes": ["read"]}),
    ):
        _set_status(world, cid, status)
        with pytest.raises(error):
            world.issue(body)
        _set_status(world, cid, ConnectionStatus.ACTIVE)
        assert world.issue(body).access_token is not None


def test_a_removed_connection_stops_cached_tokens_at_the_next_request(world: World) -> None:
    world.issue({"connection": "crm"})
    world.state.delete("crm")
    with pytest.raises(PolicyDenied):
        world.issue({"connection": "crm"})


def test_a_rotation_is_served_at_the_next_request(world: World) -> None:
    world.issue({"connection": "crm"})
    current = world.secrets.get("crm")
    now = world.clock.now()
    version = world.secrets.put(
        "crm",
        current.credential.with_token(access_token=Secret("AT-FULL-2"), obtained_at=now,
                                      expires_at=now + timedelta(hours=1)),
        expected_version=current.version,
    )  # fmt: skip
    record = world.state.get("crm")
    world.state.put_state("crm", replace(record.state, current_version=version))
    assert world.issue({"connection": "crm"}).access_token == Secret("AT-FULL-2")


def test_the_status_check_reads_the_state_only_when_the_store_changed(world: World) -> None:
    """Live status without a state read per request: the store's change marker says when
    something changed; unchanged, the last read stands."""
    reads = 0
    inner_get = world.state.get

    def counting_get(cid: str) -> Any:
        nonlocal reads
        reads += 1
        return inner_get(cid)

    world.state.get = counting_get  # type: ignore[method-assign]
    world.issue({"connection": "crm"})
    before = reads
    for _ in range(100):
        world.issue({"connection": "crm"})
    assert reads == before
    _set_status(world, "gmail", ConnectionStatus.ACTIVE)  # any change to the store
    before = reads  # (setting it read the record too)
    world.issue({"connection": "crm"})
    assert reads == before + 1


# --- narrowing answers exactly what was asked (issue 9, item 3) -------------------------------


class Rewriting:
    """The fake provider, with each token answer's JSON rewritten by ``edit``."""

    def __init__(self, inner: FakeTokenServer, edit: Any) -> None:
        self.inner, self.edit = inner, edit

    async def post_form(self, url: str, form: Any, *, headers: Any) -> Any:
        answer = await self.inner.post_form(url, form, headers=headers)
        body = json.loads(answer.body)
        if "access_token" in body:
            self.edit(body)
        return replace(answer, body=json.dumps(body).encode())


def test_a_provider_that_widens_the_narrowed_scope_is_refused(world: World) -> None:
    """The defect: a narrowing refresh passed on a broader scope than asked (RFC 6749 §5.1:
    the provider's ``scope`` is the token's real scope). A token carrying scopes the caller
    was not granted is never handed out: a clear error, no token."""
    world.issuer.endpoint = Rewriting(world.server, lambda b: b.update(scope="read admin"))  # type: ignore[assignment]
    with pytest.raises(CredentialUnavailable, match="widened"):
        world.issue({"connection": "gmail", "scopes": ["read"]})
    answer = http_answer(CredentialUnavailable("x"), public=True)
    assert answer.status == 503


@pytest.mark.parametrize(("provider_says", "expected"), [(50, 50), (3600, 120), (None, 120)])
def test_a_narrowed_token_reports_its_true_lifetime_within_the_cap(
    world: World, provider_says: int | None, expected: int
) -> None:
    """``expires_in`` is the provider's own (RFC 6749 §5.1), capped by the grant; a missing
    one is the profile's documented default, capped too."""
    world.issuer.policy = parse_policy_text(POLICY + "max_lifetime_seconds = 120\n")

    def lifetime(body: dict[str, Any]) -> None:
        if provider_says is None:
            body.pop("expires_in", None)
        else:
            body["expires_in"] = provider_says

    world.issuer.endpoint = Rewriting(world.server, lifetime)  # type: ignore[assignment]
    token = world.issue({"connection": "gmail", "scopes": ["read"]})
    now = world.clock.now()
    assert json.loads(token.render(now))["expires_in"] == expected
    assert token.scope == ("read",)


# --- audit: one line per decision (issue 9, item 8) -------------------------------------------


def _decisions(log: io.StringIO) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    return [line for line in lines if line["message"] == "token decision"]


def test_every_decision_leaves_one_audit_line_and_no_token(world: World, log: io.StringIO) -> None:
    """The defect: cache hits, 401s and 403s logged nothing, so the escalations found left
    no trace. Every request now leaves exactly one line: who, what, the outcome and why."""
    issued = world.issue({"connection": "crm"})
    world.issue({"connection": "crm"})
    for body, caller in (
        ({"connection": "gmail", "scopes": ["admin"]}, WORKER),
        ({"connection": "crm"}, "stranger@p.iam.gserviceaccount.com"),
        ({"connection": ""}, WORKER),
    ):
        with pytest.raises((PolicyDenied, BadRequest)):
            world.issue(body, caller)
    from tokenbroker.kernel.errors import InvalidCallerToken

    with pytest.raises(InvalidCallerToken):
        asyncio.run(world.issuer.issue(None, b'{"connection": "crm"}'))
    _set_status(world, "crm", ConnectionStatus.DISABLED)
    with pytest.raises(NeedsReauth):
        world.issue({"connection": "crm"})

    lines = _decisions(log)
    assert [line["outcome"] for line in lines] == [
        "issued", "cache_hit", "denied", "denied", "bad_request", "unauthenticated", "refused",
    ]  # fmt: skip
    first, hit = lines[0], lines[1]
    assert (first["caller"], first["connection"], first["scope"]) == (WORKER, "crm", "all")
    assert first["expires_in"] == 1800 and hit["expires_in"] == 1800
    assert first["max_lifetime_seconds"] == 1800
    assert lines[2]["scopes_asked"] == "admin" and lines[2]["reason"] == "access_denied"
    assert lines[3]["caller"] == "stranger@p.iam.gserviceaccount.com"
    assert lines[5]["caller"] is None and lines[5]["reason"] == "invalid_token"
    assert lines[6]["reason"] == "needs_reauth"
    for line in lines:
        assert isinstance(line["latency_ms"], float) and line["latency_ms"] >= 0
    assert issued.access_token.reveal() not in log.getvalue()
    assert world.issuer.decisions == {
        "issued": 1, "cache_hit": 1, "denied": 2, "bad_request": 1, "unauthenticated": 1,
        "refused": 1,
    }  # fmt: skip
    # The same counts feed the metrics (issuer/decisions), each with its latency.
    samples = world.issuer.metrics.snapshot(world.clock.now()).samples
    counted = {s.labels[0]: s.value for s in samples if s.metric.name == "issuer/decisions"}
    assert counted == dict(world.issuer.decisions)
    latencies = {s.labels[0]: s.value for s in samples if s.metric.name == "issuer/latency"}
    assert set(latencies) == set(counted)
    for outcome, distribution in latencies.items():
        assert isinstance(distribution, Distribution)
        assert distribution.count == counted[outcome] and distribution.mean >= 0


# --- scopes the connection does not hold (found by schemathesis with real names) --------------


def _full_scope_world(world: World) -> World:
    world.issuer.policy = parse_policy_text(
        POLICY
        + f"""
[[grants]]
callers = ["{WORKER}"]
connections = ["gmail", "reports"]
scopes = ["*"]
"""
    )
    return world


def test_a_scope_the_connection_does_not_hold_is_invalid_scope_and_nothing_is_sent(
    world: World,
) -> None:
    """A caller granted ``"*"`` asked for a scope the connection was never granted: the
    issuer presented the refresh token anyway and answered the provider's refusal as a 503
    (schemathesis' ST101). It is the caller's error (RFC 6749 §5.2 ``invalid_scope``),
    decided before anything is sent."""
    _full_scope_world(world)
    before = world.server.requests["refresh_token"]
    with pytest.raises(TokenBrokerError) as caught:
        world.issue({"connection": "gmail", "scopes": ["read", "drive"]})
    answer = http_answer(caught.value, public=True)
    assert (answer.status, answer.body["error"]) == (400, "invalid_scope")
    assert "drive" in answer.body["error_description"]
    assert world.server.requests["refresh_token"] == before


def test_a_provider_refusing_a_narrowed_scope_is_invalid_scope_not_a_503(world: World) -> None:
    """A connection that declares no scopes cannot be checked first: the provider's
    ``invalid_scope`` is passed on as the caller's error, not an outage."""
    _full_scope_world(world)
    record = world.state.get("gmail")
    world.state.delete("gmail")
    world.state.create(replace(record.connection, scopes=()), record.state)
    with pytest.raises(TokenBrokerError) as caught:
        world.issue({"connection": "gmail", "scopes": ["drive"]})
    answer = http_answer(caught.value, public=True)
    assert (answer.status, answer.body["error"]) == (400, "invalid_scope")


def test_a_connection_removed_and_registered_again_is_never_served_the_old_token(
    world: World,
) -> None:
    """Versions start again at 1 when a connection is removed and registered again, so a
    cache entry tied to the version alone served the old registration's token (found on the
    relay by its property test). Entries are tied to the registration itself."""
    old = world.issue({"connection": "crm"})
    registry = ConnectionRegistry(
        secrets=world.secrets, state=world.state, profiles=load_profiles(), clock=world.clock
    )
    registry.remove("crm")
    world.clock.advance(1)
    now = world.clock.now()
    registry.register(
        Connection(id="crm", profile="generic", grant=GrantType.REFRESH_TOKEN,
                   client_id="client", token_url="https://idp.test/token"),
        Credential(refresh_token=Secret(world.server.seed_refresh_token()),
                   client_secret=Secret("client-secret"), access_token=Secret("AT-NEW-REG"),
                   obtained_at=now, expires_at=now + timedelta(hours=1), scope=("all",)),
    )  # fmt: skip
    assert world.state.get("crm").state.current_version == 1
    fresh = world.issue({"connection": "crm"})
    assert fresh.access_token == Secret("AT-NEW-REG") != old.access_token
