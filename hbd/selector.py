"""The event loop's selector: the standard library's epoll selector with a leaner ``select()``.

``selectors.EpollSelector.select`` looks each ready descriptor up through a method call and builds
its result in a Python loop; that is the loop's largest cost per event after the system calls
themselves (docs/performance.md). This one builds the same ``[(key, events)]`` in one comprehension.
Registration, modification and closing are the standard library's, unchanged.

It also returns at most ``max_events`` ready descriptors per call, so that one loop turn handles
a bounded share of a mass event (docs/performance.md, "Mass events"). The kernel hands them out
round-robin (a level-triggered descriptor returned goes to the back of epoll's ready list), so
none starves however many are ready; and the event buffer is ``max_events`` long, not one entry
per registered descriptor (240 KB allocated every call at 20,000).
"""

from __future__ import annotations

import math
import select
import selectors

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_NOT_IN = ~select.EPOLLIN  # any other bit (EPOLLOUT, EPOLLERR, EPOLLHUP) wakes a writer
_NOT_OUT = ~select.EPOLLOUT  # any other bit (EPOLLIN, EPOLLERR, EPOLLHUP) wakes a reader
# Ready descriptors per select(): a close costs 40-70 us, so 256 are 10-18 ms of a turn; the rest
# are returned by the next calls (epoll is level-triggered).
MAX_EVENTS = 256


class EpollSelector(selectors.EpollSelector):
    max_events = MAX_EVENTS

    def __init__(self) -> None:
        super().__init__()
        self.full = False  # the last select() returned max_events: more are ready behind them
        # the standard library's own epoll object and key table, under names the type checker knows
        self._epoll: select.epoll = vars(self)["_selector"]
        self._keys: dict[int, selectors.SelectorKey] = vars(self)["_fd_to_key"]

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            timeout = -1
        elif timeout <= 0:
            timeout = 0
        else:
            timeout = math.ceil(timeout * 1e3) * 1e-3  # epoll counts milliseconds: never wake too early
        try:
            ready = self._epoll.poll(timeout, self.max_events)
        except InterruptedError:
            return []
        self.full = len(ready) >= self.max_events
        keys = self._keys
        return [
            (key, ((_WRITE if ev & _NOT_IN else 0) | (_READ if ev & _NOT_OUT else 0)) & key.events)
            for fd, ev in ready
            if (key := keys.get(fd)) is not None
        ]


def default_selector() -> selectors.BaseSelector:
    """epoll (Linux, where hbd runs); elsewhere the standard library's choice."""
    return EpollSelector() if hasattr(select, "epoll") else selectors.DefaultSelector()
