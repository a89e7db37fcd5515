"""Each peer's outages and uptime as this process saw them, kept in memory from the state changes the
registry applies (never read from the state store: ``hbd history`` does that, in its own process).

Pure: times are the loop's monotonic clock, handed in. Per peer: the outages counted (each change into
DOWN), the seconds spent DOWN (the current outage included), and its states over the last 24 h, so
that ``uptime(name, now)`` is the share of the known time (UP, LATE or DOWN; NEW is unknown) that was
UP or LATE. Only this process's life counts: after a restart the window starts again (the counters
are Prometheus counters: they start at 0 with the process). Bounded: at most MAX_SPANS states per
peer (a peer that changed more often in 24 h has its uptime over its last MAX_SPANS states), and the
accounts of peers the registry forgot are swept once they outnumber the known ones.

A known peer's account is kept in its registry ``Peer`` (``Peer.account``, no table of its own), and
only as much of it as there is: None before its first change; while it has had one state and no
outage, the span itself, or for UP (a fresh peer) the span's start alone (the float is the peer's
since: nothing more); an ``Account`` from its second state on. The
registry's table keeps the accounts of the peers it forgets (``PeerTable.orphaned``) and gives one
back to a peer of that name that comes back.
"""

from __future__ import annotations

import sys
from collections.abc import Container, Iterable, Mapping, Sequence
from typing import Protocol

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


# A peer's account as kept: None (no change yet); one span with no outage: the span itself, or for UP
# its start alone; or an Account.
Kept = Account | tuple[float, str] | float
Held = Kept | None


class Holder(Protocol):
    """What keeps a known peer's account (hbd.registry_types.Peer)."""

    account: Held


def account(held: Held) -> Account | None:
    """The Account a kept account reads as (a new one for a single span: to read, not to keep)."""
    if held is None or isinstance(held, Account):
        return held
    acc = Account()
    acc.spans = [_span(held)]
    return acc


def _span(held: tuple[float, str] | float) -> tuple[float, str]:
    return held if isinstance(held, tuple) else (held, "UP")


def parts(held: Held) -> tuple[int, float, list[tuple[float, str]]]:
    """(outages, seconds DOWN before the current state, spans) of a kept account."""
    if held is None:
        return 0, 0.0, []
    if isinstance(held, Account):
        return held.outages, held.down, held.spans
    return 0, 0.0, [_span(held)]


def changed(held: Held, new: str, now: float) -> Held:
    """The account ``held`` once its peer is in state ``new`` from ``now`` on. O(1)."""
    if held is None:
        if new == "UP":
            return now  # one state, no outage: its start is the whole account
        if new != "DOWN":
            return (now, new)
        acc = Account()
    elif isinstance(held, Account):
        acc = held
    else:
        span = _span(held)
        if span[1] == new:
            return held
        acc = Account()
        acc.spans = [span]
    spans = acc.spans
    if spans:
        start, state = spans[-1]
        if state == new:
            return acc
        if state == "DOWN":
            acc.down += max(0.0, now - start)
    if new == "DOWN":
        acc.outages += 1
    acc.add((now, new))
    spans = acc.spans  # the first add() makes the list
    while len(spans) > 1 and spans[1][0] <= now - WINDOW:  # the first span ends before the window
        del spans[0]
    return acc


class Uptime:
    """Every peer's account, fed by ``change``; see the module docstring. ``peers``: the registry's
    known peers by name (each keeps its own); ``orphans``: the accounts of names not known (the
    registry's table moves a forgotten peer's there)."""

    def __init__(
        self,
        peers: Mapping[str, Holder] | None = None,
        orphans: dict[str, Kept] | None = None,
    ) -> None:
        self.peers: Mapping[str, Holder] = {} if peers is None else peers
        self.orphans: dict[str, Kept] = {} if orphans is None else orphans

    def held(self, name: str) -> Held:
        peer = self.peers.get(name)
        return peer.account if peer is not None else self.orphans.get(name)

    def account(self, name: str) -> Account | None:
        """``name``'s account (None before its first change)."""
        return account(self.held(name))

    def change(self, name: str, new: str, now: float) -> None:
        """``name`` is in state ``new`` from ``now`` on (an up, late or down notice). O(1)."""
        peer = self.peers.get(name)
        if peer is not None:
            peer.account = changed(peer.account, new, now)
            return
        held = changed(self.orphans.get(name), new, now)
        if held is not None:
            self.orphans[name] = held

    def uptime(self, name: str, now: float) -> float | None:
        """Percent of the known time in the last WINDOW that ``name`` was UP or LATE; None if none known."""
        acc = self.account(name)
        return acc.uptime(now) if acc is not None else None

    def sweep(self, keep: Container[str], known: int) -> None:
        """Drop the accounts of peers not in ``keep`` once the ones of unknown names outnumber ``known``
        (+100): O(orphans), at most once per that many new names."""
        if len(self.orphans) > known + 100:
            for name in [n for n in self.orphans if n not in keep]:  # in place: the table holds this dict
                del self.orphans[name]
