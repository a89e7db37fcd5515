"""One connection of a client link that is up: the socket's reads and writes, the ping timer and
the greetings. ``protocol.ClientLink`` decides when to ping and when a pong is late or missing; the
link that owns the session (hbd.client.Link, through the small ``Owner`` interface) hears about
pongs, lateness and loss, logs them and drives the lifecycle.
"""

from __future__ import annotations

import socket
import ssl
from typing import Protocol

from hbd import tls
from hbd.config import ClientConfig
from hbd.loop import EventLoop, Timer
from hbd.metrics import LinkStats
from hbd.protocol import Answers, ClientLink, ProtocolError

RECV_SIZE = 4096
# hbd servers refuse greetings closer together than this on one connection: a reload's new
# greeting waits for it (and the new ping pace with it, so the server knows first).
GREETING_GAP = 1.0


class Owner(Protocol):
    """What a session reports to its link."""

    def pongs(self, rtts: list[float], now: float, back: bool, answering: bool) -> None:
        """Pongs came (already counted in the stats); ``back``: the link was late and answers again."""

    def late(self, waited: float, pong_timeout: float, now: float) -> None:
        """A ping went unanswered for more than half the pong timeout."""

    def lost(self, reason: str, peer_caused: bool = False) -> None:
        """The connection is gone (the owner closes the session)."""


class Session:
    def __init__(
        self,
        loop: EventLoop,
        now: float,
        sock: socket.socket,
        cfg: ClientConfig,
        stats: LinkStats,
        owner: Owner,
        tls: bool,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.stats = stats  # the link's counters: pings, pongs and timeouts are counted here
        self.owner = owner
        self.tls = tls
        self.connected = now  # the first greeting and ping are of this instant
        self.proto = ClientLink(now, cfg.heartbeat_interval, cfg.pong_timeout, cfg.wire == "line")
        self.timer: Timer | None = None
        self.closed = False
        self._greeted_at = float("-inf")  # when this connection last sent a greeting
        self._greet_timer: Timer | None = None  # a reload's greeting waiting for GREETING_GAP

    def start(self, cfg: ClientConfig) -> None:
        """Read from now on; greet (when the link has a name) and send the first ping."""
        self.loop.add_reader(self.sock, self._on_read)
        if cfg.client_name:
            self._greeted_at = self.connected
            self._send(_greeting(cfg))
            if self.closed:  # the send found the connection reset: the owner tore it down
                return
        self._tick()

    def _set_timer(self, when: float) -> None:
        self.loop.cancel(self.timer)
        self.timer = self.loop.call_at(when, self._tick)

    def _on_read(self) -> None:
        sock = self.sock
        try:
            data = sock.recv(RECV_SIZE)
            if self.tls:
                while sock.pending():  # type: ignore[attr-defined]  # decrypted bytes select() cannot see
                    data += sock.recv(RECV_SIZE)
        except tls.WOULD_BLOCK:
            return
        except ssl.SSLError as exc:
            self.owner.lost(tls.describe(exc))
            return
        except OSError as exc:
            self.owner.lost(f"connection error: {exc.strerror or exc}")
            return
        if not data:
            self.owner.lost("server closed the connection")
            return
        now = self.loop.time()
        proto = self.proto
        was_late = proto.answers is Answers.LATE
        try:
            rtts = proto.feed(data, now)
        except ProtocolError as exc:
            # A server breaking the protocol gets no fresh series of quick retries.
            self.owner.lost(f"protocol error: {exc}", peer_caused=True)
            return
        if not rtts:
            return
        for rtt in rtts:
            self.stats.pong(rtt, now)  # the one place an RTT is counted
        answering = proto.answers is Answers.ANSWERING
        self.owner.pongs(rtts, now, was_late and answering, answering)

    def _tick(self) -> None:
        """Ping when due and apply the pong timeout; re-armed at the protocol's next deadline."""
        proto = self.proto
        if proto.waiting(self.loop.time()) > proto.pong_timeout / 2:
            self._on_read()  # last look: never suspect a link whose pong is already in our buffer
            if self.closed or self.proto is not proto:
                return
        now = self.loop.time()
        was_late = proto.answers is Answers.LATE
        out = proto.poll(now)
        if proto.answers is Answers.LATE and not was_late:
            self.owner.late(proto.waiting(now), proto.pong_timeout, now)
        if proto.answers is Answers.DEAD:
            self.stats.timeouts += 1
            self.owner.lost(f"no pong within {proto.pong_timeout:g} s (ping unanswered for {proto.silent_for:.3f} s)")
            return
        if out:
            self.stats.pings += 1
            self._send(out)
            if self.closed:
                return
        self._set_timer(proto.next_deadline())

    def _send(self, data: bytes) -> None:
        try:
            self.sock.send(data)  # a few bytes: a full send buffer means the link is dead anyway
        except tls.WOULD_BLOCK:
            pass
        except ssl.SSLError as exc:
            self.owner.lost(tls.describe(exc))
        except OSError as exc:
            self.owner.lost(f"connection error: {exc.strerror or exc}")

    def apply(self, cfg: ClientConfig, old: ClientConfig) -> None:
        """New timings (SIGHUP) on this connection; a new interval is announced with a greeting."""
        if cfg.client_name and (cfg.heartbeat_interval != old.heartbeat_interval or self._greet_timer is not None):
            self._regreet(cfg)
        else:
            self._retime(cfg)

    def _retime(self, cfg: ClientConfig) -> None:
        self.proto.retime(cfg.heartbeat_interval, cfg.pong_timeout)
        self._set_timer(self.proto.next_deadline())

    def _regreet(self, cfg: ClientConfig) -> None:
        """Tell the server the new interval on this connection, then ping at the new pace: its
        timeout follows the announced interval, and a greeting is the only way to announce it."""
        self.loop.cancel(self._greet_timer)
        self._greet_timer = None
        now = self.loop.time()
        if now < self._greeted_at + GREETING_GAP:  # the old pace until the server can be told
            self._greet_timer = self.loop.call_at(self._greeted_at + GREETING_GAP, lambda: self._regreet(cfg))
            return
        self._retime(cfg)
        self._greeted_at = now
        self._send(_greeting(cfg))

    def owns(self, fileobj: object, callback: object) -> bool:
        """Does a failing callback belong to this connection (its socket, or its timer)?"""
        if fileobj is not None:
            return fileobj is self.sock
        return self.timer is not None and self.timer.callback is callback

    def close(self) -> None:
        self.closed = True
        self.loop.cancel(self.timer)
        self.timer = None
        self.loop.cancel(self._greet_timer)
        self._greet_timer = None
        close_socket(self.loop, self.sock)


def close_socket(loop: EventLoop, sock: socket.socket | None) -> None:
    if sock is not None:
        loop.forget(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


def _greeting(cfg: ClientConfig) -> bytes:
    return f"hello {cfg.client_name} {cfg.heartbeat_interval:g}\n".encode()
