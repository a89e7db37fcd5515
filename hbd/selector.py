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

A descriptor registered with ``EVENT_HANGUP`` as well is watched for the peer's end too (epoll's
``EPOLLRDHUP``, and ``EPOLLHUP``/``EPOLLERR``): its event then carries ``EVENT_HANGUP``, so the
loop can hand an end to a cheaper callback than a read (docs/performance.md, "Mass events": a
survivor's ping waits behind every end ready before it).

A descriptor can also be watched for a handler object (``watch``): its events are not returned by
``select()`` as ``(key, mask)``; the loop takes epoll's ``(fd, bits)`` from ``poll()`` and passes the
bits to ``handlers[fd].on_read`` as they are. That is the server's connections' way (hbd.connection):
per connection one table entry to the connection itself, where a registration keeps a ``SelectorKey``,
its table entry and the loop's callback list with a bound method in it (about 250 bytes); and per event
no mask, tuple or list entry of ours (docs/performance.md, "A leaner connection layer").
"""

from __future__ import annotations

import math
import select
import selectors
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
EVENT_HANGUP = 4  # next to selectors' EVENT_READ (1) and EVENT_WRITE (2): the peer's end
_ENDED = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
IN = select.EPOLLIN  # a handler's usual events: readable, and nothing else
OUT = select.EPOLLOUT
ENDED = _ENDED
_BITS = select.EPOLLIN | select.EPOLLPRI | select.EPOLLOUT | _ENDED  # what epoll returns when asked for these


def _translate(ev: int) -> int:
    """epoll's bits as the loop's: any bit but EPOLLIN wakes a writer, any but EPOLLOUT a reader (as the
    standard library's selector does), and an end sets EVENT_HANGUP."""
    return (
        (_WRITE if ev & ~select.EPOLLIN else 0)
        | (_READ if ev & ~select.EPOLLOUT else 0)
        | (EVENT_HANGUP if ev & _ENDED else 0)
    )


# Every combination of _BITS, looked up once per event (``& key.events`` drops what a key does not watch)
_MASKS = {ev: _translate(ev) for ev in range(_BITS + 1) if ev & ~_BITS == 0}
# Ready descriptors per select(): a close costs 40-70 us, so 256 are 10-18 ms of a turn; the rest
# are returned by the next calls (epoll is level-triggered).
MAX_EVENTS = 256


class Handler(Protocol):
    def on_read(self, bits: int) -> object: ...  # its descriptor is ready: epoll's bits, IN alone for a read


class EpollSelector(selectors.EpollSelector):
    max_events = MAX_EVENTS

    def __init__(self) -> None:
        super().__init__()
        self.full = False  # the last select() returned max_events: more are ready behind them
        # the standard library's own epoll object and key table, under names the type checker knows
        self._epoll: select.epoll = vars(self)["_selector"]
        self._keys: dict[int, selectors.SelectorKey] = vars(self)["_fd_to_key"]
        self.handlers: dict[int, Handler] = {}  # descriptors watched for a handler (watch()), not in _keys

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        """Wait up to ``timeout`` seconds (None: no limit) and return epoll's ready descriptors as it gives
        them, ``(fd, bits)``, at most ``max_events``: the loop passes a handler's (``handlers[fd]``) its bits
        and makes a key's event with ``key_event``; no list or tuple of ours per event."""
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
        return ready

    def key_event(self, fd: int, bits: int) -> tuple[selectors.SelectorKey, int] | None:
        """A registered (not watched) descriptor's ready ``bits`` as ``select()`` reports them."""
        key = self._keys.get(fd)
        return None if key is None else (key, _MASKS[bits & _BITS] & key.events)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """The standard library's interface, for registered descriptors only: a watched one's events
        go to its handler, which only ``EventLoop`` (through ``poll``) calls."""
        keys, masks = self._keys, _MASKS
        ready = self.poll(timeout)
        return [(key, masks[ev & _BITS] & key.events) for fd, ev in ready if (key := keys.get(fd)) is not None]

    def watch(self, fd: int, handler: Handler, events: int) -> None:
        """Watch ``fd`` for ``events`` (EVENT_READ, EVENT_WRITE, EVENT_HANGUP) and pass what comes to
        ``handler.on_read``; again to change the events. A descriptor has a handler or a key, not both."""
        mask = _epoll_mask(events)
        if self.handlers.get(fd) is handler:
            self._epoll.modify(fd, mask)
            return
        if fd in self._keys:
            raise KeyError(f"FD {fd} is already registered")
        self._epoll.register(fd, mask)  # (a stale entry's descriptor was closed: epoll dropped it then)
        self.handlers[fd] = handler

    def unwatch(self, fd: int) -> Handler | None:
        """Stop watching ``fd`` for its handler; returns the handler, None when it had none."""
        handler = self.handlers.pop(fd, None)
        if handler is not None:
            try:
                self._epoll.unregister(fd)
            except OSError:  # closed since
                pass
        return handler

    def close(self) -> None:
        self.handlers.clear()
        super().close()

    def register(self, fileobj: FileDescriptorLike, events: int, data: object = None) -> selectors.SelectorKey:
        if not events & EVENT_HANGUP:
            return super().register(fileobj, events, data)
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if fd in self._keys:
            raise KeyError(f"{fileobj!r} (FD {fd}) is already registered")
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._epoll.register(fd, _epoll_mask(events))
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        """The standard library's, without its layers of lookups (half the cost of a hang-up: a mass
        disconnect makes thousands in a row); what it cannot find by descriptor (a closed socket) goes
        the standard library's way."""
        try:
            fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        except (ValueError, OSError):
            fd = -1
        key = self._keys.pop(fd, None) if fd >= 0 else None
        if key is None:
            return super().unregister(fileobj)
        try:
            self._epoll.unregister(fd)
        except OSError:  # closed since it was registered
            pass
        return key

    def modify(self, fileobj: FileDescriptorLike, events: int, data: object = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = self._keys.get(fd)
        if key is None or not (events | key.events) & EVENT_HANGUP:
            return super().modify(fileobj, events, data)
        if events != key.events:
            self._epoll.modify(fd, _epoll_mask(events))
        key = key._replace(events=events, data=data)
        self._keys[fd] = key
        return key


def _epoll_mask(events: int) -> int:
    return (
        (select.EPOLLIN if events & _READ else 0)
        | (select.EPOLLOUT if events & _WRITE else 0)
        | (select.EPOLLRDHUP if events & EVENT_HANGUP else 0)
    )


def busy(selector: selectors.BaseSelector) -> bool:
    """The last select() returned a full batch (``max_events``): more sockets are ready behind it, so
    deferrable work should take only a small share of the next turns."""
    return isinstance(selector, EpollSelector) and selector.full


def default_selector() -> selectors.BaseSelector:
    """epoll (Linux, where hbd runs); elsewhere the standard library's choice."""
    return EpollSelector() if hasattr(select, "epoll") else selectors.DefaultSelector()
