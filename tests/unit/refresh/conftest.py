"""The refresh wing's shared fixture: a world of in-memory stores and the strict fake provider."""

from __future__ import annotations

import pytest

from tests.unit.refresh.test_tick import World


@pytest.fixture
def world() -> World:
    return World()
