"""Deadlines for many connections, filed in coarse time slots (a hashed timing wheel).

With one heap entry per connection, every connection that pings on time would be re-armed through
an O(log N) heap operation about once per timeout. Here a connection is filed under the slot its
deadline falls in (an append to a list); only slots are kept in a heap, and there are at most
(timeout / resolution) of them however many connections there are. A slot fires at its end, so
a verdict comes at most ``resolution`` seconds after the exact deadline.

The owner remembers which slot an item is filed under. An entry whose item has been closed since
is skipped when its slot fires; an item whose deadline moves earlier is taken out of its old slot
(``discard``), one whose deadline moves later stays where it is and is re-filed when that slot
fires. So an item has at most one entry; a slot emptied that way leaves its tick in the heap until
due or until such ticks outnumber the live ones (then the heap is rebuilt, as the loop compacts
its timers). Memory is bounded by the items filed, whatever they send.
"""

from __future__ import annotations

import heapq
import math
from typing import Generic, TypeVar

T = TypeVar("T")
_ceil = math.ceil  # a module global: one lookup, no attribute access on ``math`` per call


class DeadlineWheel(Generic[T]):
    __slots__ = ("_orphans", "_slots", "_ticks", "per_second", "resolution")

    def __init__(self, resolution: float) -> None:
        self.resolution = resolution
        self.per_second = 1.0 / resolution  # slots a second: tick() multiplies (a float floor division costs an fmod)
        self._slots: dict[int, list[T]] = {}
        self._ticks: list[int] = []  # heap of the slots in use
        self._orphans = 0  # ticks in the heap whose slot has been emptied by discard()

    @property
    def slots(self) -> dict[int, list[T]]:
        """The filed items by slot, for a caller's inlined ``add`` (one per ping in the server's
        deadline wheel): appending to a slot already in use is all ``add`` does then."""
        return self._slots

    def tick(self, when: float) -> int:
        """The slot ``when`` falls in: the first that ends at or after it (a slot fires at its end, so
        not before the deadline, give or take the last bit of a float: a caller re-files what is
        not yet due after a slot fired). One formula, here and in a caller's inlined ``add``: about
        100 machine instructions, where ``-int(-when // resolution)`` took about 400 (an fmod, a
        type call and two negations), once a ping in the server's deadline wheel."""
        return _ceil(when * self.per_second)

    def add(self, when: float, item: T) -> int:
        """File ``item`` for ``when``; returns the slot, which the caller keeps to recognise the entry."""
        tick = _ceil(when * self.per_second)  # tick(), inlined
        slot = self._slots.get(tick)
        if slot is None:
            self._slots[tick] = [item]
            heapq.heappush(self._ticks, tick)
        else:
            slot.append(item)
        return tick

    def discard(self, tick: int, item: T) -> None:
        """Take ``item`` out of slot ``tick``."""
        slot = self._slots.get(tick)
        if slot is None:
            return
        try:
            slot.remove(item)
        except ValueError:
            return
        if not slot:
            del self._slots[tick]
            self._orphans += 1
            if self._orphans > 1024 and self._orphans * 2 > len(self._ticks):
                self._ticks = list(self._slots)
                heapq.heapify(self._ticks)
                self._orphans = 0

    def next_time(self) -> float | None:
        """When the earliest slot is due, or None when nothing is filed."""
        ticks = self._ticks
        while ticks and ticks[0] not in self._slots:
            heapq.heappop(ticks)
            self._orphans -= 1
        return self._ticks[0] * self.resolution if self._ticks else None

    def pop_due(self, now: float) -> list[tuple[int, list[T]]]:
        """Remove and return every slot due at ``now``, earliest first."""
        due = []
        ticks = self._ticks
        res = self.resolution
        while ticks and ticks[0] * res <= now:  # the product next_time() gives: never due "a bit later"
            tick = heapq.heappop(ticks)
            slot = self._slots.pop(tick, None)
            if slot is None:
                self._orphans -= 1
                continue
            due.append((tick, slot))
        return due

    def __len__(self) -> int:
        return sum(len(s) for s in self._slots.values())
