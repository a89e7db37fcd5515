"""hbd.selector: the lean epoll selector answers exactly as the standard library's does."""

from __future__ import annotations

import selectors
import socket
import time

from hbd.selector import EpollSelector, default_selector

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
