"""``serve``'s liveness in process: ``/healthz`` tells a loop that refreshes from one that does
not, a tick that raises does not end the loop, and a loop that ends ends ``serve``.

Faults come from a test-only state store (the memory backend with a switch), never from
patching the broker's own functions; time is a fake clock that moves by what the loop sleeps,
so "three intervals" pass in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import aiohttp
import pytest

from tests.support.logs import json_lines, trace_fields
from tokenbroker.adapters.memory import MemoryStateStore
from tokenbroker.entrypoints.answers import EXIT_FAILURE, exit_code
from tokenbroker.entrypoints.compose import Runtime, build_runtime
from tokenbroker.entrypoints.health import LoopHealth, TickCrashed
from tokenbroker.entrypoints.serve import LoopDied, serve
from tokenbroker.entrypoints.settings import Settings
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import ConfigError, StoreUnavailable
from tokenbroker.kernel.log import capture_logs
from tokenbroker.ports import ClaimBatch


class QuickClock(FakeClock):
    """Fake time moved by what is slept, while real time moves only a little: the loop ticks
    fast, and the event loop still answers HTTP between ticks."""

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)
        await asyncio.sleep(0.005)


class SwitchableState(MemoryStateStore):
    """The memory state store, whose claims raise what ``fault`` makes while it is set."""

    def __init__(self) -> None:
        super().__init__()
        self.fault: Callable[[], BaseException] | None = None

    def claim_due(self, now: datetime, **kwargs: Any) -> ClaimBatch:
        if self.fault is not None:
            raise self.fault()
        return super().claim_due(now, **kwargs)


class Fatal(BaseException):
    """Not an ``Exception``: nothing in a tick may catch it, so it ends the loop's task."""


@pytest.fixture
def runtime() -> Runtime:
    return replace(
        build_runtime(Settings(backend="memory")), state=SwitchableState(), clock=QuickClock()
    )


def state_of(runtime: Runtime) -> SwitchableState:
    assert isinstance(runtime.state, SwitchableState)
    return runtime.state


@asynccontextmanager
async def serving(
    runtime: Runtime, **options: Any
) -> AsyncIterator[tuple[aiohttp.ClientSession, str, asyncio.Task[None]]]:
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve(
            runtime,
            port=0,
            on_ready=lambda addr: ready.set_result(f"http://{addr[0]}:{addr[1]}"),
            **options,
        )
    )
    url = await asyncio.wait_for(ready, 10)
    try:
        async with aiohttp.ClientSession() as session:
            yield session, url, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass(frozen=True)
class Probe:
    status: int
    body: dict[str, Any]


async def poll(session: aiohttp.ClientSession, url: str, until: Callable[[Probe], bool]) -> Probe:
    for _ in range(1000):
        async with session.get(url + "/healthz") as answer:
            probe = Probe(answer.status, await answer.json())
        if until(probe):
            return probe
        await asyncio.sleep(0.01)
    raise AssertionError(f"never reached: last {probe}")


def test_healthz_is_503_with_age_and_code_while_ticks_fail_and_200_once_they_succeed(
    runtime: Runtime,
) -> None:
    state = state_of(runtime)

    async def scenario() -> None:
        async with serving(runtime, interval=1.0, max_tick_age=3.0) as (session, url, task):
            probe = await poll(session, url, lambda p: p.body["ticks"] >= 1)
            assert (probe.status, probe.body["status"], probe.body["last_error"]) == (
                200, "ok", None,
            )  # fmt: skip
            state.fault = lambda: StoreUnavailable("state store down")
            # (503 may come before the first failure is recorded: a tick that keeps retrying
            # is stale too)
            failing = await poll(
                session, url, lambda p: p.status == 503 and p.body["failed_ticks"] >= 1
            )
            body = failing.body
            assert body["status"] == "stale"
            assert body["last_error"] == "store_unavailable"
            assert body["consecutive_failures"] >= 1
            assert body["last_success_age_seconds"] > body["max_age_seconds"] == 3.0
            state.fault = None
            body = (await poll(session, url, lambda p: p.status == 200)).body
            assert body["consecutive_failures"] == 0
            assert body["last_success_age_seconds"] <= 3.0
            assert body["failed_ticks"] >= 1  # the history stays visible
            assert not task.done()

    asyncio.run(scenario())


def test_a_tick_that_raises_a_bug_is_logged_counted_and_the_loop_goes_on(
    runtime: Runtime,
) -> None:
    state = state_of(runtime)
    state.fault = lambda: ValueError("boom")

    async def scenario() -> tuple[dict[str, Any], int, str]:
        async with serving(runtime, interval=1.0, max_tick_age=3.0) as (session, url, task):
            probe = await poll(
                session, url, lambda p: p.status == 503 and p.body["crashed_ticks"] >= 3
            )
            async with session.post(url + "/refresh") as forced:
                forced_status, forced_text = forced.status, await forced.text()
            assert not task.done()
            return probe.body, forced_status, forced_text

    with capture_logs() as logs:
        body, forced_status, forced_text = asyncio.run(scenario())
    assert body["last_error"] == "internal_error"
    assert body["last_success_age_seconds"] is None  # never succeeded
    # The manual tick answers the bug as a 500 that names only its type.
    assert forced_status == 500
    assert json.loads(forced_text)["error"] == "internal_error"
    assert "boom" not in forced_text and "Traceback" not in forced_text
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    crashes = [line for line in lines if line["message"].startswith("tick crashed")]
    assert len(crashes) >= 3
    assert all("Traceback" in c["exception"] and "ValueError: boom" in c["exception"]
               for c in crashes)  # fmt: skip
    summaries = [line for line in lines if line["message"] == "tick summary"]
    assert len(summaries) >= len(crashes)  # one per tick, the crashed ones included
    assert all(s["ok"] is False and s["error_code"] == "internal_error" for s in summaries)
    assert all(isinstance(s["seconds"], float) for s in summaries)


def test_serve_ends_with_an_error_when_its_loop_dies(runtime: Runtime) -> None:
    state_of(runtime).fault = Fatal

    async def scenario() -> None:
        await asyncio.wait_for(serve(runtime, port=0, interval=1.0), 10)

    with capture_logs() as logs, pytest.raises(LoopDied, match="Fatal"):
        asyncio.run(scenario())
    assert exit_code(LoopDied("x")) == EXIT_FAILURE  # the CLI exits 1
    died = [json.loads(line) for line in logs.getvalue().splitlines()]
    died = [line for line in died if line["message"].startswith("the refresh loop died")]
    assert len(died) == 1
    assert "Fatal" in died[0]["exception"]


def test_serve_ticks_and_reports_healthy_with_a_working_store(runtime: Runtime) -> None:
    async def scenario() -> dict[str, Any]:
        async with serving(runtime, interval=1.0) as (session, url, _):
            probe = await poll(session, url, lambda p: p.status == 200 and p.body["ticks"] >= 5)
            return probe.body

    body = asyncio.run(scenario())
    assert body["failed_ticks"] == 0
    assert body["max_age_seconds"] == 3.0  # three intervals by default
    assert body["interval_seconds"] == 1.0


# --- the record itself --------------------------------------------------------------------------


def test_loop_health_counts_from_the_start_until_a_first_success() -> None:
    health = LoopHealth.start(interval=10, now=100.0)
    assert health.max_age == 30
    assert health.report(129.0)[0] is True  # starting up
    assert health.report(131.0)[0] is False  # no success in three intervals
    health.tick_started(131.0)
    assert health.report(132.0)[1]["tick_running_seconds"] == 1.0
    health.tick_ended(133.0, None)
    healthy, body = health.report(140.0)
    assert healthy and body["last_success_age_seconds"] == 7.0
    health.tick_ended(150.0, TickCrashed("the tick raised ValueError"))
    health.tick_ended(160.0, StoreUnavailable("down"))
    healthy, body = health.report(163.5)
    assert not healthy
    assert body["last_success_age_seconds"] == 30.5
    assert (body["failed_ticks"], body["crashed_ticks"]) == (2, 1)
    assert (body["consecutive_failures"], body["last_error"]) == (2, "store_unavailable")


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan"), float("inf")])
def test_serve_refuses_an_interval_that_would_spin_or_never_tick(
    runtime: Runtime, interval: float
) -> None:
    with pytest.raises(ConfigError, match="interval"):
        asyncio.run(serve(runtime, port=0, interval=interval, duration=1))
    assert runtime.clock.sleeps == []  # nothing ran


def test_the_lines_of_a_traced_http_request_carry_its_trace_and_the_schedules_do_not(
    runtime: Runtime,
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"

    async def scenario() -> None:
        async with serving(runtime, interval=1.0) as (session, url, _):
            await poll(session, url, lambda p: p.body["ticks"] >= 2)
            headers = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
            async with session.post(url + "/refresh", headers=headers) as forced:
                assert forced.status == 200
            await poll(session, url, lambda p: p.body["ticks"] >= 5)

    with capture_logs(project="tb-proj") as logs:
        asyncio.run(scenario())
    summaries = [line for line in json_lines(logs.getvalue()) if line["message"] == "tick summary"]
    (forced,) = [line for line in summaries if line["trigger"] == "http"]
    assert trace_fields(forced) == {
        "logging.googleapis.com/trace": f"projects/tb-proj/traces/{trace_id}",
        "logging.googleapis.com/spanId": "00f067aa0ba902b7",
        "logging.googleapis.com/trace_sampled": True,
    }
    scheduled = [line for line in summaries if line["trigger"] == "schedule"]
    assert len(scheduled) >= 4 and all(trace_fields(line) == {} for line in scheduled)
