"""When to refresh, and how long to back off after failures.

A credential is due when its remaining lifetime falls below the overlap window. The window is
half the lifetime by default, never less than ``min_lead`` (so a slow tick still lands before
expiry), and never more than 90% of the lifetime (so short-lived tokens do not refresh in a
loop). Jitter moves each refresh a random amount *earlier*, never later, so a fleet that was
registered at once spreads out instead of stampeding the provider.

Refreshing early discards nothing: the previous version stays readable in the secret store and
its access token stays valid at the provider until its own ``expires_at``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

_RNG = random.Random()  # noqa: S311 - scheduling jitter, not cryptography


@dataclass(frozen=True)
class RefreshPolicy:
    overlap_fraction: float = 0.5
    min_lead: timedelta = timedelta(minutes=10)
    max_lead_fraction: float = 0.9
    jitter_fraction: float = 0.1
    max_jitter: timedelta = timedelta(minutes=5)
    #: Backoff after failed ticks: base * 2**(failures-1), capped.
    failure_backoff_base: timedelta = timedelta(seconds=30)
    failure_backoff_max: timedelta = timedelta(minutes=15)

    def __post_init__(self) -> None:
        if not 0 < self.overlap_fraction < 1:
            raise ValueError("overlap_fraction must be between 0 and 1")
        if not 0 <= self.jitter_fraction < 1:
            raise ValueError("jitter_fraction must be in [0, 1)")

    def lead(self, lifetime: timedelta) -> timedelta:
        """How long before expiry the refresh is due (before jitter)."""
        lead = max(lifetime * self.overlap_fraction, self.min_lead)
        return min(lead, lifetime * self.max_lead_fraction)

    def next_refresh_at(
        self, obtained_at: datetime, expires_at: datetime, rng: random.Random | None = None
    ) -> datetime:
        lifetime = max(expires_at - obtained_at, timedelta(0))
        due = expires_at - self.lead(lifetime)
        jitter_cap = min(lifetime * self.jitter_fraction, self.max_jitter)
        jitter = jitter_cap * (rng or _RNG).random()
        floor = obtained_at + lifetime * (1 - self.max_lead_fraction) / 2
        return max(due - jitter, floor)

    def retry_at(
        self,
        now: datetime,
        consecutive_failures: int,
        retry_after: float | None = None,
        rng: random.Random | None = None,
    ) -> datetime:
        """When to try again after ``consecutive_failures`` failed ticks in a row."""
        exponent = min(max(0, consecutive_failures - 1), 20)
        backoff = min(self.failure_backoff_base * (1 << exponent), self.failure_backoff_max)
        backoff = backoff * (0.5 + 0.5 * (rng or _RNG).random())
        if retry_after is not None:
            backoff = max(backoff, timedelta(seconds=retry_after))
        return now + backoff
