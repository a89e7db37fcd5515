"""The server's TLS connections: a Connection that first checks the peer speaks TLS, then runs a
non-blocking handshake on the loop, then behaves like a plain one (same protocol, same timers).

Kept apart from hbd.connection so the plain-TCP path carries none of this. Like a plain connection
it knows only its ``Owner``: the TLS context and handshake timeout are handed to it.
"""

from __future__ import annotations

import logging
import socket
import ssl
from enum import Enum
from typing import cast

from hbd import tls
from hbd.connection import Connection, Owner
from hbd.loop import Timer
from hbd.peer_address import Packed
from hbd.selector import IN

# A TLS read: records are up to 16 KB and what one decrypts is drained from the SSL object at once
TLS_RECV_SIZE = 4096


class TlsState(Enum):
    SNIFF = "sniff"  # waiting for the first bytes: a TLS ClientHello or not
    HANDSHAKE = "handshake"
    UP = "up"  # handshake done: a plain Connection from here on


class TLSConnection(Connection):
    __slots__ = ("context", "handshake", "handshake_timeout", "subject", "timer", "tls_state")
    BLOCKING = tls.WOULD_BLOCK

    def __init__(
        self,
        owner: Owner,
        sock: socket.socket,
        addr: Packed,
        now: float,
        timeout: float,
        context: ssl.SSLContext,
        handshake_timeout: float,
    ) -> None:
        super().__init__(owner, sock, addr, now, timeout)
        self.timer: Timer | None = None  # the handshake's timeout
        self.context = context
        self.handshake_timeout = handshake_timeout
        self.tls_state: TlsState = TlsState.SNIFF
        self.subject: str | None = None
        self.handshake: tls.Handshake | None = None

    def start(self, fd: int | None = None) -> None:
        """Serve it: sniff, then handshake; the owner hears ``connected`` once that is done."""
        self.owner.loop.add_reader(self.sock, self._sniff)
        self.arm()

    def arm(self, forgiven: float = 0.0) -> None:
        if self.tls_state is TlsState.UP:
            super().arm(forgiven)
            return
        self.timer = self.owner.loop.call_at(self.since + self.handshake_timeout, self._handshake_timeout)

    def _sniff(self) -> None:
        """Peek at the first bytes: a plain-TCP client gets a clear log line, not a TLS riddle."""
        try:
            first = self.sock.recv(16, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.owner.drop(self, f"connection error: {exc.strerror or exc}", logging.WARNING)
            return
        if not first:
            self.owner.drop(self, "disconnected before the TLS handshake", logging.INFO)
            return
        if first[0] != tls.TLS_HANDSHAKE_RECORD:
            self.owner.tls_failed(self, f"not TLS (it sent {first!r}): a plain-TCP client on the TLS port?")
            return
        loop = self.owner.loop
        loop.forget(self.sock)  # wrap_socket() detaches the plain socket object
        self.sock = self.context.wrap_socket(
            cast(socket.socket, self.sock), server_side=True, do_handshake_on_connect=False
        )
        self.tls_state = TlsState.HANDSHAKE
        self.handshake = tls.Handshake(loop, self.sock, self._handshake_done, self._handshake_failed)
        self.handshake.step()

    def _handshake_done(self) -> None:
        owner = self.owner
        owner.loop.cancel(self.timer)
        self.tls_state = TlsState.UP
        self.handshake = None
        self.subject = tls.peer_name(self.sock)  # type: ignore[arg-type]
        self.last_heard = owner.clock()  # silence is counted from when the link is usable
        owner.loop.add_reader(self.sock, self.on_read)
        self.arm()
        owner.connected(self, f" (TLS, certificate CN={self.subject})" if self.subject else " (TLS)")
        self.on_read()  # a ping may have come in the same segment as the handshake's last flight

    def _handshake_failed(self, reason: str) -> None:
        self.owner.tls_failed(self, reason)

    def _handshake_timeout(self) -> None:
        self.timer = None
        if self.handshake is not None:
            self.handshake.step()  # last look: the final flight may be queued after our own stall
        if self.tls_state is not TlsState.UP and self.owner.is_open(self):
            timeout = self.handshake_timeout
            self.owner.tls_failed(self, f"no TLS handshake within handshake_timeout ({timeout:g} s)")

    def on_read(self, bits: int = IN) -> None:  # (read through a callback: always IN)
        if self.tls_state is not TlsState.UP:
            return  # a last-look read from the server while the handshake is still running
        sock = cast(ssl.SSLSocket, self.sock)  # wrapped once the handshake began
        try:
            data = sock.recv(TLS_RECV_SIZE)
            while sock.pending():  # decrypted bytes the selector cannot see
                data += sock.recv(TLS_RECV_SIZE)
        except self.BLOCKING:
            return
        except ssl.SSLError as exc:
            self.owner.tls_failed(self, tls.describe(exc))
            return
        except OSError as exc:
            self.owner.drop(self, f"connection error: {exc.strerror or exc}", logging.WARNING)
            return
        self.received(data)
