"""The event loop's selector: the standard library's epoll selector with a leaner ``select()``.

``selectors.EpollSelector.select`` looks each ready descriptor up through a method call and builds
its result in a Python loop; that is the loop's largest cost per event after the system calls
themselves (docs/performance.md). This one builds the same ``[(key, events)]`` in one comprehension.
Registration, modification and closing are the standard library's, unchanged.
"""

from __future__ import annotations

import math
import select
import selectors

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_NOT_IN = ~select.EPOLLIN  # any other bit (EPOLLOUT, EPOLLERR, EPOLLHUP) wakes a writer
_NOT_OUT = ~select.EPOLLOUT  # any other bit (EPOLLIN, EPOLLERR, EPOLLHUP) wakes a reader


class EpollSelector(selectors.EpollSelector):
    def __init__(self) -> None:
        super().__init__()
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
            ready = self._epoll.poll(timeout, max(len(self._keys), 1))
        except InterruptedError:
            return []
        keys = self._keys
        return [
            (key, ((_WRITE if ev & _NOT_IN else 0) | (_READ if ev & _NOT_OUT else 0)) & key.events)
            for fd, ev in ready
            if (key := keys.get(fd)) is not None
        ]


def default_selector() -> selectors.BaseSelector:
    """epoll (Linux, where hbd runs); elsewhere the standard library's choice."""
    return EpollSelector() if hasattr(select, "epoll") else selectors.DefaultSelector()
