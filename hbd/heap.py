"""Python's cyclic garbage collector kept off the daemon's long-lived objects.

The collector walks every object of the generations it collects. The oldest one ends up holding
everything the daemon keeps (about a dozen objects per connection: the connection, its socket, its
peer, the registry's record, its uptime account...), and it is walked whenever the objects promoted
into it since its last walk outnumber a quarter of it: during a ramp of connections, after a burst
of state changes. That walk is one loop turn in which no peer is served: 70-450 ms at 19,000
connections on the benchmark machine, growing with N (docs/performance.md).

hbd's long-lived objects hold no reference cycles (tests/test_heap.py: a connection's whole life, a
named peer with the registry and the state store, leaves none), so walking them finds nothing. So
every FREEZE_INTERVAL the young generations are collected (cycles made since are freed as before)
and what survived is frozen (``gc.freeze()``: out of the collector's sight; reference counting
still frees each object when its last reference goes). A collection of the oldest generation then
walks only what was promoted since the last freeze, whatever N is. The cost is one collection of
the young generations per interval (what they hold: a millisecond or two while 1,000 connections a
second arrive, well under one otherwise) and an O(1) freeze.

Every TRIM_EVERY freezes, glibc's ``malloc_trim(0)`` gives the pages malloc holds free back to the
system: what a ramp or a storm allocated and freed (buffers, a dict's table before it doubled) stays
in the process's RSS otherwise, 50-60 B a connection in a worker at 16,000 connections and ~20 B a
peer in the supervisor; the trim took 0.5-3.5 ms there (docs/performance.md, "A connection's bytes
in a worker").
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hbd.loop import EventLoop, Timer

FREEZE_INTERVAL = 1.0  # seconds between freezes: what is older than this is never walked again
TRIM_EVERY = 60  # freezes between two malloc_trim(0): about a minute
frozen = False  # this process keeps its long-lived objects frozen (a daemon's, once started)
Trim = Callable[[int], object]


def malloc_trim() -> Trim | None:
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


class Heap:
    """Started once the daemon has started (its imports and start-up structures are frozen at once),
    then a freeze every ``interval`` from a loop timer; ``close()`` stops the timer."""

    def __init__(
        self, loop: EventLoop, interval: float = FREEZE_INTERVAL, trim: Trim | None = None, trim_every: int = TRIM_EVERY
    ) -> None:
        self.loop = loop
        self.interval = interval
        self.freezes = 0
        self.trim = trim if trim is not None else malloc_trim()
        self.trim_every = trim_every
        self.trims = 0
        self._timer: Timer | None = None

    def start(self) -> Heap:
        global frozen
        frozen = True
        self._freeze()
        return self

    def _freeze(self) -> None:
        gc.collect(1)  # young cycles that are garbage now: freed, never frozen
        gc.freeze()
        self.freezes += 1
        if self.trim is not None and self.freezes % self.trim_every == 0:
            self.trim(0)  # malloc's free pages back to the system (0: keep no pad at the heap's top)
            self.trims += 1
        self._timer = self.loop.call_later(self.interval, self._freeze)

    def close(self) -> None:
        """The loop has stopped: the timer ends and the frozen objects go back to the collector (a
        daemon run inside a test process must not leave that process's garbage frozen)."""
        global frozen
        self.loop.cancel(self._timer)
        self._timer = None
        frozen = False
        gc.unfreeze()
