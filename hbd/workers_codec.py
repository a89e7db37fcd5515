"""The messages between the supervisor and its workers (see hbd.workers), and the worker's end of
the two pipes.

One frame per message: a 4-byte big-endian payload length, a 1-byte kind, the payload. Worker ->
supervisor payloads are JSON (small, and never unpickled by the supervisor); the one supervisor ->
worker message, ``Reload``, carries the validated ``ServerConfig`` pickled: the worker applies the
configuration the supervisor checked and never reads the file itself (it could have changed in
between). Both pipes are private to the two processes (created before the fork).

Below both hbd.server (which reports through it) and hbd.workers (which reads it), so neither
imports the other to talk over it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import select
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hbd.config import ServerConfig
    from hbd.loop import EventLoop

HEADER = struct.Struct(">IB")
MAX_FRAME = 1024 * 1024  # a bigger frame is garbage: the config file itself is at most 64 KB


class CodecError(Exception):
    """Bytes on the pipe that are not a frame we know (a bug: the other end is ours)."""


@dataclass(frozen=True, slots=True)
class Ready:
    """The worker listens."""


@dataclass(frozen=True, slots=True)
class Status:
    clients: int
    late: int


@dataclass(frozen=True, slots=True)
class Numbers:
    """The worker's counters, for the supervisor's metrics."""

    values: dict


@dataclass(frozen=True, slots=True)
class LogLine:
    """A warning or error line for the supervisor's log file."""

    level: int
    message: str


@dataclass(frozen=True, slots=True)
class Reloaded:
    """The outcome of a reload: error None means applied."""

    error: str | None = None


@dataclass(frozen=True, slots=True)
class Reload:
    """Supervisor -> worker: apply this (validated) configuration."""

    config: ServerConfig


# -- the peer registry (hbd.registry_remote in the worker, hbd.supervisor_registry in the supervisor) ---
# ``conn`` is the worker's own number for one connection (a counter, never reused: a reused fd cannot
# be confused). Times are monotonic: one host, one clock. Nothing goes up per ping except while a
# peer rises (``rise:``, PeerPinged).
@dataclass(frozen=True, slots=True)
class PeerHello:
    """A connection greeted (the registry may refuse the name at once)."""

    conn: int
    name: str
    certificate: str | None
    address: str


@dataclass(frozen=True, slots=True)
class PeerConnected:
    """A connection's first ping."""

    conn: int
    name: str | None
    certificate: str | None
    address: str
    timeout: float


@dataclass(frozen=True, slots=True)
class PeerPinged:
    """A ping on a watched connection (its peer is rising)."""

    conn: int
    silent_for: float


@dataclass(frozen=True, slots=True)
class PeerLate:
    conn: int


@dataclass(frozen=True, slots=True)
class PeerBack:
    conn: int


@dataclass(frozen=True, slots=True)
class PeerGone:
    """A connection that pinged has ended."""

    conn: int
    reason: str
    last_ping: float | None


@dataclass(frozen=True, slots=True)
class PeerClose:
    """Supervisor -> worker: close this connection (a refused name, a takeover)."""

    conn: int
    reason: str
    level: int


@dataclass(frozen=True, slots=True)
class PeerWatch:
    """Supervisor -> worker: report this connection's every ping while ``on`` (its peer rises)."""

    conn: int
    on: bool


@dataclass(frozen=True, slots=True)
class PeerMark:
    """Supervisor -> worker: what the registry says of this connection's peer, for its status row
    (sent when it changes, never per ping)."""

    conn: int
    peer: str
    named: bool
    state: str
    since: float
    reason: str
    expected: bool
    flags: list[str]
    labels: list[list[str]]
    silenced_until: float | None
    # The registry's accounting of the peer (hbd.peer_uptime.Account.copy(): it changes with the
    # state), so that the worker's row shows its 24 h uptime, outages and down time as one process does.
    outages: int = 0
    down: float = 0.0
    spans: list[list[object]] = field(default_factory=list)  # [monotonic start, state], at most MAX_SPANS


@dataclass(frozen=True, slots=True)
class PeerKnown:
    """Supervisor -> worker: this connection greeted with a known peer's name; until its first ping
    the registry's row of that peer stands for it (as in one process)."""

    conn: int


PeerReport = PeerHello | PeerConnected | PeerPinged | PeerLate | PeerBack | PeerGone
PeerOrder = PeerClose | PeerWatch | PeerMark | PeerKnown
MAX_REASON = 256  # characters of a reason sent up (a TLS error can be long; frames stay under PIPE_BUF)

Message = Ready | Status | Numbers | LogLine | Reloaded | Reload | PeerReport | PeerOrder
UP_KINDS: dict[type, int] = {
    Ready: 1,
    Status: 2,
    Numbers: 3,
    LogLine: 4,
    Reloaded: 5,
    PeerHello: 20,
    PeerConnected: 21,
    PeerPinged: 22,
    PeerLate: 23,
    PeerBack: 24,
    PeerGone: 25,
}  # worker -> supervisor
DOWN_KINDS: dict[type, int] = {
    Reload: 10,
    PeerClose: 30,
    PeerWatch: 31,
    PeerMark: 32,
    PeerKnown: 33,
}  # supervisor -> worker
KINDS = {**UP_KINDS, **DOWN_KINDS}


def encode(msg: Message) -> bytes:
    if isinstance(msg, Reload):
        # Without the expected peers: the registry is the supervisor's, and 100,000 of them (a
        # peers_file) would not fit a frame.
        config = dataclasses.replace(msg.config, peers=())
        kind, payload = DOWN_KINDS[Reload], pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL)
    else:
        fields = (
            {"values": msg.values} if isinstance(msg, Numbers) else {k: getattr(msg, k) for k in type(msg).__slots__}
        )
        kind, payload = KINDS[type(msg)], json.dumps(fields).encode()
    if len(payload) > MAX_FRAME:
        raise CodecError(f"{type(msg).__name__}: {len(payload)} bytes is more than a frame holds ({MAX_FRAME})")
    return HEADER.pack(len(payload), kind) + payload


class Decoder:
    """Frames in, messages out. ``down``: the worker's decoder (Reload and the registry's orders);
    the supervisor's takes the worker's messages and never unpickles."""

    def __init__(self, down: bool = False) -> None:
        self.kinds = {v: k for k, v in (DOWN_KINDS if down else UP_KINDS).items()}
        self.buf = b""

    def feed(self, data: bytes) -> list[Message]:
        buf = self.buf + data if self.buf else data
        out: list[Message] = []
        at, end = 0, len(buf)  # an offset, not a slice per frame: a 64 KB read of small frames stays O(n)
        while end - at >= HEADER.size:
            size, kind = HEADER.unpack_from(buf, at)
            cls = self.kinds.get(kind)
            if cls is None or size > MAX_FRAME:
                self.buf = b""
                raise CodecError(f"not a frame: kind {kind}, {size} bytes")
            start = at + HEADER.size
            if end < start + size:
                break
            at = start + size
            try:
                out.append(self._message(cls, buf[start:at]))
            except CodecError:
                self.buf = buf[at:]  # the next frames are still good
                raise
        self.buf = buf[at:]
        return out

    @staticmethod
    def _message(cls: type, payload: bytes) -> Message:
        if cls is Reload:
            return Reload(pickle.loads(payload))  # only from our own supervisor's private pipe
        try:
            fields = json.loads(payload)
            msg = cls(**fields)
        except (ValueError, TypeError) as exc:
            raise CodecError(f"bad {cls.__name__} frame: {exc}") from None
        return msg


# Bytes read from a pipe per loop turn: about 200 peer reports (a PeerGone frame is about 80
# bytes, handling one in the supervisor 40-70 us). After a mass disconnect every worker's pipe is
# full: 64 KB reads from 6 of them were 5,000 reports in one turn; the rest stays in the pipe (and
# the pipe stays readable) for the next turns.
PIPE_READ = 16384
MAX_PENDING = 4 << 20  # bytes of registry reports a worker keeps while its pipe is full (~40,000 reports)
REPORTS = (PeerHello, PeerConnected, PeerPinged, PeerLate, PeerBack, PeerGone)


class WorkerChannel:
    """The worker's end of the pipes. Writes never block: if the supervisor is not reading, a
    status or log message is dropped (the worker's own terminal/journald output still has its log
    lines); the registry's reports are not (a lost ``gone`` would leave a peer UP for ever): they
    wait in order, up to MAX_PENDING, until the pipe takes them (a reconnect storm of thousands of
    peers fills a 64 KB pipe faster than the supervisor's loop turns). While any wait, nothing else
    is written, so frames never interleave. ``attach()`` starts reading the supervisor's messages on
    the worker's loop."""

    def __init__(self, fd: int, index: int = 0, config: ServerConfig | None = None, rfd: int = -1) -> None:
        self.fd = fd
        self.rfd = rfd  # the supervisor -> worker pipe (-1: none)
        self.index = index  # which worker this is (its status socket is <control_socket>.<index>)
        self.config = config  # the latest configuration the supervisor sent: the one a reload applies
        self.decoder = Decoder(down=True)
        self.pending = bytearray()  # reports the pipe did not take yet
        self.lost = 0  # reports dropped past MAX_PENDING (the supervisor is hung: it will be restarted)
        self.loop: EventLoop | None = None
        os.set_blocking(fd, False)

    def send(self, msg: Message) -> None:
        frame = encode(msg)
        while len(frame) > select.PIPE_BUF and isinstance(msg, LogLine) and msg.message:
            msg = LogLine(msg.level, msg.message[: len(msg.message) // 2])  # a long line: its start
            frame = encode(msg)
        if len(frame) > select.PIPE_BUF:
            return  # only writes up to PIPE_BUF are all-or-nothing: a torn frame would garble the rest
        report = isinstance(msg, REPORTS)
        if self.pending:
            if report:
                self._queue(frame)
            return  # the pipe is full: a status or log line is dropped, as it always was
        try:
            os.write(self.fd, frame)
        except BlockingIOError:
            if report:
                self._queue(frame)
        except BrokenPipeError:
            pass

    def _queue(self, frame: bytes) -> None:
        if len(self.pending) + len(frame) > MAX_PENDING:
            if not self.lost:
                logging.getLogger("hbd").error("the supervisor does not read its pipe: peer reports are lost")
            self.lost += 1
            return
        self.pending += frame
        if self.loop is not None:
            self.loop.add_writer(self.fd, self._flush)

    def _flush(self) -> None:
        """The pipe takes more: as much of the waiting reports as it will (a partial write is fine:
        nothing else is written meanwhile)."""
        try:
            n = os.write(self.fd, self.pending)
        except BlockingIOError:
            return
        except OSError:  # the supervisor is gone
            n = len(self.pending)
        del self.pending[:n]
        if not self.pending and self.loop is not None:
            self.loop.remove_writer(self.fd)

    def attach(
        self, loop: EventLoop, reload: Callable[[], object], orders: Callable[[PeerOrder], object] | None = None
    ) -> None:
        """On each Reload from the supervisor: keep its config, then call ``reload()``; the
        registry's orders go to ``orders``."""
        self.loop = loop
        if self.pending:
            loop.add_writer(self.fd, self._flush)
        if self.rfd < 0:
            return
        os.set_blocking(self.rfd, False)

        def on_read() -> None:
            try:
                data = os.read(self.rfd, PIPE_READ)
            except BlockingIOError:
                return
            if not data:  # the supervisor is gone: it will not send again
                loop.forget(self.rfd)
                return
            for msg in self.decoder.feed(data):
                if isinstance(msg, Reload):
                    self.config = msg.config
                    reload()
                elif orders is not None and isinstance(msg, PeerClose | PeerWatch | PeerMark | PeerKnown):
                    orders(msg)

        loop.add_reader(self.rfd, on_read)


class PipeLogHandler(logging.Handler):
    """In a worker: warnings and errors go up the pipe for the supervisor's log file."""

    def __init__(self, channel: WorkerChannel) -> None:
        super().__init__(logging.WARNING)
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        self.channel.send(LogLine(record.levelno, record.getMessage()))
