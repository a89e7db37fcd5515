"""Reconnect delays: capped exponential backoff with full jitter.

Full jitter (a uniform draw between 0 and the exponential bound) spreads a fleet that lost the
same server at the same moment; the first retry after a drop is jittered too, so a server restart
is not met by every client at once.
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    __slots__ = ("_rand", "attempts", "base", "cap")

    def __init__(self, base: float, cap: float, rand: Callable[[], float] = random.random) -> None:
        self.base = base
        self.cap = cap
        self.attempts = 0  # consecutive failures since the last healthy period
        self._rand = rand

    def bound(self, attempt: int) -> float:
        """Upper bound of the delay before retry number ``attempt`` (0-based)."""
        return min(self.cap, self.base * 2 ** min(attempt, 62))

    def next_delay(self) -> float:
        """Delay before the next attempt; counts one more failure."""
        delay = self._rand() * self.bound(self.attempts)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """Called after a healthy period: the next failure starts from the base again."""
        self.attempts = 0
