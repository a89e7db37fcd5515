"""hbd.selector: the lean epoll selector answers exactly as the standard library's does."""

from __future__ import annotations

import selectors
import socket
import time

import pytest

from hbd.selector import EVENT_HANGUP, EpollSelector, default_selector

R, W = selectors.EVENT_READ, selectors.EVENT_WRITE


def ready(sel: selectors.BaseSelector) -> list[tuple[object, int]]:
    return sorted(((key.fileobj.fileno(), key.data), mask) for key, mask in sel.select(0))  # type: ignore[union-attr]


def test_same_events_as_the_standard_selector() -> None:
    """Readable, writable, both, a peer gone (HUP: reader and writer woken), nothing ready."""
    pairs = [socket.socketpair() for _ in range(5)]
    ours, std = EpollSelector(), selectors.EpollSelector()
    try:
        for sel in (ours, std):
            sel.register(pairs[0][0], R, "read-idle")
            sel.register(pairs[1][0], R, "readable")
            sel.register(pairs[2][0], W, "writable")
            sel.register(pairs[3][0], R | W, "both")
            sel.register(pairs[4][0], R | W, "hung-up")
        for i in (1, 3):
            pairs[i][1].send(b"x")
        pairs[4][1].close()
        assert ready(ours) == ready(std)
        assert {data: mask for (_, data), mask in ready(ours)} == {
            "readable": R,
            "writable": W,
            "both": R | W,
            "hung-up": R | W,
        }
        for sel in (ours, std):
            sel.unregister(pairs[3][0])
        assert ready(ours) == ready(std)
    finally:
        ours.close()
        std.close()
        for a, b in pairs:
            a.close()
            b.close()


def test_waits_at_least_its_timeout_and_empty_is_fine() -> None:
    sel = default_selector()
    assert isinstance(sel, EpollSelector)
    try:
        assert sel.select(0) == []
        start = time.monotonic()
        assert sel.select(0.0105) == []  # epoll counts milliseconds: rounded up, never down
        assert time.monotonic() - start >= 0.0105
    finally:
        sel.close()


def test_a_hang_up_is_told_only_to_a_socket_that_watches_for_it() -> None:
    """EPOLLRDHUP (the peer shut down or closed its side) comes as EVENT_HANGUP with the read event,
    with data still unread or not; a socket registered without it sees a plain read; a reset too."""
    pairs = [socket.socketpair() for _ in range(4)]
    sel = EpollSelector()
    try:
        sel.register(pairs[0][0], R | EVENT_HANGUP, "watches")
        sel.register(pairs[1][0], R, "does-not")
        sel.register(pairs[2][0], R | EVENT_HANGUP, "data-then-end")
        sel.register(pairs[3][0], R | EVENT_HANGUP, "readable")
        assert sel.select(0) == []
        pairs[2][1].send(b"ping\n")
        pairs[3][1].send(b"ping\n")
        for i in (0, 1, 2):
            pairs[i][1].shutdown(socket.SHUT_WR)
        assert {data: mask for (_, data), mask in ready(sel)} == {
            "watches": R | EVENT_HANGUP,
            "does-not": R,
            "data-then-end": R | EVENT_HANGUP,
            "readable": R,
        }
        key = sel.modify(pairs[3][0], R | W | EVENT_HANGUP, "readable")  # a writer too: still watched
        assert key.events == R | W | EVENT_HANGUP
        pairs[3][1].close()
        assert {data: mask for (_, data), mask in ready(sel)}["readable"] == R | W | EVENT_HANGUP
        sel.modify(pairs[3][0], R, "readable")  # the watch taken off again
        assert sel.get_key(pairs[3][0]).events == R
        assert {data: mask for (_, data), mask in ready(sel)}["readable"] == R
        sel.unregister(pairs[0][0])
        assert "watches" not in {data for (_, data), _ in ready(sel)}
    finally:
        sel.close()
        for a, b in pairs:
            a.close()
            b.close()


def test_unregister_by_socket_by_descriptor_and_once_closed() -> None:
    pairs = [socket.socketpair() for _ in range(3)]
    sel = EpollSelector()
    try:
        for i, (a, b) in enumerate(pairs):
            sel.register(a, R, i)
            b.send(b"x")
        assert sel.unregister(pairs[0][0]).data == 0
        assert sel.unregister(pairs[1][0].fileno()).data == 1
        pairs[2][0].close()  # fileno() is -1 now: found by the object
        assert sel.unregister(pairs[2][0]).data == 2
        assert sel.select(0) == [] and not sel.get_map()
        with pytest.raises(KeyError):
            sel.unregister(pairs[0][0])
    finally:
        sel.close()
        for a, b in pairs:
            a.close()
            b.close()
