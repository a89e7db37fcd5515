"""Who runs next among the waiting on_change hooks: a queue fair per peer and a token bucket.

Pure bookkeeping (no processes, no clock: ``now`` is passed in), so every rule of hbd.hooks' module
docstring is a plain unit test: each peer has at most one waiting change (its latest, in its
first place in line, counting what it replaced), a peer's runs never overlap, the least established
peer's change is dropped first when too many wait, and at most ``rate`` starts a second.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict

# Starting a process costs the loop ~3 ms when hbd holds 19,000 sockets (fork copies the page and
# fd tables): however quickly hooks finish, at most this many start per second (~6% of the loop).
START_RATE = 20.0


class Change:
    """One peer's change waiting for its hook run."""

    __slots__ = ("address", "coalesced", "event", "extra", "key", "peer", "seq", "standing", "when")

    def __init__(self, event: str, peer: str, address: str, extra: dict[str, object], standing: float = 0.0) -> None:
        self.event = event
        self.peer = peer
        self.address = address
        self.extra = extra
        self.key = f"{peer} {address}"
        self.standing = standing
        self.coalesced = 0  # earlier changes of this peer that this run replaces
        self.seq = 0
        self.when = time.time()  # wall time, for HBD_TIME: a queued run starts later


class HookQueue:
    """The waiting changes, by peer key, in line order; ``busy``: peers with a run going."""

    def __init__(self, rate: float = START_RATE) -> None:
        self.rate = rate
        self.max_running = 4
        self.max_queued = 100
        self.waiting: OrderedDict[str, Change] = OrderedDict()  # by peer key: its latest waiting change
        self.busy: set[str] = set()  # peers with a run going: their next one waits for its end
        self._order: list[tuple[float, int, str]] = []  # heap (standing, seq, key): who is dropped first
        self._seq = itertools.count()
        self.bucket = 0.0
        self.bucket_at = float("-inf")  # full at the first use

    def __len__(self) -> int:
        return len(self.waiting)

    def configure(self, max_running: int, max_queued: int) -> list[Change]:
        """New limits; returns the changes dropped to fit the new ``max_queued``."""
        self.max_running = max_running
        self.max_queued = max_queued
        dropped = []
        while len(self.waiting) > max_queued:
            victim = self._least_established()
            assert victim is not None
            del self.waiting[victim.key]
            dropped.append(victim)
        return dropped

    def clear(self) -> None:
        self.waiting.clear()
        self._order.clear()

    def offer(self, change: Change, now: float, running: int) -> Change | None:
        """Put ``change`` in line (``running``: runs going now). Returns the change dropped for it, if
        any (``change`` itself when it is the least established of all). A change replacing its peer's
        waiting one takes its place and counts it in ``coalesced``."""
        waiting = self.waiting.get(change.key)
        if waiting is not None:  # its previous change has not run yet: replaced, in the same place in line
            change.coalesced = waiting.coalesced + 1
            self.waiting[change.key] = change
            self._rank(change)
            return None
        if self.max_queued == 0 and (running >= self.max_running or self.tokens(now) < 1 or change.key in self.busy):
            return change
        victim = None
        if len(self.waiting) >= max(self.max_queued, 1):
            victim = self._least_established()
            if victim is None or change.standing < victim.standing:
                return change  # the newcomer is the least established of all
            del self.waiting[victim.key]
        self.waiting[change.key] = change
        self._rank(change)
        return victim

    def take(self, now: float, running: int) -> Change | float | None:
        """The next change to run now (its peer marked busy, a token spent), else the delay until a
        token is due, else None (all slots taken, nothing waiting, or each waits for its peer's run)."""
        if not self.waiting or running >= self.max_running:
            return None
        # The first in line whose peer has no run going (at most max_running are skipped).
        change = next((c for c in self.waiting.values() if c.key not in self.busy), None)
        if change is None:
            return None
        if self.tokens(now) < 1:
            return (1 - self.bucket) / self.rate
        self.bucket -= 1
        del self.waiting[change.key]
        self.busy.add(change.key)
        return change

    def done(self, change: Change) -> None:
        """The run of ``change`` ended (or never started): its peer's next change may go."""
        self.busy.discard(change.key)

    def tokens(self, now: float) -> float:
        """Process starts allowed at ``now``: a bucket of ``max_running``, refilled ``rate`` a second."""
        self.bucket = min(float(self.max_running), self.bucket + (now - self.bucket_at) * self.rate)
        self.bucket_at = now
        return self.bucket

    def _rank(self, change: Change) -> None:
        change.seq = next(self._seq)
        heapq.heappush(self._order, (change.standing, change.seq, change.key))
        if len(self._order) > 2 * len(self.waiting) + 64:  # entries of started or replaced runs pile up
            self._order = [(c.standing, c.seq, c.key) for c in self.waiting.values()]
            heapq.heapify(self._order)

    def _least_established(self) -> Change | None:
        order = self._order
        while order:
            _, seq, key = order[0]
            change = self.waiting.get(key)
            if change is not None and change.seq == seq:
                return change
            heapq.heappop(order)  # started or replaced since
        return None
