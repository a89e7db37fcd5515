"""One client connection of the server: its socket wired to a ``protocol.ServerPeer``.

A connection never parses bytes itself and knows nothing of the server: what it cannot decide
alone (drop, reject, events, filing its next deadline) it hands to its ``Owner``, a small interface
the server implements, so this module (and server_tls below it) never imports hbd.server.
"""

from __future__ import annotations

import logging
import selectors
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from hbd.loop import EVENT_HANGUP, EventLoop, HangUp, Timer
from hbd.peer_address import Packed, host_of, pack, unpack
from hbd.protocol import PeerState, ProtocolError, ServerPeer
from hbd.selector import ENDED, IN, OUT

if TYPE_CHECKING:
    from hbd.worker_marks import Mark

MAX_OUTBUF = 64 * 1024  # a peer that pings but never reads its pongs is dropped past this
# A read's size: a ping is 4-5 bytes and a line at most MAX_LINE (256). 448 keeps the bytes object recv()
# makes (its size plus a 33-byte header) within the allocator's small-object limit (512 bytes): 4096
# went to malloc() and a shrinking realloc() a read, ~0.1 us of a ~5.5 us ping (docs/performance.md,
# "CPU per ping ... sixth round"). A peer's bytes beyond it wait for the next turn, as they would past
# 4096: one read a peer a turn either way, and a smaller share for one peer a turn.
# (Connection.on_read has it as a constant, and IN as 1: tests/test_connection.py)
RECV_SIZE = 448
_WATCH = selectors.EVENT_READ | EVENT_HANGUP  # what the loop watches a plain connection for (watch())
_WATCH_WRITE = _WATCH | selectors.EVENT_WRITE  # ... while its send buffer waits for room
_UP = PeerState.UP  # a module global: an Enum member through its class costs about 0.1 us


class Ends(Protocol):
    on_hangup: HangUp  # one callable for every connection (hbd.server_ends): its peer ended


class Owner(Protocol):
    """What a connection needs from the server that holds it."""

    loop: EventLoop
    clock: Callable[[], float]

    @property
    def ending(self) -> Ends: ...  # ends not yet closed or reported: it takes the hang-ups

    def is_open(self, conn: Connection) -> bool: ...  # still held (not closed by what it just did)
    def arm(self, conn: Connection, forgiven: float = 0.0) -> None: ...  # file it under its next deadline (+ forgiven)
    def on_events(self, conn: Connection) -> None: ...  # its peer has events (greeting, state changes)
    def connected(self, conn: Connection, how: str) -> None: ...  # usable now (TLS: handshake done)
    def drop(self, conn: Connection, reason: str, level: int) -> None: ...  # gone or broken: close it
    def reject(self, conn: Connection, reason: str) -> None: ...  # broke the protocol: close it
    def tls_failed(self, conn: Connection, reason: str) -> None: ...  # TLS failed: close it


class Connection(ServerPeer):
    """A connection is its peer's protocol state machine (a ``ServerPeer``, which it feeds) with the
    socket that state's bytes come and go by: one slotted object per connection, not two, and no
    ``self.peer`` between a read and ``feed`` (docs/performance.md, "A leaner connection layer").
    The protocol's rules stay in ``ServerPeer``: this class only moves bytes."""

    # 20 slots with ServerPeer's: 192 B, pymalloc's size class for them (docs/performance.md, "A
    # connection's bytes"). A worker's registry keeps its number for the connection and the
    # supervisor's mark of its peer here (hbd.registry_remote), not in two tables keyed by it.
    __slots__ = ("_addr", "cid", "mark", "outbuf", "owner", "since", "slot", "sock")
    # Errors that mean "try again later"; an except clause is evaluated only when something is
    # raised, so the TLS subclass can widen this at no cost to the plain path.
    BLOCKING: tuple[type[BaseException], ...] = (BlockingIOError, InterruptedError)
    timer: Timer | None = None  # the TLS handshake's timeout (a slot of hbd.server_tls's connections only)

    # sock: a plain connection's is the C socket object alone (hbd.server: ``bare``), a TLS one's an SSLSocket;
    # addr: "ip:port", or an IPv4 one already packed (hbd.peer_address.of)
    def __init__(self, owner: Owner, sock: socket.SocketType, addr: Packed, now: float, timeout: float) -> None:
        super().__init__(now, timeout)
        self.owner = owner
        self.sock = sock
        # the packed form (32 B; the string is 80 B as allocated): read on events and rows, never per ping
        self._addr = pack(addr) if isinstance(addr, str) else addr
        self.since = now
        self.outbuf = b""
        self.slot = -1  # the deadline-wheel slot this connection is filed under; -1: none
        self.cid = 0  # a worker's number for it (hbd.registry_remote); 0: none yet
        self.mark: Mark | None = None  # the supervisor's view of its peer, in a worker (hbd.registry_remote)

    @property
    def peer(self) -> ServerPeer:
        """Its peer's state (itself): what the server's other parts read as ``conn.peer``."""
        return self

    @property
    def addr(self) -> str:
        """The peer's address, ``ip:port``."""
        return unpack(self._addr)

    @property
    def label(self) -> str:
        name, addr = self.name, self.addr
        return f"{name} ({addr})" if name else addr

    @property
    def source(self) -> str:
        """The peer's address without the port (the unit of per-source log rate limits)."""
        return host_of(self._addr)

    def start(self, fd: int | None = None) -> None:
        """Serve it: watch the socket and file its first deadline. ``fd``: its descriptor as the owner
        keys it, so that the loop's table keys it by the same int (32 B a connection less)."""
        self.owner.loop.watch(self.sock if fd is None else fd, self, _WATCH)  # the loop calls on_read with epoll's bits
        self.arm()
        self.owner.connected(self, "")

    def on_read(self, bits: int = IN) -> None:
        """The socket is ready (hbd.loop.Handler): a read, the usual event, unless epoll said more."""
        if bits != 1:  # IN (a constant: cheaper than a global) alone, the usual; else an end, room to send, an error
            if bits & ENDED:  # the peer's end: handed over, read later (hbd.server_ends)
                self.owner.ending.on_hangup(self.sock)
                return
            if bits & OUT:
                self.on_write()
            if not bits & IN or not self.owner.is_open(self):
                return
        try:
            data = self.sock.recv(448)  # RECV_SIZE, as a constant
        except self.BLOCKING:
            return
        except OSError as exc:
            self.owner.drop(self, f"connection error: {exc.strerror or exc}", logging.WARNING)
            return
        # received(), feed() and send() inlined for the usual read: one whole ping from an UP peer with
        # nothing buffered, answered straight into an empty send buffer. A Python call costs about as
        # much as the rest of a ping's own work here (docs/performance.md, "CPU per ping with
        # everything in", "... fifth round": ~900 instructions, 6 % of a ping, for feed's). What it does
        # to the peer is what feed() does through its general path (the same rule in its other form:
        # tests/test_connection.py checks the two agree for every state and input). Its time is when
        # the loop found the socket ready (the bytes were there by then; a later look only makes it
        # look older), one clock reading a turn rather than one a read: ~500 instructions a ping less.
        # The wire's bytes as constants (hbd.protocol's PING, PONG ...): cheaper to load than globals
        if data == b"ping" and self._state is _UP and not self._buf:
            self._echo = True  # a bare ping: a line terminator that follows is its
            self.last_heard = self.owner.loop.woke
            self.pings += 1
            self._junk = 0
            reply = b"pong"
        elif data == b"ping\n" and self._state is _UP and not self._buf:
            self._echo = False
            self.last_heard = self.owner.loop.woke
            self.pings += 1
            self._junk = 0
            reply = b"pong\n"
        else:
            if not data:  # (here, not before the usual read's tests: b"" is neither ping)
                self.owner.drop(self, "disconnected", logging.INFO)
                return
            try:
                reply = self.feed(data, self.owner.loop.woke)
            except ProtocolError as exc:
                self.owner.reject(self, str(exc))
                return
            if self.events or not reply:
                self.answer(reply)
                return
        if self.outbuf:  # behind what is queued (a ping above has no events and a reply)
            self.send(reply)
            return
        try:
            sent = self.sock.send(reply)
        except self.BLOCKING:
            sent = 0
        except OSError as exc:
            self.owner.drop(self, f"connection error: {exc.strerror or exc}", logging.WARNING)
            return
        if sent != 4 and sent < len(reply):  # (4: a bare pong, the usual reply, without a call to len())
            self.outbuf = reply[sent:]
            self._write_later(True)

    def received(self, data: bytes) -> None:
        """Bytes from the peer (b"" at end of file), after any TLS layer."""
        if not data:
            self.owner.drop(self, "disconnected", logging.INFO)
            return
        try:
            reply = self.feed(data, self.owner.clock())
        except ProtocolError as exc:
            self.owner.reject(self, str(exc))
            return
        self.answer(reply)

    def answer(self, reply: bytes) -> None:
        """What the peer's bytes produced: its events first, then the reply."""
        if self.events:  # before the reply: a send that finds the peer gone reports its end after this
            self.owner.on_events(self)
            if not self.owner.is_open(self):
                return  # what it said closed it (a refused name)
        if reply:
            self.send(reply)

    def send(self, data: bytes) -> None:
        if self.outbuf:
            if len(self.outbuf) + len(data) > MAX_OUTBUF:
                self.owner.reject(self, f"does not read its pongs ({len(self.outbuf)} bytes queued)")
                return
            self.outbuf += data
            return
        try:
            sent = self.sock.send(data)
        except self.BLOCKING:
            sent = 0
        except OSError as exc:
            self.owner.drop(self, f"connection error: {exc.strerror or exc}", logging.WARNING)
            return
        if sent < len(data):
            self.outbuf = data[sent:]
            self._write_later(True)

    def on_write(self) -> None:
        try:
            sent = self.sock.send(self.outbuf)
        except self.BLOCKING:
            return
        except OSError as exc:
            self.owner.drop(self, f"connection error: {exc.strerror or exc}", logging.WARNING)
            return
        self.outbuf = self.outbuf[sent:]
        if not self.outbuf:
            self._write_later(False)

    def _write_later(self, on: bool) -> None:
        """Be told when the socket has room for the send buffer (on), or no longer."""
        loop = self.owner.loop
        if loop.watches(self.sock):
            loop.watch(self.sock, self, _WATCH_WRITE if on else _WATCH)
        elif on:  # read through a callback (TLS; read again after a hang-up: hbd.server_ends)
            loop.add_writer(self.sock, self.on_write)
        else:
            loop.remove_writer(self.sock)

    def arm(self, forgiven: float = 0.0) -> None:
        """(Re)file the connection under its next deadline, pushed back by ``forgiven`` seconds of our
        own stall (the owner's wheel decides how)."""
        self.owner.arm(self, forgiven)
