"""Fixtures of the consumer's unit tests: a FakeClock, an in-process broker, clients on both."""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.unit.consumer.fakes import URL, FakeBroker, IdTokens
from tokenbroker.consumer import AsyncBrokerClient, BrokerClient
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.log import capture_logs


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def broker(clock: FakeClock) -> FakeBroker:
    return FakeBroker(clock)


@pytest.fixture
def ids() -> IdTokens:
    return IdTokens()


@pytest.fixture
def make(clock: FakeClock, broker: FakeBroker, ids: IdTokens) -> Callable[..., BrokerClient]:
    def build(**options: Any) -> BrokerClient:
        options.setdefault("id_token_source", ids)
        return BrokerClient(
            URL, clock=clock, transport=httpx.MockTransport(broker), rng=random.Random(7), **options
        )

    return build


@pytest.fixture
def make_async(
    clock: FakeClock, broker: FakeBroker, ids: IdTokens
) -> Callable[..., AsyncBrokerClient]:
    def build(handler: Any = None, **options: Any) -> AsyncBrokerClient:
        options.setdefault("id_token_source", ids)
        return AsyncBrokerClient(
            URL,
            clock=clock,
            transport=httpx.MockTransport(handler or broker),
            rng=random.Random(7),
            **options,
        )

    return build


@pytest.fixture
def log() -> Iterator[io.StringIO]:
    """Everything the library logs during the test, at debug level (build clients after)."""
    with capture_logs("debug") as stream:
        yield stream
