"""The server's listening socket: bound (hbd.names.bind_tcp), accepted from in batches (hbd.accept),
and replaced whole when a reload moves it. New connections go to ``on_accept(sock, addr)``."""

from __future__ import annotations

import socket
from collections.abc import Callable

from hbd.accept import ACCEPT_PAUSE, Acceptor
from hbd.logs import fields, log
from hbd.loop import EventLoop
from hbd.names import bind_tcp

ACCEPT_BATCH = 32  # accepts per loop turn: drains a reconnect storm, yet peers are served between batches


class Listener:
    def __init__(
        self,
        loop: EventLoop,
        on_accept: Callable[[socket.socket, tuple[object, ...]], None],
        clients: Callable[[], int],
        *,
        reuse_port: bool = False,
    ) -> None:
        self.loop = loop
        self.on_accept = on_accept
        self.clients = clients  # how many are connected, for the line about pausing accepts
        self.reuse_port = reuse_port  # workers share the port; the kernel spreads connections
        self.sock: socket.socket | None = None
        self.acceptor: Acceptor | None = None
        self.address: tuple[str, int] | None = None

    def bind(self, host: str, port: int, backlog: int) -> socket.socket:
        """A new listening socket, not yet in use (raises BindError: the old one keeps serving)."""
        return bind_tcp(host, port, backlog, reuse_port=self.reuse_port)

    def use(self, sock: socket.socket) -> None:
        """Accept on ``sock`` from now on, instead of the one before (closed)."""
        self.close()
        self.sock = sock
        self.address = sock.getsockname()[:2]
        self.acceptor = Acceptor(self.loop, sock, self.on_accept, self._accept_failed, batch=ACCEPT_BATCH)

    def _accept_failed(self, exc: OSError) -> None:
        log.error(
            "cannot accept new clients: %s (%d connected); pausing accepts for %g s",
            exc.strerror,
            self.clients(),
            ACCEPT_PAUSE,
            extra=fields(event="accept-error"),
        )

    def close(self) -> None:
        if self.acceptor is not None:
            self.acceptor.close()
            self.acceptor = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
