"""Completion rates and the ``Retry-After`` they imply.

Guarantee: ``Retry-After`` comes from the observed completion rate (how soon the work ahead
of a refused request is expected to finish), clamped to 1-60 s, never from a constant.
"""

from __future__ import annotations

import math
from collections import deque

from serving.admission.clock import Clock

RETRY_AFTER_MIN_S = 1
RETRY_AFTER_MAX_S = 60


class CompletionRate:
    """Completions per second over a sliding window."""

    def __init__(self, clock: Clock, window_s: float = 30.0):
        self.clock = clock
        self.window_s = window_s
        self._times: deque[float] = deque()
        self._since = clock.now()

    def record(self) -> None:
        self._times.append(self.clock.now())

    def per_second(self) -> float:
        now = self.clock.now()
        while self._times and self._times[0] < now - self.window_s:
            self._times.popleft()
        span = min(self.window_s, max(now - self._since, 1.0))
        return len(self._times) / span


def retry_after_s(work_ahead: float, rate_per_s: float) -> int:
    """Seconds until ``work_ahead`` completions are expected at ``rate_per_s``, clamped."""
    if rate_per_s <= 0:
        return RETRY_AFTER_MAX_S // 4
    return max(RETRY_AFTER_MIN_S, min(RETRY_AFTER_MAX_S, math.ceil(work_ahead / rate_per_s)))


class CompletionRates:
    """The replica's completion rate and each account's (for their Retry-After)."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.all = CompletionRate(clock)
        self._accounts: dict[str, CompletionRate] = {}

    def record(self, account: str) -> None:
        self.all.record()
        self.of(account).record()

    def of(self, account: str) -> CompletionRate:
        rate = self._accounts.get(account)
        if rate is None:
            rate = self._accounts[account] = CompletionRate(self.clock)
        return rate
