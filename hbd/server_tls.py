"""The server's TLS connections: a Connection that first checks the peer speaks TLS, then runs a
non-blocking handshake on the loop, then behaves like a plain one (same protocol, same timers).

Kept apart from hbd.server so the plain-TCP path carries none of this.
"""

from __future__ import annotations

import logging
import socket
import ssl
from enum import Enum

from hbd import tls
from hbd.server import RECV_SIZE, Connection


class TlsState(Enum):
    SNIFF = "sniff"  # waiting for the first bytes: a TLS ClientHello or not
    HANDSHAKE = "handshake"
    UP = "up"  # handshake done: a plain Connection from here on


class TLSConnection(Connection):
    __slots__ = ("handshake", "state", "subject")
    BLOCKING = tls.WOULD_BLOCK

    def start(self) -> None:
        self.state: TlsState = TlsState.SNIFF
        self.subject: str | None = None
        self.handshake: tls.Handshake | None = None
        self.server.loop.add_reader(self.sock, self._sniff)
        self.arm()

    def arm(self, forgiven: float = 0.0) -> None:
        if self.state is TlsState.UP:
            super().arm(forgiven)
            return
        assert self.server.config.tls is not None
        timeout = self.server.config.tls.handshake_timeout
        self.timer = self.server.loop.call_at(self.since + timeout, self._handshake_timeout)

    def _sniff(self) -> None:
        """Peek at the first bytes: a plain-TCP client gets a clear log line, not a TLS riddle."""
        try:
            first = self.sock.recv(16, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.server.drop(self, f"connection error: {exc.strerror or exc}", logging.WARNING)
            return
        if not first:
            self.server.drop(self, "disconnected before the TLS handshake", logging.INFO)
            return
        if first[0] != tls.TLS_HANDSHAKE_RECORD:
            self.server.tls_failed(self, f"not TLS (it sent {first!r}): a plain-TCP client on the TLS port?")
            return
        server = self.server
        assert server.tls_context is not None
        server.loop.forget(self.sock)  # wrap_socket() detaches the plain socket object
        self.sock = server.tls_context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self.state = TlsState.HANDSHAKE
        self.handshake = tls.Handshake(server.loop, self.sock, self._handshake_done, self._handshake_failed)
        self.handshake.step()

    def _handshake_done(self) -> None:
        server = self.server
        server.loop.cancel(self.timer)
        self.state = TlsState.UP
        self.handshake = None
        self.subject = tls.peer_name(self.sock)  # type: ignore[arg-type]
        self.peer.last_heard = server.clock()  # silence is counted from when the link is usable
        server.loop.add_reader(self.sock, self.on_read)
        self.arm()
        server._peer_log(
            logging.INFO, self.addr.rsplit(":", 1)[0], "client %s connected (TLS%s)", self.addr,
            f", certificate CN={self.subject}" if self.subject else "", event="connected", peer=self.addr,
        )
        self.on_read()  # a ping may have come in the same segment as the handshake's last flight

    def _handshake_failed(self, reason: str) -> None:
        self.server.tls_failed(self, reason)

    def _handshake_timeout(self) -> None:
        self.timer = None
        if self.handshake is not None:
            self.handshake.step()  # last look: the final flight may be queued after our own stall
        if self.state is not TlsState.UP and self.server.conns.get(self.sock.fileno()) is self:
            assert self.server.config.tls is not None
            timeout = self.server.config.tls.handshake_timeout
            self.server.tls_failed(self, f"no TLS handshake within handshake_timeout ({timeout:g} s)")

    def on_read(self) -> None:
        if self.state is not TlsState.UP:
            return  # a last-look read from the server while the handshake is still running
        sock = self.sock
        try:
            data = sock.recv(RECV_SIZE)
            while sock.pending():  # decrypted bytes the selector cannot see
                data += sock.recv(RECV_SIZE)
        except self.BLOCKING:
            return
        except ssl.SSLError as exc:
            self.server.tls_failed(self, tls.describe(exc))
            return
        except OSError as exc:
            self.server.drop(self, f"connection error: {exc.strerror or exc}", logging.WARNING)
            return
        self.received(data)

