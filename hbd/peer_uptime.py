"""Each peer's outages and uptime as this process saw them, kept in memory from the state changes the
registry applies (never read from the state store: ``hbd history`` does that, in its own process).

Pure: times are the loop's monotonic clock, handed in. Per peer: the outages counted (each change into
DOWN), the seconds spent DOWN (the current outage included), and its states over the last 24 h, so
that ``uptime(name, now)`` is the share of the known time (UP, LATE or DOWN; NEW is unknown) that was
UP or LATE. Only this process's life counts: after a restart the window starts again (the counters
are Prometheus counters: they start at 0 with the process). Bounded: at most MAX_SPANS states per
peer (a peer that changed more often in 24 h has its uptime over its last MAX_SPANS states), and the
accounts of peers the registry forgot are swept once they outnumber the known ones.
"""

from __future__ import annotations

import sys
from collections.abc import Container, Iterable, Sequence

WINDOW = 86400.0  # seconds: the uptime's window (`hbd status` UPTIME 24h)
MAX_SPANS = 64
_COUNTED = frozenset({"UP", "LATE", "DOWN"})  # known states; NEW is unknown
_UP = frozenset({"UP", "LATE"})


class Account:
    """One peer: its outages, its seconds DOWN before the current state, its states (start, state)."""

    __slots__ = ("down", "outages", "spans")

    def __init__(self) -> None:
        self.outages = 0
        self.down = 0.0  # seconds DOWN, not counting the current state
        # A list, trimmed to MAX_SPANS by hand: a deque(maxlen=...) costs ~600 B even with one span,
        # and there is an Account per peer (in the supervisor and, copied, in its worker).
        self.spans: list[tuple[float, str]] = []

    def add(self, span: tuple[float, str]) -> None:
        """Append a state, dropping the oldest beyond MAX_SPANS (O(MAX_SPANS) only when full)."""
        spans = self.spans
        if not spans:
            self.spans = [span]  # a list of one (64 B): append() would make room for four (88 B)
            return
        spans.append(span)
        if len(spans) > MAX_SPANS:
            del spans[0]

    def down_seconds(self, now: float) -> float:
        if self.spans and self.spans[-1][1] == "DOWN":
            return self.down + max(0.0, now - self.spans[-1][0])
        return self.down

    def uptime(self, now: float) -> float | None:
        """Percent of the known time in the last WINDOW that the peer was UP or LATE; None if none known."""
        start = now - WINDOW
        up = known = 0.0
        spans = self.spans
        for i, (begin, state) in enumerate(spans):
            end = spans[i + 1][0] if i + 1 < len(spans) else now
            length = min(end, now) - max(begin, start)
            if length <= 0 or state not in _COUNTED:
                continue
            known += length
            if state in _UP:
                up += length
        return 100.0 * up / known if known > 0 else None

    def copy(self) -> tuple[int, float, list[tuple[float, str]]]:
        """What another process needs to show this account (a worker, hbd.registry_remote): plain values."""
        return self.outages, self.down, list(self.spans)

    @classmethod
    def of(cls, outages: int, down: float, spans: Iterable[Sequence[object]]) -> Account:
        """The account ``copy()`` describes (values of the wrong type are skipped: they came over a pipe)."""
        acc = cls()
        acc.outages, acc.down = outages, down
        for span in spans:
            if len(span) == 2 and isinstance(span[0], int | float) and isinstance(span[1], str):
                acc.add((float(span[0]), sys.intern(span[1])))  # one "UP" for all, not one per copy
        return acc


class Uptime:
    """Every peer's Account, fed by ``change``; see the module docstring."""

    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}

    def change(self, name: str, new: str, now: float) -> None:
        """``name`` is in state ``new`` from ``now`` on (an up, late or down notice). O(1)."""
        acc = self.accounts.get(name)
        if acc is None:
            acc = self.accounts[name] = Account()
        spans = acc.spans
        if spans:
            start, state = spans[-1]
            if state == new:
                return
            if state == "DOWN":
                acc.down += max(0.0, now - start)
        if new == "DOWN":
            acc.outages += 1
        acc.add((now, new))
        spans = acc.spans  # the first add() makes the list
        while len(spans) > 1 and spans[1][0] <= now - WINDOW:  # the first span ends before the window
            del spans[0]

    def uptime(self, name: str, now: float) -> float | None:
        """Percent of the known time in the last WINDOW that ``name`` was UP or LATE; None if none known."""
        acc = self.accounts.get(name)
        return acc.uptime(now) if acc is not None else None

    def sweep(self, keep: Container[str], known: int) -> None:
        """Drop the accounts of peers not in ``keep`` once there are more than twice ``known`` (+100):
        O(accounts), at most once per that many new names."""
        if len(self.accounts) > 2 * known + 100:
            self.accounts = {name: acc for name, acc in self.accounts.items() if name in keep}
