"""Accepting connections on a listening socket, in batches, without spinning when descriptors run out.

Out of file descriptors (EMFILE and friends), accept() fails while the listener stays readable:
returning and waiting for the next select() would wake at once and spin the CPU. Every listener
(clients, status socket, metrics) therefore stops watching its socket for ``ACCEPT_PAUSE``
seconds instead; the connections wait in the kernel's backlog meanwhile.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Generic, TypeVar

from hbd.loop import EventLoop, Timer

ACCEPT_PAUSE = 0.5  # out of file descriptors: stop accepting this long instead of spinning
WARN_EVERY = 10.0  # at most one line per listener this often about it
FD_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


Addr = TypeVar("Addr")  # what accept() returns as the peer's address: (host, port, ...) or a unix path


class Acceptor(Generic[Addr]):
    """Calls ``on_conn(sock, addr)`` for each new connection on ``listener`` (up to ``batch`` per
    loop turn, so the peers already connected are served between batches). ``warn(exc)`` is called
    when accepts pause, at most once per ``WARN_EVERY`` seconds."""

    def __init__(
        self,
        loop: EventLoop,
        listener: socket.socket,
        on_conn: Callable[[socket.socket, Addr], None],
        warn: Callable[[OSError], None],
        batch: int = 32,
    ) -> None:
        self.loop = loop
        self.listener = listener
        self.on_conn = on_conn
        self.warn = warn
        self.batch = batch
        self.paused = False
        self.pauses = 0
        self._warned_at = float("-inf")
        self._timer: Timer | None = None
        self._closed = False
        loop.add_reader(listener, self.on_ready)

    def on_ready(self) -> None:
        listener = self.listener
        for _ in range(self.batch):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in FD_ERRORS:
                    self.pause(exc)
                    return
                continue  # ECONNABORTED and friends: that one connection is gone, carry on
            try:
                self.on_conn(sock, addr)
            except Exception as exc:  # that connection only: the listener keeps accepting
                self.loop.report_error(sock, self.on_conn, exc)
                sock.close()
            if self._closed or self.paused:
                return

    def pause(self, exc: OSError) -> None:
        now = self.loop.time()
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            self.warn(exc)
        self.paused = True
        self.pauses += 1
        self.loop.remove_reader(self.listener)
        self.loop.cancel(self._timer)
        self._timer = self.loop.call_later(ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        self._timer = None
        self.paused = False
        if not self._closed:
            self.loop.add_reader(self.listener, self.on_ready)

    def close(self) -> None:
        """Stop accepting (the owner closes the socket)."""
        self._closed = True
        self.loop.cancel(self._timer)
        self._timer = None
        self.loop.forget(self.listener)
